"""deltapack's Triton causal conv1d (``backend="triton"``) on a GPU against the exact fp32 reference: forward and
every gradient, random document splits with 1-token documents, bf16 and fp32, and the benchmark's size once
(32768 tokens x 8192 channels)."""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import TOL, assert_close, random_lengths, requires_cuda, segments_of

from deltapack import ops

pytestmark = [pytest.mark.gpu, requires_cuda]
triton = pytest.importorskip("triton")

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]


@pytest.fixture(autouse=True)
def _exact_fp32_reference():
    """The reference's fp32 conv on cuDNN without TF32, so that fp32 is compared with fp32."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def _inputs(lengths, channels, width, dtype, bias, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    x = torch.randn(1, total, channels, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(channels, width, device="cuda", generator=gen) / width**0.5).to(dtype)
    b = torch.randn(channels, device="cuda", generator=gen).to(dtype) if bias else None
    dy = torch.randn(1, total, channels, device="cuda", generator=gen).to(dtype)
    return x, w, b, dy


def _run(x, w, b, activation, segments, dy, backend, upcast=False):
    leaves = [t.detach().float() if upcast else t.detach() for t in (x, w, b) if t is not None]
    leaves = [t.requires_grad_() for t in leaves]
    bias = leaves[2] if b is not None else None
    y = ops.causal_conv1d(leaves[0], leaves[1], bias, activation, segments=segments, backend=backend)
    return [y, *torch.autograd.grad(y, leaves, dy.float() if upcast else dy)]


def _check(lengths, channels, width, dtype, bias, activation):
    from deltapack.ops import conv_triton

    segments = segments_of(lengths)
    x, w, b, dy = _inputs(lengths, channels, width, dtype, bias)
    got = _run(x, w, b, activation, segments, dy, "triton")
    assert not conv_triton.FAILURE, conv_triton.FAILURE.reason  # the kernels ran, not the fallback
    want = _run(x, w, b, activation, segments, dy, "reference", upcast=True)
    names = ("y", "dx", "dweight", "dbias")
    for name, g, r in zip(names, got, want):
        assert g.dtype == (x.dtype if name in ("y", "dx") else w.dtype), name
        if dtype == torch.float32:
            scale = r.detach().abs().max().clamp_min(1.0)
            err = float((g.detach() - r.detach()).abs().max() / scale)
            assert err <= (1e-5 if name == "y" else 1e-4), f"{name}: max error {err:.3g}"
        else:
            assert_close(g, r, TOL[dtype], name)
    # the same input as one document: the cut changes the answer, so a conv that ignored it would fail above
    whole = _run(x, w, b, activation, segments_of([sum(lengths)]), dy, "reference", upcast=True)
    assert (whole[0] - want[0]).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize(("bias", "activation"), [(True, "silu"), (False, None)])
def test_triton_conv_on_random_splits(dtype, width, bias, activation):
    gen = torch.Generator().manual_seed(width)
    lengths = [1, 1, 2, 3, *random_lengths(3000, gen)]
    _check(lengths, 520, width, dtype, bias, activation)  # 520 channels: not a multiple of a block


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_conv_at_benchmark_size(dtype):
    gen = torch.Generator().manual_seed(0)
    lengths = [1, *random_lengths(32767, gen)]
    _check(lengths, 8192, 4, dtype, False, "silu")


def test_triton_conv_is_registered_after_fla():
    assert ops.OPS["causal_conv1d"].names.index("triton") > ops.OPS["causal_conv1d"].names.index("fla")
