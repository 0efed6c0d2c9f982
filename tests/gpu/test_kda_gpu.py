"""KDA on a GPU, both backends: FLA's chunk_kda (bf16, cu_seqlens) and the exact reference, against the reference in
fp32 on the whole stream and against each document run alone (awkward lengths 1, 3, 63, 64, 65 included)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import TOL, assert_close, cu_of, random_lengths, rel_err, requires_cuda

from deltapack.ops import Segments
from deltapack.ops import kda as kda_module
from deltapack.ops.kda import KDA, kda, kda_ref

pytestmark = [pytest.mark.gpu, requires_cuda]

BACKENDS = [
    pytest.param(
        "fla",
        torch.bfloat16,
        id="fast",
        marks=pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs FLA (deltapack[gpu])"),
    ),
    pytest.param("reference", torch.float32, id="reference"),
]


def segments(lengths):
    _, host = cu_of(lengths)
    return Segments.from_cu_seqlens(host, device="cuda")


def kda_inputs(lengths, dtype, heads=32, dk=128, dv=128, decay=1.0, seed=0):
    """Kimi-Linear's heads and head dims (FLA's kernels then reuse the tuning of the layer benchmark); the decay as
    the model forms it: -exp(A_log) * softplus(x + dt_bias), fp32."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    q = rand(1, total, heads, dk).to(dtype).requires_grad_()
    k = rand(1, total, heads, dk).to(dtype).requires_grad_()
    v = rand(1, total, heads, dv).to(dtype).requires_grad_()
    g = (-decay * F.softplus(rand(1, total, heads, dk) - 3)).requires_grad_()
    beta = rand(1, total, heads).sigmoid().to(dtype).requires_grad_()
    return [q, k, v, g, beta]


def grads(out, inputs, seed=1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    up = torch.randn(out.shape, device="cuda", generator=gen).to(out.dtype)
    return torch.autograd.grad(out, inputs, up)


@pytest.mark.parametrize("decay", [0.05, 1.0, 8.0], ids=["long-memory", "moderate", "strong"])
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_kda_matches_fp32_reference(backend, dtype, decay):
    lengths = random_lengths(3000, torch.Generator().manual_seed(5))
    seg = segments(lengths)
    inputs = kda_inputs(lengths, dtype, decay=decay)
    if backend == "fla":
        name, _ = KDA.choose(*inputs, segments=seg)
        assert name == "fla", "FLA's chunk_kda should run bf16 inputs on CUDA (is FLA installed?)"
    out, _ = kda(*inputs, segments=seg, backend=backend)
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    ref, _ = kda_ref(*ref_inputs, segments=seg)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, TOL[dtype])
    for name, got, want in zip(("q", "k", "v", "g", "beta"), grads(out, inputs), grads(ref, ref_inputs)):
        assert_close(got, want, TOL[dtype], f"d{name}")
    assert not kda_module._fla_failure, kda_module._fla_failure  # the kernels ran: no fallback hid a failure


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_kda_packed_equals_each_document_alone(backend, dtype):
    """The same backend on the packed stream and on each document alone: boundaries alone change nothing."""
    lengths = [1, 3, 63, 64, 65, 200, 1, 17]
    seg = segments(lengths)
    inputs = kda_inputs(lengths, dtype, decay=0.05, seed=2)
    out, _ = kda(*inputs, segments=seg, backend=backend)
    dq = grads(out, inputs)[0]
    host = seg.cu_seqlens_host
    worst = 0.0
    for a, b in zip(host[:-1], host[1:]):
        piece = [t.detach()[:, a:b].clone().requires_grad_() for t in inputs]
        alone, _ = kda(*piece, segments=segments([b - a]), backend=backend)
        worst = max(worst, rel_err(out[:, a:b], alone))
        # gradients of the packed run restricted to this document vs the document alone
        gen = torch.Generator(device="cuda").manual_seed(1)
        up = torch.randn(out.shape, device="cuda", generator=gen).to(out.dtype)[:, a:b]
        (dq_alone,) = torch.autograd.grad(alone, piece[0], up)
        worst = max(worst, rel_err(dq[:, a:b], dq_alone))
    assert worst <= (1e-2 if dtype == torch.bfloat16 else 1e-5), worst
    # one sequence over the same stream differs: the test can fail
    leaky, _ = kda(*[t.detach() for t in inputs], segments=segments([sum(lengths)]), backend=backend)
    assert rel_err(leaky, out) > 1e-2


def test_fp32_on_cuda_takes_the_reference():
    lengths = [5, 70]
    seg = segments(lengths)
    inputs = [t.detach() for t in kda_inputs(lengths, torch.float32)]
    out, _ = kda(*inputs, segments=seg)
    ref, _ = kda_ref(*inputs, segments=seg)
    assert torch.equal(out, ref)
