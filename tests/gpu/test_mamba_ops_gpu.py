"""The SSD and selective-scan ops on CUDA, each backend [fast, reference], against the float64 token-by-token
oracle run on each document alone: outputs and input gradients, documents of awkward lengths (1, 3, 63, 64, 65)."""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import assert_close, random_lengths, rel_err, requires_cuda

from deltapack.diagnostics import count_host_syncs
from deltapack.ops import Segments
from deltapack.ops.selective_scan import SELECTIVE_SCAN, selective_scan
from deltapack.ops.ssd import _CHOSEN, SSD, STRATEGIES, ssd, ssd_via_gla
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


def ssd_case(dtype, seed=0, total=TOTAL):
    """Inputs of the SSD op with the Mamba2 head and state sizes, documents of awkward lengths, and weights."""
    gen = torch.Generator().manual_seed(seed)
    lengths = random_lengths(total, gen)
    segments = Segments.from_cu_seqlens([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    heads, head_dim, groups, state = 8, 64, 2, 128

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).cuda().to(dtype).requires_grad_()

    tokens = dict(x=rnd(1, total, heads, head_dim), dt=rnd(1, total, heads), B=rnd(1, total, groups, state, scale=0.1),
                  C=rnd(1, total, groups, state, scale=0.1))  # fmt: skip
    params = dict(A=(-torch.rand(heads, generator=gen) * 0.05).cuda().requires_grad_(),
                  D=torch.randn(heads, generator=gen).cuda().requires_grad_())  # fmt: skip
    weights = torch.randn(1, total, heads, head_dim, generator=gen).cuda()
    return tokens, params, segments, weights


def ssd_oracle(case):
    tokens, params, segments, weights = case
    return grads_by_oracle(ssd_recurrent_ref, tokens, params, segments, weights, dt_softplus=True)


def ssd_errors(case, oracle, fn=ssd, **call):
    """Relative L2 errors of ``fn``'s output and of each input gradient vs the float64 ``oracle`` of ``case``."""
    tokens, params, segments, weights = case
    out = fn(tokens["x"], tokens["dt"], params["A"], tokens["B"], tokens["C"], segments=segments, D=params["D"],
             dt_softplus=True, **call)  # fmt: skip
    grads = torch.autograd.grad((out.float() * weights).sum(), [*tokens.values(), *params.values()])
    ref, ref_grads = oracle
    errors = {"output": rel_err(out.cpu(), ref)}
    errors.update({f"grad {n}": rel_err(g.cpu(), r) for n, g, r in zip([*tokens, *params], grads, ref_grads)})
    return errors


FP32_TOL = {"output": 3e-3, "grad": 6e-3}  # the kernels' TF32 dots (measured ~1.5e-3 on an H200)


def _fp32_tol(what):
    return FP32_TOL["output" if what == "output" else "grad"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ssd_on_cuda(backend, dtype):
    """fp32: each backend within the TF32 bound of the oracle. bf16: the reference within bf16's own rounding; the
    fast path judged against the reference path's error on the same inputs (as FLA's tests do): within twice it,
    plus the fast path's own fp32 bound (its TF32 dots), for the output and every gradient."""
    case = ssd_case(dtype)
    oracle = ssd_oracle(case)
    errors = ssd_errors(case, oracle, backend=_backend(SSD, backend))
    if dtype == torch.float32:
        bad = {w: e for w, e in errors.items() if not e <= _fp32_tol(w)}
    elif backend == "reference":
        bad = {w: e for w, e in errors.items() if not e <= (1e-2 if w == "output" else 2e-2)}
    else:
        ref_errors = ssd_errors(case, oracle, backend="reference")
        bound = {w: 2 * ref_errors[w] + _fp32_tol(w) for w in errors}
        bad = {w: f"{e:.3g} > {bound[w]:.3g} (reference {ref_errors[w]:.3g})" for w, e in errors.items()
               if not e <= bound[w]}  # fmt: skip
    assert not bad, f"{dtype} {backend}: {bad}; all: {errors}"


@pytest.mark.parametrize("index", range(len(STRATEGIES)), ids=["fla_kernels", "forward_calls", "public_forward"])
def test_ssd_strategies_on_cuda(index):
    """Each way the fla backend can compute the scan (the first that passes its first-use check is used), fp32
    forward and backward vs the oracle; shows which of them work on this GPU and Triton."""
    name, checked, _ = STRATEGIES[index]
    case = ssd_case(torch.float32)
    errors = ssd_errors(case, ssd_oracle(case), fn=ssd_via_gla, gla=checked)
    assert all(e <= _fp32_tol(w) for w, e in errors.items()), f"{name}: {errors}"


def test_ssd_no_host_sync_on_cuda():
    """The fla backend's forward and backward with a new batch's segments (its plan built in the call) makes no
    host sync once the kernels are compiled."""
    case = ssd_case(torch.float32, total=300)
    tokens, params, segments, weights = case
    x, dt, B, C = tokens.values()
    ssd(x, dt, params["A"], B, C, segments=segments, backend="fla").sum().backward()  # compiles, checks the kernels
    assert _CHOSEN and _CHOSEN[0] is STRATEGIES[0][2], "the fla backend runs a fallback here (see the log)"
    fresh = Segments.from_cu_seqlens(segments.cu_seqlens_host, device="cuda")

    def step():
        out = ssd(tokens["x"], tokens["dt"], params["A"], tokens["B"], tokens["C"], segments=fresh, D=params["D"],
                  dt_softplus=True, backend="fla")  # fmt: skip
        torch.autograd.grad((out * weights).sum(), [*tokens.values(), *params.values()])

    assert count_host_syncs(step) == 0


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
