"""Attention-only causal LMs after ``deltapack.patch``: each packed document equals the document alone in every
input format, forward and gradient, while the unpatched model leaks; the unpacked path is bit-identical; the model
types that cannot be packed are refused with the reason.

A representative subset (rotary, MLA, sliding windows and chunks shorter than the documents, soft-capping, sinks,
learned absolute positions, ALiBi, MoE); ``deltapack audit --all`` runs every registered type.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import deltapack
from deltapack.audit import shrink as shrinking
from deltapack.audit.build import FLOAT64_TYPES
from deltapack.audit.core import GRAD_RTOL
from helpers import assert_exact_in_every_format, assert_unpacked_bit_identical, checkpointed_grads, norm_rel

# model type -> config overrides (windows and chunks of 3 tokens, so they act inside the audit's documents)
SUBSET: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 3},
    "gemma3_text": {"sliding_window": 3},
    "gemma2": {"sliding_window": 3},  # soft-capping, eager
    "gemma4_text": {"sliding_window": 3},  # audited in float64 (fp32 rounding at its scale exceeds the bound)
    "llama4_text": {"attention_chunk_size": 3},
    "gpt2": {},
    "gpt_neo": {"window_size": 3},  # local layers: a row-position window buffer inside the attention
    "opt": {},
    "bloom": {},
    "falcon": {},
    "mpt": {},
    "gpt_oss": {"sliding_window": 3},  # sinks
    "deepseek_v3": {},  # multi-head latent attention
    "phi3": {"sliding_window": 3},
    "qwen3_moe": {},
    "bart": {},  # the decoder of an encoder-decoder: a position table read by the sequence length
    "roberta": {"is_decoder": True},  # positions counted from the token ids
}


@functools.cache
def _model(arch: str) -> torch.nn.Module:
    config, _ = shrinking.shrink_config(AutoConfig.for_model(arch), arch)
    for key, value in SUBSET[arch].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except ValueError:  # no sdpa for this architecture (gemma2, gpt_oss, ...)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return (model.double() if arch in FLOAT64_TYPES else model.float()).eval()


@pytest.mark.parametrize("arch", list(SUBSET))
def test_packed_equals_alone_in_every_format(arch: str):
    assert_exact_in_every_format(_model(arch), arch)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt_oss", "bloom", "mpt", "opt"])
def test_unpacked_path_bit_identical_with_generate(arch: str):
    model = _model(arch)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (2, 8), generator=gen)
    assert_unpacked_bit_identical(model, ids)


def _tiny(arch: str, **overrides) -> torch.nn.Module:
    config, _ = shrinking.shrink_config(AutoConfig.for_model(arch), arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "arch,overrides,reason",
    [
        ("prophetnet", {}, "n-grams"),
        ("xmod", {}, "per language"),
        ("xlnet", {}, "permutation language model"),
        ("falcon", {"alibi": True}, "ALiBi"),
        ("llama", {"is_causal": False}, "is_causal=False"),
    ],
)
def test_refused_types_raise_with_the_reason(arch: str, overrides: dict, reason: str):
    with pytest.raises(ValueError, match=reason):
        deltapack.patch(_tiny(arch, **overrides))


def test_encoder_decoder_is_refused():
    from transformers import AutoModelForSeq2SeqLM

    config, _ = shrinking.shrink_config(AutoConfig.for_model("t5"), "t5")
    with pytest.raises(ValueError, match="encoder-decoder"):
        deltapack.patch(AutoModelForSeq2SeqLM.from_config(config))


def test_scoreboard_has_an_after_patching_verdict():
    from deltapack.audit.scoreboard import audit_one, summary_line, to_markdown

    llama, xlnet = audit_one("llama"), audit_one("xlnet")
    assert llama["patched"]["verdict"] == "exact" and "fixes it (exact)" in summary_line(llama)
    assert xlnet["patch"] == "refused" and "permutation language model" in summary_line(xlnet)
    page = to_markdown([llama, xlnet], 1.0, "versions")
    assert "After deltapack.patch: 1 model types exact after patching" in page and "1 refused" in page


@pytest.mark.parametrize("arch,layer,kwarg", [("bloom", "BloomBlock", "alibi"), ("mpt", "MptBlock", "position_bias")])
def test_alibi_bias_is_each_documents_own(arch: str, layer: str, kwarg: str):
    """The ALiBi bias a decoder layer receives for the packed stream is, document by document, bit for bit the bias
    it receives for the document alone (over the stream it would count positions along the whole row)."""
    model = _model(arch)
    block = next(m for m in model.modules() if type(m).__name__ == layer)
    seen: list[torch.Tensor] = []
    capture = lambda m, a, kw: seen.append(kw[kwarg])  # noqa: E731
    lengths = [5, 1, 7]
    docs = [torch.arange(3, 3 + n) for n in lengths]
    with torch.no_grad():
        handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            for d in docs:
                model(d[None], use_cache=False)
        finally:
            handle.remove()
        deltapack.patch(model)
        handle = block.register_forward_pre_hook(capture, with_kwargs=True)  # after deltapack's: sees its bias
        try:
            positions = torch.cat([torch.arange(n) for n in lengths])[None]
            model(torch.cat(docs)[None], position_ids=positions, use_cache=False)
        finally:
            handle.remove()
            deltapack.unpatch(model)
    alone, packed = seen[:3], seen[3]
    parts = packed[..., -sum(lengths) :].split(lengths, dim=-1)
    for want, got in zip(alone, parts):
        assert torch.equal(want[..., -got.shape[-1] :], got)


@pytest.mark.parametrize("arch", ["mistral", "gpt_oss"])
def test_gradient_checkpointing_keeps_documents_apart(arch: str):
    """Training mode with transformers' gradient checkpointing: the attention replayed in the backward pass still
    sees the batch's documents; gradients equal the sum of each document's gradients alone."""
    model = _model(arch)
    gen = torch.Generator().manual_seed(5)
    rows = [[torch.randint(3, 100, (n,), generator=gen).tolist() for n in (6, 1, 9)], [[5, 6, 7, 8]]]
    alone, packed, leaked = checkpointed_grads(model, rows)
    assert norm_rel(packed, alone) <= GRAD_RTOL
    assert norm_rel(leaked, alone) > 100 * GRAD_RTOL
