"""The GPU attention plan (varlen / flex, no [T, T] mask) on tiny attention models: packed == each document alone.

Each model runs in bf16 on the packed stream inside a packing scope (the attention hooks on, the model registered
for the plan) and alone through the original model; both are compared with the document alone in fp32, and the
packed error may be at most twice the error of bf16 alone plus a small floor (bf16 noise, not a leak: a leak is
orders of magnitude larger, as the unscoped check shows). The plan each layer ran is checked too.
"""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import rel_err, requires_cuda
from transformers import AutoConfig, AutoModelForCausalLM

from deltapack.audit import shrink
from deltapack.boundaries import Boundaries
from deltapack.models import attention_hooks, attention_plan
from deltapack.models.scope import packing_scope

pytestmark = [pytest.mark.gpu, requires_cuda]

LENGTHS = (1, 3, 63, 64, 65, 200, 17, 130)

# (model type, attention implementation, config overrides, the plan its layers must take)
CASES = (
    ("llama", "sdpa", {}, {"varlen"}),
    ("deepseek_v3", "sdpa", {}, {"varlen"}),  # multi-head latent attention: own value head size
    ("mistral", "sdpa", {"sliding_window": 24}, {"flex"}),
    ("gemma3_text", "sdpa", {"sliding_window": 24}, {"varlen", "flex"}),  # full and sliding layers
    ("gemma2", "flex_attention", {"sliding_window": 24}, {"flex"}),  # logit soft-capping
    ("gpt_oss", "flex_attention", {"sliding_window": 24}, {"flex"}),  # sinks + sliding window
    ("llama4_text", "sdpa", {"attention_chunk_size": 32}, {"varlen", "flex"}),  # chunked layers
)


def _model(arch: str, impl: str, overrides: dict) -> torch.nn.Module:
    config, _ = shrink.shrink_config(AutoConfig.for_model(arch), arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl).cuda().eval()


def _run(model, docs, bounds, scoped: bool, impl: str = "eager"):
    """(per-document logits, parameter gradients) of the packed stream on ``impl``, or of each document alone on
    eager attention (the exact math: the unpatched flex path failed to compile a tiny config on an H200)."""
    model.zero_grad()
    model.set_attn_implementation(impl if scoped else "eager")
    if scoped:
        ids = torch.cat(docs)[None]
        with packing_scope(bounds):
            logits = model(ids, position_ids=bounds.position_ids, use_cache=False).logits[0]
        logits.float().square().mean(-1).sum().backward()
        parts = list(logits.split(list(LENGTHS)))
    else:
        parts = []
        for d in docs:
            out = model(d[None], use_cache=False).logits[0]
            out.float().square().mean(-1).sum().backward()
            parts.append(out)
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return torch.cat([p.detach().float() for p in parts]), grads


@pytest.mark.parametrize("arch,impl,overrides,plans", CASES, ids=[c[0] for c in CASES])
def test_gpu_plan_packed_equals_alone(arch, impl, overrides, plans, caplog):
    attention_hooks.install()
    model = _model(arch, impl, overrides)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, min(vocab, 1000), (n,), generator=gen).cuda() for n in LENGTHS]
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None].cuda()
    bounds = Boundaries.from_position_ids(positions)
    ref_logits, ref_grads = _run(model, docs, bounds, scoped=False)  # fp32 alone
    model.to(torch.bfloat16)
    alone_logits, alone_grads = _run(model, docs, bounds, scoped=False)
    assert attention_plan.register_model(model)
    attention_plan._logged.clear()
    try:
        with caplog.at_level("INFO", logger="deltapack"):
            packed_logits, packed_grads = _run(model, docs, bounds, scoped=True, impl=impl)
        model.set_attn_implementation("eager")
        with torch.no_grad():
            leak = model(torch.cat(docs)[None], use_cache=False).logits[0].float()  # no scope: documents mix
    finally:
        attention_plan.unregister_model(model)
    used = {p for p in attention_plan.PLANS if any(f"on the {p} plan" in r.getMessage() for r in caplog.records)}
    assert used == plans
    floor = 1e-3
    assert rel_err(packed_logits, ref_logits) <= 2 * rel_err(alone_logits, ref_logits) + floor
    assert rel_err(packed_grads, ref_grads) <= 2 * rel_err(alone_grads, ref_grads) + floor
    assert rel_err(leak, ref_logits) > 10 * (rel_err(alone_logits, ref_logits) + floor)


@pytest.mark.parametrize(
    "arch,overrides,impl",
    [("llama", {}, "sdpa"), ("mistral", {"sliding_window": 24}, "sdpa"), ("gpt2", {}, "sdpa"), ("llama", {}, "eager")],
)
def test_patched_model_indexed_mask_on_gpu(arch, overrides, impl, caplog):
    """deltapack.patch on CUDA, bf16: an indexed mask with two rows and padding, logits per document vs alone; eager
    attention keeps the exact dense mask and says so once (docs/gpu.md)."""
    import deltapack

    attention_plan._logged.clear()
    model = _model(arch, impl, overrides)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(1)
    rows = [[150, 1, 64], [3, 200]]
    width = max(sum(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    doc_ids = torch.zeros_like(ids)
    places = []
    for r, row in enumerate(rows):
        col = 0
        for n, length in enumerate(row):
            ids[r, col : col + length] = torch.randint(0, min(vocab, 1000), (length,), generator=gen)
            doc_ids[r, col : col + length] = n + 1
            places.append((r, col, length))
            col += length
    ids, doc_ids = ids.cuda(), doc_ids.cuda()
    with torch.no_grad():
        ref = [model(ids[r : r + 1, c : c + n]).logits[0] for r, c, n in places]  # fp32 alone
        model.to(torch.bfloat16)
        alone = [model(ids[r : r + 1, c : c + n]).logits[0].float() for r, c, n in places]
        deltapack.patch(model)
        try:
            with caplog.at_level("INFO", logger="deltapack"):
                packed = model(ids, attention_mask=doc_ids).logits.float()
        finally:
            deltapack.unpatch(model)
        leak = model(ids, attention_mask=(doc_ids > 0).long()).logits.float()  # unpatched: documents of a row mix
    dense_warning = [r for r in caplog.records if "eager attention on a GPU keeps an exact dense" in r.getMessage()]
    assert len(dense_warning) == (1 if impl == "eager" else 0)
    assert all(r.levelname == "WARNING" for r in dense_warning)
    got = torch.cat([packed[r, c : c + n] for r, c, n in places])
    noise = torch.cat(alone)
    want = torch.cat(ref)
    leaked = torch.cat([leak[r, c : c + n] for r, c, n in places])
    assert rel_err(got, want) <= 2 * rel_err(noise, want) + 1e-3
    assert rel_err(leaked, want) > 10 * (rel_err(noise, want) + 1e-3)
