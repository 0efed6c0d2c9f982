"""The SSD and selective-scan ops on CUDA, each backend [fast, reference], against the float64 token-by-token
oracle run on each document alone: outputs and input gradients, documents of awkward lengths (1, 3, 63, 64, 65)."""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import assert_close, random_lengths, requires_cuda

from deltapack.ops import Segments
from deltapack.ops.selective_scan import SELECTIVE_SCAN, selective_scan
from deltapack.ops.ssd import SSD, ssd
from oracles import selective_scan_recurrent_ref, ssd_recurrent_ref

pytestmark = [pytest.mark.gpu, requires_cuda]

TOTAL = 700  # the float64 oracle is a Python loop over tokens


def grads_by_oracle(oracle, tokens, params, segments, weights, **kw):
    leaves_t = {k: t.detach().double().cpu().requires_grad_() for k, t in tokens.items()}
    leaves_p = {k: p.detach().double().cpu().requires_grad_() for k, p in params.items()}
    host = segments.cu_seqlens_host
    outs = [
        oracle(**{k: t[:, a:b] for k, t in leaves_t.items()}, **leaves_p,
               segments=Segments.from_cu_seqlens([0, b - a]), **kw)
        for a, b in zip(host[:-1], host[1:])
    ]  # fmt: skip
    out = torch.cat(outs, 1)
    grads = torch.autograd.grad((out * weights.double().cpu()).sum(), [*leaves_t.values(), *leaves_p.values()])
    return out, grads


BACKENDS = [pytest.param("fast", id="fast"), pytest.param("reference", id="reference")]


def _backend(op, name):
    fast = [b for b in op.names if b != "reference"]
    if name == "fast":
        if not fast:
            pytest.skip(f"{op.name} has no fast backend (the reference is its GPU path)")
        return fast[0]
    return "reference"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ssd_on_cuda(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    lengths = random_lengths(TOTAL, gen)
    segments = Segments.from_cu_seqlens([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    heads, head_dim, groups, state = 8, 64, 2, 128

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).cuda().to(dtype).requires_grad_()

    tokens = dict(x=rnd(1, TOTAL, heads, head_dim), dt=rnd(1, TOTAL, heads), B=rnd(1, TOTAL, groups, state, scale=0.1),
                  C=rnd(1, TOTAL, groups, state, scale=0.1))  # fmt: skip
    params = dict(A=(-torch.rand(heads, generator=gen) * 0.05).cuda().requires_grad_(),
                  D=torch.randn(heads, generator=gen).cuda().requires_grad_())  # fmt: skip
    kw = dict(dt_softplus=True)
    out = ssd(tokens["x"], tokens["dt"], params["A"], tokens["B"], tokens["C"], segments=segments, D=params["D"],
              backend=_backend(SSD, backend), **kw)  # fmt: skip
    weights = torch.randn_like(out, dtype=torch.float32)
    grads = torch.autograd.grad((out.float() * weights).sum(), [*tokens.values(), *params.values()])
    ref, ref_grads = grads_by_oracle(ssd_recurrent_ref, tokens, params, segments, weights, **kw)
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3  # TF32 matmuls in the kernels
    assert_close(out.cpu(), ref, tol)
    for name, g, r in zip([*tokens, *params], grads, ref_grads):
        assert_close(g.cpu(), r, 2 * tol, what=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_scan_on_cuda(backend):
    gen = torch.Generator().manual_seed(1)
    lengths = random_lengths(TOTAL, gen)
    segments = Segments.from_cu_seqlens([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    channels, state = 64, 16

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).cuda().requires_grad_()

    tokens = dict(u=rnd(1, TOTAL, channels), delta=rnd(1, TOTAL, channels), B=rnd(1, TOTAL, 1, state),
                  C=rnd(1, TOTAL, 1, state), z=rnd(1, TOTAL, channels))  # fmt: skip
    params = dict(A=(-torch.rand(channels, state, generator=gen) * 0.05).cuda().requires_grad_(),
                  D=torch.randn(channels, generator=gen).cuda().requires_grad_())  # fmt: skip
    out = selective_scan(tokens["u"], tokens["delta"], params["A"], tokens["B"], tokens["C"], segments=segments,
                         D=params["D"], z=tokens["z"], delta_softplus=True,
                         backend=_backend(SELECTIVE_SCAN, backend))  # fmt: skip
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [*tokens.values(), *params.values()])

    def oracle(u, delta, B, C, z, A, D, segments, **kw):
        return selective_scan_recurrent_ref(u, delta, A, B, C, segments=segments, D=D, z=z, **kw)

    ref, ref_grads = grads_by_oracle(oracle, tokens, params, segments, weights, delta_softplus=True)
    assert_close(out.cpu(), ref, 1e-4)
    for name, g, r in zip([*tokens, *params], grads, ref_grads):
        assert_close(g.cpu(), r, 1e-4, what=f"grad {name}")
