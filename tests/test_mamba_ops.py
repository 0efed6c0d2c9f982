"""The SSD and selective-scan references against a token-by-token float64 loop over each document alone.

Outputs and every input's gradient; awkward lengths (1, shorter than a chunk, chunk-aligned, ragged, long); the same
stream run as one document differs, so each test can tell a leak from an exact result.
"""

from __future__ import annotations

import pytest
import torch

from deltapack.ops import Segments, simple_gla_fla
from deltapack.ops.fallback import Fallback, KernelFailure
from deltapack.ops.selective_scan import selective_scan, selective_scan_ref
from deltapack.ops.ssd import (
    _choose_on_this_gpu,
    _gla_ref,
    gated_linear_attention_ref,
    ssd,
    ssd_ref,
    ssd_via_forward_kernel,
    ssd_via_gla,
)
from oracles import selective_scan_recurrent_ref, ssd_recurrent_ref

LENGTHS = {
    "one-token": [1],
    "short": [5, 1, 17],
    "chunk-aligned": [16, 16],
    "ragged": [15, 17, 1, 33],
    "long": [50, 3],
}
CHUNK = 16  # small chunks so the ids above cross chunk borders in every way


def segments_of(lengths):
    return Segments.from_cu_seqlens([0, *torch.tensor(lengths).cumsum(0).tolist()])


def check_against_each_document(fn, oracle, tokens, params, lengths):
    """fn on the packed stream vs oracle on each document alone (float64): outputs and every gradient.

    tokens: per-token inputs [1, T, ...] (sliced per document); params: per-layer inputs (their gradient is the sum
    over documents); fn / oracle: (tokens, params, segments) -> [1, T, ...].
    """
    segments = segments_of(lengths)
    out = fn(tokens, params, segments)
    weights = torch.randn_like(out)
    leaves = list(tokens.values()) + list(params.values())
    grads = torch.autograd.grad((out * weights).sum(), leaves)
    param_sums = [torch.zeros_like(p) for p in params.values()]
    cu = segments.cu_seqlens_host
    for a, b in zip(cu[:-1], cu[1:]):
        piece = {k: t.detach()[:, a:b].clone().requires_grad_() for k, t in tokens.items()}
        own = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
        ref = oracle(piece, own, segments_of([b - a]))
        torch.testing.assert_close(out[:, a:b], ref, rtol=0, atol=1e-9)
        ref_grads = torch.autograd.grad((ref * weights[:, a:b]).sum(), list(piece.values()) + list(own.values()))
        for g_packed, g_ref in zip(grads, ref_grads[: len(piece)]):
            torch.testing.assert_close(g_packed[:, a:b], g_ref, rtol=1e-8, atol=1e-9)
        for acc, g_ref in zip(param_sums, ref_grads[len(piece) :]):
            acc += g_ref
    for g_packed, g_ref in zip(grads[len(tokens) :], param_sums):
        torch.testing.assert_close(g_packed, g_ref, rtol=1e-8, atol=1e-9)
    if len(lengths) > 1:  # the same stream as one document leaks: the test can tell
        leaky = fn(tokens, params, segments_of([sum(lengths)]))
        assert (leaky - out).abs().max() > 1e-3


def bind(fn, positional, keywords, **fixed):
    """``fn`` as the (tokens, params, segments) -> [1, T, ...] that ``check_against_each_document`` calls: the inputs
    named ``positional`` in order, ``segments``, those named ``keywords`` by name, then ``fixed``."""

    def call(tokens, params, segments):
        inputs = {**tokens, **params}
        return fn(*(inputs[k] for k in positional), segments=segments, **{k: inputs[k] for k in keywords}, **fixed)

    return call


def _rnd(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()


def _decay(gen, *shape):  # long memory: a leak would show
    return (-torch.rand(*shape, generator=gen, dtype=torch.float64) * 0.2).requires_grad_()


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("name", list(LENGTHS))
def test_ssd_ref_matches_each_document_alone(name, groups):
    total, heads, head_dim, state = sum(LENGTHS[name]), 4, 3, 5
    gen = torch.Generator().manual_seed(0)
    tokens = dict(
        x=_rnd(gen, 1, total, heads, head_dim),
        dt=_rnd(gen, 1, total, heads),
        B=_rnd(gen, 1, total, groups, state),
        C=_rnd(gen, 1, total, groups, state),
    )
    params = dict(A=_decay(gen, heads), D=_rnd(gen, heads), dt_bias=_rnd(gen, heads))
    dt_kw = dict(dt_softplus=True, dt_limit=(0.01, 5.0))

    names = ("x", "dt", "A", "B", "C"), ("D", "dt_bias")
    chunked = bind(ssd_ref, *names, chunk_size=CHUNK, **dt_kw)
    check_against_each_document(chunked, bind(ssd_recurrent_ref, *names, **dt_kw), tokens, params, LENGTHS[name])


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("name", list(LENGTHS))
def test_selective_scan_ref_matches_each_document_alone(name, groups):
    total, channels, state = sum(LENGTHS[name]), 6, 4
    gen = torch.Generator().manual_seed(0)
    tokens = dict(
        u=_rnd(gen, 1, total, channels),
        delta=_rnd(gen, 1, total, channels),
        B=_rnd(gen, 1, total, groups, state),
        C=_rnd(gen, 1, total, groups, state),
        z=_rnd(gen, 1, total, channels),
    )
    params = dict(A=_decay(gen, channels, state), D=_rnd(gen, channels), delta_bias=_rnd(gen, channels))

    names = ("u", "delta", "A", "B", "C"), ("D", "z", "delta_bias")
    chunked = bind(selective_scan_ref, *names, delta_softplus=True, chunk_size=CHUNK)
    oracle = bind(selective_scan_recurrent_ref, *names, delta_softplus=True)
    check_against_each_document(chunked, oracle, tokens, params, LENGTHS[name])


def test_selective_scan_in_channel_blocks_equals_one_block():
    """A wide layer runs in checkpointed blocks of channels: same outputs and gradients as one block."""
    lengths = LENGTHS["ragged"]
    total, channels, state, groups = sum(lengths), 6, 4, 2
    gen = torch.Generator().manual_seed(3)
    u, delta, z = (_rnd(gen, 1, total, channels) for _ in range(3))
    A, B, C = _decay(gen, channels, state), _rnd(gen, 1, total, groups, state), _rnd(gen, 1, total, groups, state)
    leaves = [u, delta, A, B, C, z]
    kw = dict(segments=segments_of(lengths), z=z, delta_softplus=True, chunk_size=CHUNK)
    whole = selective_scan_ref(u, delta, A, B, C, **kw)
    blocked = selective_scan_ref(u, delta, A, B, C, max_elements=total * state * 4, **kw)  # blocks of 4, then 2
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-12)
    weights = torch.randn_like(whole)
    for g_b, g_w in zip(
        torch.autograd.grad((blocked * weights).sum(), leaves), torch.autograd.grad((whole * weights).sum(), leaves)
    ):
        torch.testing.assert_close(g_b, g_w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["short", "ragged"])
def test_ssd_backward_built_from_forward_calls(name):
    """The CUDA backend's backward (three more forward calls, gates reversed in time) equals autograd's, with the
    reference's core standing in for the kernel."""
    lengths = LENGTHS[name]
    total, heads, head_dim, state = sum(lengths), 4, 3, 5
    gen = torch.Generator().manual_seed(2)
    x, dt = _rnd(gen, 1, total, heads, head_dim), _rnd(gen, 1, total, heads)
    B, C = _rnd(gen, 1, total, 2, state), _rnd(gen, 1, total, 2, state)
    A, D = _decay(gen, heads), _rnd(gen, heads)
    leaves = [x, dt, A, B, C, D]

    def kernel(q, k, v, g, segments):
        return gated_linear_attention_ref(q[0], k[0], v[0], g[0], segments, CHUNK).unsqueeze(0)

    segments = segments_of(lengths)
    kw = dict(segments=segments, D=D, dt_softplus=True)
    fast = ssd_via_forward_kernel(x, dt, A, B, C, forward_kernel=kernel, **kw)
    ref = ssd_ref(x, dt, A, B, C, chunk_size=CHUNK, **kw)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-10)
    weights = torch.randn_like(ref)
    for g_fast, g_ref in zip(
        torch.autograd.grad((fast * weights).sum(), leaves), torch.autograd.grad((ref * weights).sum(), leaves)
    ):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-9)


def test_public_ops_run_the_reference_on_the_cpu_and_refuse_bad_input():
    gen = torch.Generator().manual_seed(1)
    segments = segments_of([3, 4])
    x, dt = torch.randn(1, 7, 2, 3, generator=gen), torch.randn(1, 7, 2, generator=gen)
    A, B, C = (
        -torch.rand(2, generator=gen),
        torch.randn(1, 7, 1, 4, generator=gen),
        torch.randn(1, 7, 1, 4, generator=gen),
    )
    assert torch.equal(ssd(x, dt, A, B, C, segments=segments), ssd_ref(x, dt, A, B, C, segments=segments))
    with pytest.raises(RuntimeError, match="CUDA"):
        ssd(x, dt, A, B, C, segments=segments, backend="fla")  # asked for by name and cannot run: raises
    with pytest.raises(ValueError, match="B must be"):
        ssd(x, dt, A, B[:, :6], C, segments=segments)
    with pytest.raises(ValueError, match="packed stream"):
        ssd(x, dt, A, B, C, segments=segments_of([3, 3]))
    u, delta = torch.randn(1, 7, 4, generator=gen), torch.randn(1, 7, 4, generator=gen)
    A1 = -torch.rand(4, 4, generator=gen)
    assert torch.equal(
        selective_scan(u, delta, A1, B, C, segments=segments), selective_scan_ref(u, delta, A1, B, C, segments=segments)
    )
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(u, delta, A1[:3], B, C, segments=segments)
    with pytest.raises(ValueError, match="unknown deltapack backend"):
        selective_scan(u, delta, A1, B, C, segments=segments, backend="fla")


def test_simple_gla_plan_of_the_segments():
    """The FLA plan of a batch: chunk offsets and indices for 64-token chunks (every document starts a chunk),
    built once per batch."""
    segments = segments_of([1, 64, 65, 130, 3])
    plan = simple_gla_fla.plan_of(segments)
    assert plan is simple_gla_fla.plan_of(segments)
    assert plan.num_docs == 5 and plan.num_chunks == 8
    assert plan.chunk_offsets.tolist() == [0, 1, 2, 4, 7, 8]
    assert plan.chunk_indices.tolist() == [[0, 0], [1, 0], [2, 0], [2, 1], [3, 0], [3, 1], [3, 2], [4, 0]]
    assert plan.cu_seqlens.dtype == plan.chunk_indices.dtype == plan.chunk_offsets.dtype == torch.int32


def test_ssd_fast_path_computes_in_fp32_for_bf16_inputs():
    """The CUDA path hands its kernels fp32 q, k, v, g whatever the input dtype (the kernels' backward needs fp32 on
    Hopper, and a bf16 v = dt * x would add a rounding the reference does not make): with the reference's core as the
    kernel, bf16 inputs give the reference's own result."""
    lengths = LENGTHS["ragged"]
    total, heads, head_dim, state = sum(lengths), 4, 3, 5
    gen = torch.Generator().manual_seed(4)
    x, dt = _rnd(gen, 1, total, heads, head_dim).bfloat16(), _rnd(gen, 1, total, heads).bfloat16()
    B, C = _rnd(gen, 1, total, 2, state).bfloat16(), _rnd(gen, 1, total, 2, state).bfloat16()
    A, D = _decay(gen, heads).float(), _rnd(gen, heads).float()
    seen = []

    def gla(q, k, v, g, segments):
        seen.append({t.dtype for t in (q, k, v, g)})
        return gated_linear_attention_ref(q[0], k[0], v[0], g[0], segments, 64).unsqueeze(0)

    kw = dict(segments=segments_of(lengths), D=D, dt_softplus=True)
    fast = ssd_via_gla(x, dt, A, B, C, gla=gla, **kw)
    assert seen == [{torch.float32}] and fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast, ssd_ref(x, dt, A, B, C, chunk_size=64, **kw), rtol=0, atol=0)


def test_ssd_fla_strategy_falls_back_to_the_next_that_passes(caplog):
    """The fla backend's first-use check: a strategy that raises or is off is logged and skipped; the first that
    matches the reference is used; none passing raises (the dispatcher then runs the reference)."""

    def raises(q, k, v, g, segments):
        raise RuntimeError("no kernel here")

    def off(q, k, v, g, segments):
        return _gla_ref(q, k, v, g, segments) * 1.1

    works = _gla_ref
    with caplog.at_level("INFO", logger="deltapack"):
        candidates = (("a", raises, raises), ("b", off, off), ("c", works, works))
        chosen = _choose_on_this_gpu(candidates, device="cpu", more_documents=0)
    assert chosen is works
    assert "cannot use a" in caplog.text and "cannot use b" in caplog.text and "runs c" in caplog.text
    with pytest.raises(RuntimeError, match="no kernel here"):
        _choose_on_this_gpu((("a", raises, raises), ("b", off, off)), device="cpu", more_documents=0)


def test_simple_gla_backward_failure_at_run_time_falls_back_to_the_reference(monkeypatch):
    """A backward kernel that raises mid-training is recorded once and that backward is computed by the reference:
    the gradients equal the reference's, no crash."""
    lengths = LENGTHS["ragged"]
    total, heads, dim = sum(lengths), 4, 3
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, total, 2, dim, generator=gen), torch.randn(1, total, 2, dim, generator=gen)
    v, g = torch.randn(1, total, heads, dim, generator=gen), -torch.rand(1, total, heads, generator=gen)
    segments = segments_of(lengths)

    def kernel_forward(q, k, v, g, plan):  # stands in for FLA's forward (the reference's own result)
        return _gla_ref(q, k, v, g, segments), g

    def kernel_backward(*_):
        raise RuntimeError("backward kernel broke")

    monkeypatch.setattr(simple_gla_fla, "_forward", kernel_forward)
    monkeypatch.setattr(simple_gla_fla, "_backward", kernel_backward)
    failure = KernelFailure("a test kernel", "the SSD scan")
    leaves = [t.requires_grad_() for t in (q, k, v, g)]
    out = simple_gla_fla.simple_gla(*leaves, segments, fallback=Fallback(failure, _gla_ref))
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), leaves)
    want = torch.autograd.grad((_gla_ref(*leaves, segments) * weights).sum(), leaves)
    assert failure and "backward kernel broke" in failure.reason
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="backward kernel broke"):  # without a failure record: it raises
        out = simple_gla_fla.simple_gla(*leaves, segments)
        torch.autograd.grad(out.sum(), leaves)
