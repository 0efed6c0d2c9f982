"""The inkling family (inkling_text, inkling2_text, inkling2_loop_text): residual short convs around attention and
MLP, log-scaled queries at per-document positions. Whole tiny models: packed documents give the logits and
gradients of each document alone after ``deltapack.patch`` (every input format, B > 1 with padding on either side,
sdpa and eager, activation checkpointing), the unpatched model leaks on the same input; without packing
information the patched model is bit-identical, ``generate()`` included. Layers: each packed forward against the
unpatched transformers layer on each document alone, outputs and gradients."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from transformers import __version__

from deltapack import Boundaries
from deltapack.audit import audit
from deltapack.models.families import inkling
from deltapack.models.scope import packing_scope
from deltapack.tiny import tiny_model
from helpers import (
    EXACT,
    LEAK,
    alone_logits,
    assert_packed_docs_exact,
    assert_packed_grads_equal_alone,
    assert_packed_logits_equal_alone,
    assert_padding_only_exact,
    assert_unpacked_bit_identical,
    enable_checkpointing,
    norm_rel,
    packed_examples,
    patched,
)
from helpers import installed as buildable
from packing import build, max_doc_diff

ALL_ARCHS = tuple(inkling.TINY)
ARCHS = buildable(ALL_ARCHS)  # transformers 5.17 has inkling_text only (CI also runs it)
PARAMS = [
    pytest.param(a, marks=pytest.mark.skipif(a not in ARCHS, reason=f"transformers {__version__} has no {a}"))
    for a in ALL_ARCHS
]


@functools.lru_cache(maxsize=8)
def model_of(arch: str, attn: str = "sdpa"):
    return tiny_model(arch, attn_implementation=attn)  # inkling2 takes eager only: tiny_model falls back to it


def random_docs(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=gen).tolist() for n in lengths]  # 0-2: pad, bos, eos


@settings(max_examples=8, deadline=None)
@given(**packed_examples(ARCHS or ("inkling_text",), max_length=10, max_docs=3, max_rows=2))
def test_packed_logits_equal_alone(rows, arch, attn, fmt, pad_left, extra_pad, seed):
    model = model_of(arch, attn)
    assert_packed_logits_equal_alone(model, rows, fmt, seed=seed, pad_left=pad_left, extra_pad=extra_pad)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", PARAMS)
def test_every_arch_is_exact_with_padding_on_both_sides(arch, attn):
    """B = 2, one-token documents, documents longer than the 6-token window and the log-scaling floor of 4."""
    model = model_of(arch, attn)
    if model.config._attn_implementation != attn:
        pytest.skip(f"{arch} runs {model.config._attn_implementation} attention only")
    rows = [random_docs([6, 1, 9], seed=1), random_docs([1, 4, 8], seed=2)]
    for fmt, pad_left in (("indexed_mask", True), ("position_ids", False), ("cu_seqlens", True)):
        assert_packed_docs_exact(model, rows, fmt, pad_left=pad_left, extra_pad=2)


@pytest.mark.parametrize("pad_left", [False, True])
@pytest.mark.parametrize("arch", PARAMS)
def test_padding_only_is_exact(arch, pad_left):
    """One document per row: exact on either side (left padding shifts transformers' log-scaling positions, so
    deltapack unpads such batches too)."""
    model = model_of(arch)
    assert_padding_only_exact(model, random_docs([7, 3, 11], seed=2), pad_left)


@pytest.mark.parametrize("arch", PARAMS)
def test_packed_gradient_equals_sum_of_alone(arch):
    model = model_of(arch)
    packed = build([random_docs([6, 1, 9], seed=3), random_docs([4, 8], seed=4)], "indexed_mask", extra_pad=2)
    assert_packed_grads_equal_alone(model, packed)


@pytest.mark.parametrize("arch", PARAMS)
def test_training_with_gradient_checkpointing_is_exact(arch):
    """Train mode (no dropout), activation checkpointing: the layers are replayed in the backward pass."""
    model = tiny_model(arch).train()
    enable_checkpointing(model, use_reentrant=False)
    packed = build([random_docs([6, 1, 9], seed=9), random_docs([4, 8], seed=10)], "indexed_mask", extra_pad=2)
    assert_packed_grads_equal_alone(model, packed, use_cache=False)


@pytest.mark.parametrize("arch", PARAMS)
def test_unpacked_calls_are_bit_identical_generate_included(arch):
    ids = torch.tensor([random_docs([7], seed=5)[0], random_docs([7], seed=6)[0]])
    assert_unpacked_bit_identical(model_of(arch), ids)


@pytest.mark.parametrize("arch", PARAMS)
def test_audit_is_exact_after_patching(arch):
    report = audit(arch, gradient=False)
    assert report.audited == "patched", report.patch_error
    assert report.verdict() == "exact" and report.exit_code() == 0
    assert report.states["unpatched"].formats


# ------------------------------------------------------------------------------------------------ single layers
LENGTHS = [5, 1, 9, 4, 1, 12]


def segments(lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return Boundaries.from_cu_seqlens(cu, (1, sum(lengths)))


def layers_of(arch):
    """(conv, its packed forward) for the first residual conv of each kind, and inkling's log-scaled attention."""
    model = model_of(arch)
    found = {}
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("ShortConvolution") and "Dynamic" not in name:
            scaled = name != "InklingShortConvolution"
            found.setdefault(name, (module, functools.partial(inkling.packed_residual_conv_forward, scaled=scaled)))
        elif name == "InklingAttention" and not module.is_sliding:
            found.setdefault(name, (module, inkling.packed_attention_forward))
        elif name.endswith("KeyValueProjection") and "Dynamic" in type(module.sconv).__name__:
            found.setdefault(name, (module, inkling.packed_key_value_forward))
    return list(found.values())


def first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("arch", PARAMS)
def test_packed_layers_equal_the_unpatched_layer_per_document(arch):
    bounds = segments(LENGTHS)
    with patched(model_of(arch)):  # the attention's own convs run packed too; outside a scope, as transformers'
        for layer, forward in layers_of(arch):
            check_layer(layer, forward, bounds, model_of(arch).config.hidden_size)


def check_layer(layer, forward, bounds, hidden_size):
    """``forward`` on the stream vs ``layer`` on each document alone: outputs, input gradients, and the leak of
    ``layer`` run on the whole stream."""
    name = type(layer).__name__
    extra = {"attention_mask": None} if "Attention" in name else {}  # sdpa, no mask: causal, as for a document alone
    width = layer.conv1d.in_channels if hasattr(layer, "conv1d") else hidden_size
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, bounds.total_tokens, width, generator=gen, requires_grad=True)
    with packing_scope(bounds):
        packed = first(forward(layer, x, bounds))
    weights = torch.randn(packed.shape, generator=gen)
    (dx_packed,) = torch.autograd.grad((packed * weights).sum(), x)
    host = bounds.cu_seqlens_host
    alone, dx_alone = [], []
    for a, b in zip(host[:-1], host[1:]):
        piece = x.detach()[:, a:b].clone().requires_grad_()
        out = first(layer(piece, **extra))
        (dx,) = torch.autograd.grad((out * weights[..., a:b, :]).sum(), piece)
        alone.append(out.detach())
        dx_alone.append(dx)
    alone_ref = torch.cat(alone, dim=packed.dim() - 2)  # [1, T, C] or [1, heads, T, head_dim]
    assert (packed.detach() - alone_ref).abs().max() <= EXACT, name
    assert norm_rel(dx_packed, torch.cat(dx_alone, dim=1)) <= 1e-4, name
    with torch.no_grad():  # the unpatched layer over the same stream mixes documents: the test can fail
        assert (first(layer(x, **extra)) - alone_ref).abs().max() > LEAK * alone_ref.abs().max(), name


@pytest.mark.skipif("inkling_text" not in ARCHS, reason=f"transformers {__version__} has no inkling_text")
def test_gpu_attention_plan_keeps_the_relative_position_bias(monkeypatch):
    """The GPU plan on the CPU, a varlen kernel offered as on a GPU: inkling's attention adds a relative position
    bias to its scores, which the varlen kernel cannot take, so its layers run the exact dense mask."""
    import deltapack.ops.attention as attention_ops
    from deltapack.models import attention_plan

    monkeypatch.setattr(attention_plan, "PLAN_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention_plan, "_flex_available", lambda: False)
    monkeypatch.setattr(attention_ops, "resolve_attention_backend", lambda *args, **kwargs: "varlen stand-in")
    plans = []
    choose = attention_plan.choose_plan
    monkeypatch.setattr(attention_plan, "choose_plan", lambda *args: plans.append(choose(*args)[0]) or (plans[-1], ""))
    model = model_of("inkling_text")
    packed = build([random_docs([6, 1, 9], seed=11), random_docs([4, 8], seed=12)], "indexed_mask", extra_pad=1)
    alone = alone_logits(model, packed.docs)
    with patched(model), torch.no_grad():
        logits = model(**packed.kwargs).logits
    assert plans and set(plans) == {"dense"}
    assert max_doc_diff(logits, packed, alone) <= EXACT
