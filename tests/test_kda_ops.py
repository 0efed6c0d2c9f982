"""The KDA reference against independent oracles, one document at a time: a token-by-token recurrence in fp64 and
transformers' own torch KDA (kimi_linear) on each document alone; outputs, final states and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention

from deltapack.ops import Segments
from deltapack.ops.fallback import KernelFailure
from deltapack.ops.kda import kda, kda_ref
from oracles import kda_recurrent_ref

LENGTHS = {
    "one-token": [1],
    "short": [5, 1, 17],
    "chunk-aligned": [16, 16, 64],
    "ragged": [15, 17, 1, 70],
    "long": [140, 3],
}


def segments(lengths):
    return Segments.from_cu_seqlens([0, *torch.tensor(lengths).cumsum(0).tolist()])


def kda_inputs(total, heads=2, ratio=1, k=8, v=6, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hv = heads * ratio
    q = torch.randn(1, total, heads, k, generator=gen, dtype=dtype)
    kk = torch.randn(1, total, heads, k, generator=gen, dtype=dtype)
    vv = torch.randn(1, total, hv, v, generator=gen, dtype=dtype)
    g = -torch.rand(1, total, hv, k, generator=gen, dtype=dtype) * 0.05  # long memory: a leak would show
    g[..., 0] = -3.0  # one fast-forgetting channel per head as well
    beta = torch.rand(1, total, hv, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (q, kk, vv, g, beta)]


@pytest.mark.parametrize("ratio", [1, 2])
@pytest.mark.parametrize("name", list(LENGTHS))
def test_kda_ref_matches_recurrence_per_document_fp64(name, ratio):
    lengths = LENGTHS[name]
    inputs = kda_inputs(sum(lengths), ratio=ratio, dtype=torch.float64)
    seg = segments(lengths)
    out, final = kda_ref(*inputs, segments=seg, output_final_state=True)
    weights = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weights).sum(), inputs)
    bounds = seg.cu_seqlens_host
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece = [x.detach()[:, a:b].clone().requires_grad_() for x in inputs]
        alone = kda_recurrent_ref(*piece, segments=segments([b - a]))
        torch.testing.assert_close(out[:, a:b].double(), alone, rtol=0, atol=1e-5)
        g_alone = torch.autograd.grad((alone * weights[:, a:b]).sum(), piece)
        for g_packed, g_ref in zip(grads, g_alone):
            torch.testing.assert_close(g_packed[:, a:b], g_ref, rtol=1e-4, atol=1e-6)
        assert final[n].shape == (inputs[2].shape[2], inputs[0].shape[3], inputs[2].shape[3])
    if len(lengths) > 1:  # the same stream as one sequence leaks: the test can tell
        leaky, _ = kda_ref(*[x.detach() for x in inputs], segments=segments([sum(lengths)]))
        assert (leaky - out).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["short", "ragged", "long"])
def test_kda_ref_matches_transformers_per_document(name):
    """transformers' torch KDA (64-token chunks, its own L2 norm) on each document alone; final states too."""
    lengths = LENGTHS[name]
    inputs = kda_inputs(sum(lengths), seed=1)
    seg = segments(lengths)
    out, final = kda_ref(*inputs, segments=seg, output_final_state=True)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    bounds = seg.cu_seqlens_host
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece = [x.detach()[:, a:b].clone().requires_grad_() for x in inputs]
        alone, state = chunk_kimi_delta_attention(
            *piece[:3], g=piece[3], beta=piece[4], output_final_state=True, use_qk_l2norm_in_kernel=True
        )
        torch.testing.assert_close(out[:, a:b], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(final[n], state[0], rtol=0, atol=1e-5)
        g_alone = torch.autograd.grad((alone * weights[:, a:b]).sum(), piece)
        for g_packed, g_ref in zip(grads, g_alone):
            torch.testing.assert_close(g_packed[:, a:b], g_ref, rtol=1e-4, atol=1e-5)


def test_chunk_size_does_not_change_the_result():
    lengths = [3, 70, 1, 9]
    inputs = [x.detach() for x in kda_inputs(sum(lengths), seed=2)]
    seg = segments(lengths)
    base, _ = kda_ref(*inputs, segments=seg, chunk_size=16)
    for chunk in (1, 7, 64):
        other, _ = kda_ref(*inputs, segments=seg, chunk_size=chunk)
        torch.testing.assert_close(other, base, rtol=0, atol=1e-5)


def test_strong_decay_stays_finite():
    """A decay of -60 per step (exp(-60 * 16) underflows): the pairwise form never overflows."""
    inputs = [x.detach() for x in kda_inputs(40, seed=3)]
    inputs[3] = torch.full_like(inputs[3], -60.0)
    out, _ = kda_ref(*inputs, segments=segments([40]))
    assert torch.isfinite(out).all()
    alone = kda_recurrent_ref(*[x.double() for x in inputs], segments=segments([40]))
    torch.testing.assert_close(out.double(), alone, rtol=0, atol=1e-5)


def test_public_op_on_cpu_runs_the_reference_and_validates():
    lengths = [4, 1, 6]
    inputs = [x.detach() for x in kda_inputs(sum(lengths), seed=4)]
    seg = segments(lengths)
    torch.testing.assert_close(kda(*inputs, segments=seg)[0], kda_ref(*inputs, segments=seg)[0], rtol=0, atol=0)
    q, k, v, g, beta = inputs
    with pytest.raises(ValueError, match="per-channel decay"):
        kda(q, k, v, g[..., 0], beta, segments=seg)
    with pytest.raises(ValueError, match="one packed stream"):
        kda(q[0], k, v, g, beta, segments=seg)
    with pytest.raises(ValueError, match="T = 10"):
        kda(*inputs, segments=segments([4, 1, 5]))
    with pytest.raises(RuntimeError, match="fla"):
        kda(*inputs, segments=seg, backend="fla")


class _RaisesInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("a kernel refused its backward")


@pytest.mark.parametrize("stage", ["forward", "backward"])
def test_a_kernel_that_raises_falls_back_to_the_reference_once(stage, monkeypatch):
    """The FLA path's net, run on the CPU with a stand-in kernel: the exact reference computes the failed call, the
    failure is remembered, and the verifier refuses the kernel from then on (never a crash, never a leak)."""
    from deltapack.ops import kda as kda_module

    monkeypatch.setattr(kda_module, "_fla_failure", KernelFailure("FLA's chunk_kda", "kda"))
    lengths = [4, 1, 6]
    seg = segments(lengths)
    inputs = kda_inputs(sum(lengths), seed=5)

    def ref(*xs):
        return kda_ref(*xs, segments=seg)[0]

    def fast(*xs):
        if stage == "forward":
            raise RuntimeError("a kernel refused its forward")
        return _RaisesInBackward.apply(ref(*xs) / 2)

    out = kda_module._WithReference.apply(fast, ref, *inputs)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    expected = ref(*inputs)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad((expected * weights).sum(), inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert kda_module._fla_failure and stage in kda_module._fla_failure.reason
    ok, reason = kda_module._verify_fla(*[t.detach() for t in inputs], segments=seg)
    assert not ok and reason == kda_module._fla_failure.reason


@pytest.mark.parametrize("off_by", [1.0, 1.1])
def test_first_use_check_refuses_a_kernel_that_is_off(off_by, monkeypatch):
    """The first-use check of the FLA path, with a stand-in kernel on the CPU: one that agrees with the reference is
    accepted (once per head shape), one that is off by 10% is refused for the process with the reason kept."""
    from deltapack.ops import kda as kda_module

    monkeypatch.setattr(kda_module, "_fla_failure", KernelFailure("FLA's chunk_kda", "kda"))
    monkeypatch.setattr(kda_module, "_checked", set())

    def stand_in(*xs, use_qk_l2norm_in_kernel, cu_seqlens, cu_seqlens_cpu):
        o, _ = kda_ref(*xs, segments=Segments.from_cu_seqlens(cu_seqlens_cpu), use_qk_l2norm=use_qk_l2norm_in_kernel)
        return o * off_by, None

    q, _, v, g, beta = (x.detach() for x in kda_inputs(5, heads=2, k=8, v=6))
    accepted = kda_module._checked_on_first_use(stand_in, q, v, g, beta)
    assert accepted == (off_by == 1.0)
    assert bool(kda_module._fla_failure) == (off_by != 1.0)
    if not accepted:
        assert "off" in kda_module._fla_failure.reason
    assert kda_module._checked_on_first_use(stand_in, q, v, g, beta) == accepted  # checked once per shape
