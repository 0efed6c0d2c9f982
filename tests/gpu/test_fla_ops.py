"""FLA backend of the two GDN primitives against the exact reference, on fresh random inputs (CUDA + FLA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import TOL, assert_close, cu_of, random_lengths, requires_cuda

from deltapack.ops import dispatch, fla, reference

pytestmark = [
    pytest.mark.gpu,
    requires_cuda,
    pytest.mark.skipif(not fla.AVAILABLE, reason="needs FLA (pip install deltapack[gpu])"),
]

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]


def conv_inputs(lengths, dtype, channels=128, width=4, bias=True, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    x = torch.randn(1, total, channels, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    w = (torch.randn(channels, width, device="cuda", dtype=dtype, generator=gen) * 0.5).requires_grad_()
    b = torch.randn(channels, device="cuda", dtype=dtype, generator=gen).requires_grad_() if bias else None
    return x, w, b


def gdn_inputs(lengths, dtype, hk=2, hv=4, dk=16, dv=16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    q = rand(1, total, hk, dk).to(dtype).requires_grad_()
    k = rand(1, total, hk, dk).to(dtype).requires_grad_()
    v = rand(1, total, hv, dv).to(dtype).requires_grad_()
    g = (-F.softplus(rand(1, total, hv)) * 0.05).requires_grad_()  # long-memory log decay, fp32 as the model
    beta = rand(1, total, hv).sigmoid().to(dtype).requires_grad_()
    return q, k, v, g, beta


def grads(out, inputs, seed=1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    up = torch.randn(out.shape, device="cuda", generator=gen).to(out.dtype)
    return torch.autograd.grad(out, [t for t in inputs if t is not None], up)


def upcast(inputs):
    return [None if t is None else t.detach().float().requires_grad_() for t in inputs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation,bias", [("silu", False), (None, True)])
def test_conv_matches_reference(dtype, activation, bias):
    gen = torch.Generator().manual_seed(3)
    lengths = random_lengths(3000, gen)
    cu, host = cu_of(lengths)
    x, w, b = conv_inputs(lengths, dtype, bias=bias)
    seq_idx = dispatch._seq_idx_from_cu(cu, sum(lengths))
    out = fla.causal_conv1d(x, w, b, activation, cu_seqlens=cu, seq_idx=seq_idx, cu_seqlens_host=host, cache={})
    xr, wr, br = upcast([x, w, b])
    ref = reference.causal_conv1d_ref(xr, wr, br, activation, seq_idx=seq_idx)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref, TOL[dtype])
    for name, got, want in zip("xwb", grads(out, [x, w, b]), grads(ref, [xr, wr, br])):
        assert_close(got, want, TOL[dtype], f"d{name}")


def test_fp32_delta_rule_takes_the_reference():
    """FLA's fp32 path runs its dots in tf32 (outside the fp32 bound): fp32 inputs get the exact reference."""
    lengths = [5, 70, 130]
    cu, host = cu_of(lengths)
    inputs = [t.detach() for t in gdn_inputs(lengths, torch.float32)]
    out, _ = fla.gated_delta_rule(*inputs, cu_seqlens=cu, cu_seqlens_host=host, cache={})
    ref, _ = reference.gated_delta_rule_ref(*inputs, cu_seqlens=cu, cu_seqlens_host=host)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_gated_delta_rule_matches_reference(dtype):
    gen = torch.Generator().manual_seed(4)
    lengths = random_lengths(2500, gen)
    cu, host = cu_of(lengths)
    inputs = gdn_inputs(lengths, dtype)
    out, final = fla.gated_delta_rule(*inputs, cu_seqlens=cu, cu_seqlens_host=host, output_final_state=True, cache={})
    ref_inputs = upcast(inputs)
    ref, ref_final = reference.gated_delta_rule_ref(
        *ref_inputs, cu_seqlens=cu, cu_seqlens_host=host, output_final_state=True
    )
    assert out.dtype == dtype and out.shape == inputs[2].shape
    assert_close(out, ref, TOL[dtype])
    assert_close(final, ref_final, TOL[dtype], "final state")
    for name, got, want in zip(("dq", "dk", "dv", "dg", "dbeta"), grads(out, inputs), grads(ref, ref_inputs)):
        assert_close(got, want, TOL[dtype], name)


def test_each_document_is_bit_exact_alone():
    """Packed through FLA equals each document through FLA alone, bit for bit; one long sequence does not."""
    gen = torch.Generator().manual_seed(5)
    lengths = random_lengths(1500, gen)
    cu, host = cu_of(lengths)
    x, w, _ = conv_inputs(lengths, torch.bfloat16, bias=False)
    inputs = gdn_inputs(lengths, torch.bfloat16)
    seq_idx = dispatch._seq_idx_from_cu(cu, sum(lengths))
    conv = fla.causal_conv1d(x, w, None, "silu", cu_seqlens=cu, seq_idx=seq_idx, cu_seqlens_host=host, cache={})
    core, _ = fla.gated_delta_rule(*inputs, cu_seqlens=cu, cu_seqlens_host=host, cache={})
    whole_cu, whole_host = cu_of([sum(lengths)])
    leaky, _ = fla.gated_delta_rule(*inputs, cu_seqlens=whole_cu, cu_seqlens_host=whole_host, cache={})
    assert not torch.equal(leaky, core)  # the test can fail: one sequence carries state across documents
    for a, b in zip(host[:-1], host[1:]):
        one_cu, one_host = cu_of([b - a])
        alone_conv = fla.causal_conv1d(
            x[:, a:b], w, None, "silu", cu_seqlens=one_cu, cu_seqlens_host=one_host, cache={}
        )
        alone_core, _ = fla.gated_delta_rule(
            *(t[:, a:b] for t in inputs), cu_seqlens=one_cu, cu_seqlens_host=one_host, cache={}
        )
        assert torch.equal(conv[:, a:b], alone_conv)
        assert torch.equal(core[:, a:b], alone_core)


def test_split_calls_equal_one_call(monkeypatch):
    """Streams over the launch-grid limit are split at document boundaries; the result does not change."""
    gen = torch.Generator().manual_seed(6)
    lengths = random_lengths(2000, gen, short=True)  # every document fits the tiny per-call limit below
    cu, host = cu_of(lengths)
    inputs = gdn_inputs(lengths, torch.bfloat16)
    x, w, b = conv_inputs(lengths, torch.bfloat16)
    whole_core, whole_final = fla.gated_delta_rule(
        *inputs, cu_seqlens=cu, cu_seqlens_host=host, output_final_state=True, cache={}
    )
    whole_conv = fla.causal_conv1d(x, w, b, "silu", cu_seqlens=cu, cu_seqlens_host=host, cache={})
    whole_grads = grads(whole_core, inputs)
    monkeypatch.setattr(fla, "MAX_CHUNKS_PER_CALL", 5)
    cache: dict = {}
    core, final = fla.gated_delta_rule(
        *inputs, cu_seqlens=cu, cu_seqlens_host=host, output_final_state=True, cache=cache
    )
    assert len(cache["fla"].parts) > 3
    conv = fla.causal_conv1d(x, w, b, "silu", cu_seqlens=cu, cu_seqlens_host=host, cache=cache)
    assert torch.equal(core, whole_core), "output"
    assert torch.equal(final, whole_final), "final states"
    assert torch.equal(conv, whole_conv), "conv output"
    for name, got, want in zip(("dq", "dk", "dv", "dg", "dbeta"), grads(core, inputs), whole_grads):
        assert torch.equal(got, want), name


def test_many_tiny_documents_over_the_grid_limit():
    """70,000 one-token documents (more chunks than one launch takes): runs, and matches the closed form."""
    n_docs = 70_000
    cu, host = cu_of([1] * n_docs)
    q, k, v, g, beta = (t.detach() for t in gdn_inputs([1] * n_docs, torch.bfloat16))
    out, _ = fla.gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, cu_seqlens_host=host, cache={})
    # one token alone: S = beta k v^T, o = S^T (scale q) with q, k L2-normalised
    qn, kn = reference.l2norm(q.float()), reference.l2norm(k.float())
    qk = (qn * kn).sum(-1).repeat_interleave(2, dim=2) * 16**-0.5
    expected = qk.unsqueeze(-1) * beta.float().unsqueeze(-1) * v.float()
    assert_close(out, expected, TOL[torch.bfloat16])
    x, w, b = (t.detach() if t is not None else None for t in conv_inputs([1] * n_docs, torch.bfloat16))
    y = fla.causal_conv1d(x, w, b, "silu", cu_seqlens=cu, cu_seqlens_host=host, cache={})
    assert_close(y, F.silu(x.float() * w[:, -1].float() + b.float()), TOL[torch.bfloat16])


def test_one_huge_document():
    """One document of 2^16 tokens against the reference (bf16), forward and gradients of q, v and g."""
    lengths = [2**16]
    cu, host = cu_of(lengths)
    inputs = gdn_inputs(lengths, torch.bfloat16)
    out, _ = fla.gated_delta_rule(*inputs, cu_seqlens=cu, cu_seqlens_host=host, cache={})
    ref_inputs = upcast(inputs)
    ref, _ = reference.gated_delta_rule_ref(*ref_inputs, cu_seqlens=cu, cu_seqlens_host=host)
    assert_close(out, ref, TOL[torch.bfloat16])
    got, want = grads(out, inputs), grads(ref, ref_inputs)
    for i, name in ((0, "dq"), (2, "dv"), (3, "dg")):
        assert_close(got[i], want[i], TOL[torch.bfloat16], name)


def test_dispatch_picks_fla_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv("DELTAPACK_BACKEND", raising=False)
    assert dispatch.resolve_backend(None, torch.device("cuda"), "gated_delta_rule") == "fla"
    monkeypatch.setenv("DELTAPACK_BACKEND", "reference")
    assert dispatch.resolve_backend(None, torch.device("cuda"), "gated_delta_rule") == "reference"
