"""minimax, recurrent_gemma, rwkv and xlstm under deltapack.patch: packed documents give each document's logits and
gradients alone, the unpatched model leaks on the same input, and unpacked calls (generate() included) are untouched.

Also each family's packed layer forward against the transformers layer itself: on one document they agree, on a
packed stream each document's rows and input gradients equal the layer run on that document alone."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given

from deltapack.audit import audit
from deltapack.boundaries import Boundaries
from deltapack.models.layers import packed_layer_of
from deltapack.tiny import tiny_model
from helpers import (
    assert_packed_grads_equal_alone,
    assert_packed_logits_equal_alone,
    packed_examples,
    patched,
    random_docs,
)
from packing import build, max_doc_diff

ARCHS = ("minimax", "recurrent_gemma", "rwkv", "xlstm")
WITH_ATTENTION = ("minimax", "recurrent_gemma")  # the others have no attention (transformers refuses sdpa)
EXACT = 1e-5
LEAK = 1e-3


@functools.lru_cache(maxsize=8)
def model_of(arch: str, attn: str = "sdpa"):
    """A tiny fp32 model (long memory); each test leaves it unpatched, in eval mode, without grads."""
    return tiny_model(arch, attn_implementation=attn if arch in WITH_ATTENTION else "eager")


def alone_logits(model, docs):
    with torch.no_grad():
        return [model(torch.tensor([d]), use_cache=False).logits[0] for d in docs]


# ------------------------------------------------------------------------------------------------ the layers alone
LAYER_CALLS = {  # how the transformers layer is called on [1, n, D] without any cache
    "MiniMaxLightningAttention": lambda layer, x: layer(x, None, None)[0],
    "RecurrentGemmaRecurrentBlock": lambda layer, x: layer(x, torch.arange(x.shape[1])[None], None, use_cache=False)[0],
    "RwkvSelfAttention": lambda layer, x: layer(x)[0],
    "RwkvFeedForward": lambda layer, x: layer(x)[0],
    "xLSTMLayer": lambda layer, x: layer(x)[0],
}
LAYER_ARCH = {
    "MiniMaxLightningAttention": "minimax",
    "RecurrentGemmaRecurrentBlock": "recurrent_gemma",
    "RwkvSelfAttention": "rwkv",
    "RwkvFeedForward": "rwkv",
    "xLSTMLayer": "xlstm",
}


@pytest.mark.parametrize("cls", list(LAYER_CALLS))
def test_packed_layer_forward_equals_the_transformers_layer(cls):
    model = model_of(LAYER_ARCH[cls])
    layer = next(m for m in model.modules() if type(m).__name__ == cls)
    forward, call = packed_layer_of(layer).forward, LAYER_CALLS[cls]
    lengths = [1, 7, 20, 3, 37]  # across the 8- and 16-token blocks / chunks of the tiny configs
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    x = torch.randn(1, cu[-1], model.config.hidden_size, requires_grad=True)
    with torch.no_grad():  # one document: the same output as the layer
        one = forward(layer, x, Boundaries.from_cu_seqlens([0, cu[-1]], (1, cu[-1])))[0]
        torch.testing.assert_close(one, call(layer, x), rtol=0, atol=EXACT)
        leaky = call(layer, x)
    out = forward(layer, x, Boundaries.from_cu_seqlens(cu, (1, cu[-1])))[0]
    weights = torch.randn_like(out)
    (dx,) = torch.autograd.grad((out * weights).sum(), x)
    worst_leak = 0.0
    for a, b in zip(cu[:-1], cu[1:]):
        piece = x.detach()[:, a:b].clone().requires_grad_()
        alone = call(layer, piece)
        torch.testing.assert_close(out[:, a:b], alone, rtol=0, atol=EXACT)
        (dx_alone,) = torch.autograd.grad((alone * weights[:, a:b]).sum(), piece)
        assert ((dx[:, a:b] - dx_alone).norm() / dx_alone.norm()).item() <= 1e-4
        worst_leak = max(worst_leak, (leaky[:, a:b] - out[:, a:b]).abs().max().item())
    assert worst_leak > LEAK  # the layer on the packed stream as one sequence leaks


# ------------------------------------------------------------------------------------------------ whole models
@given(**packed_examples(ARCHS))
def test_packed_logits_equal_alone(rows, fmt, arch, attn, pad_left, extra_pad, seed):
    model = model_of(arch, attn)
    assert_packed_logits_equal_alone(  # this module's alone_logits: each document alone, without a cache
        model, rows, fmt, seed=seed, pad_left=pad_left, extra_pad=extra_pad, alone_fn=alone_logits
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_rows_are_exact(arch):
    """One document per row, padded on the left: rwkv, xlstm and recurrent_gemma read the padding into their
    recurrence unpatched (minimax masks it); patched, every row is exact."""
    model = model_of(arch)
    packed = build([[d] for d in random_docs([7, 2, 11], seed=8)], "padding_mask", pad_left=True)
    alone = alone_logits(model, packed.docs)
    with torch.no_grad():
        leaky = max_doc_diff(model(**packed.kwargs, use_cache=False).logits, packed, alone)
    assert (leaky > LEAK) == (arch != "minimax")
    with patched(model), torch.no_grad():
        assert max_doc_diff(model(**packed.kwargs).logits, packed, alone) <= EXACT


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_gradient_equals_sum_of_alone(arch):
    model = model_of(arch)
    packed = build([random_docs([6, 1, 9], seed=3), random_docs([4, 8], seed=4)], "indexed_mask", extra_pad=2)
    assert_packed_grads_equal_alone(model, packed, use_cache=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_unpacked_calls_and_generate_are_bit_identical(arch):
    model = model_of(arch)
    ids = torch.tensor([random_docs([9], seed=6)[0], random_docs([9], seed=7)[0]])
    with torch.no_grad():
        before = model(ids).logits
        generated = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    with patched(model), torch.no_grad():
        assert torch.equal(model(ids).logits, before)
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)).logits, before)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=5, do_sample=False), generated)


@pytest.mark.parametrize("arch", ARCHS)
def test_audit_is_exact_after_patching(arch):
    """``deltapack audit --arch <arch>``: every format exact forward and gradient when patched; unpatched leaks."""
    report = audit(arch)
    assert report.patch_supported and report.audited == "patched"
    assert report.states["unpatched"].verdict(report.atol, report.grad_rtol) == "leaks"
    for name, result in report.states["patched"].formats.items():
        assert result.raised is None, (name, result.raised)
        assert result.worst() <= EXACT and result.grad_rel is not None and result.grad_rel <= 1e-4, name
    assert report.verdict() == "exact" and report.exit_code() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_training_with_gradient_checkpointing_is_exact(arch):
    """Train mode, activation checkpointing (layers replayed in the backward): packed gradients = sum over alone."""
    model = tiny_model(arch, attn_implementation="sdpa" if arch in WITH_ATTENTION else "eager").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed = build([random_docs([6, 1, 9], seed=9), random_docs([4, 8], seed=10)], "indexed_mask", extra_pad=2)
    assert_packed_grads_equal_alone(model, packed, use_cache=False)


def test_xlstm_chunked_inference_over_a_packed_stream_raises():
    """xLSTMModel feeds long inputs in eval mode in pieces with a carried state: packed, that would be wrong."""
    model = tiny_model("xlstm", attn_implementation="eager")
    model.config.max_inference_chunksize = 8
    packed = build([random_docs([6, 9], seed=11)], "indexed_mask")
    with patched(model), torch.no_grad(), pytest.raises(ValueError, match="max_inference_chunksize"):
        model(**packed.kwargs)
