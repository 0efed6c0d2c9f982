"""The two GDN ops on each backend ([fast, reference]) against the exact fp32 reference, on fresh random varlen
inputs (CUDA + FLA)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import TOL, assert_close, random_lengths, requires_cuda, segments_of

from deltapack import ops
from deltapack.ops import fla, reference

pytestmark = [
    pytest.mark.gpu,
    requires_cuda,
    pytest.mark.skipif(not fla.AVAILABLE, reason="needs FLA (pip install deltapack[gpu])"),
]

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]
BACKENDS = ["fla", "reference"]


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation,bias", [("silu", False), (None, True)])
def test_conv_matches_reference(dtype, activation, bias, backend):
    gen = torch.Generator().manual_seed(3)
    lengths = random_lengths(3000, gen)
    segments = segments_of(lengths)
    x, w, b = conv_inputs(lengths, dtype, bias=bias)
    out = ops.causal_conv1d(x, w, b, activation, segments=segments, backend=backend)
    xr, wr, br = upcast([x, w, b])
    ref = reference.causal_conv1d_ref(xr, wr, br, activation, segments=segments)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref, TOL[dtype])
    for name, got, want in zip("xwb", grads(out, [x, w, b]), grads(ref, [xr, wr, br])):
        assert_close(got, want, TOL[dtype], f"d{name}")


def test_fp32_delta_rule_takes_the_reference(monkeypatch, caplog):
    """FLA's fp32 path runs its dots in tf32 (outside the fp32 bound): fp32 inputs get the exact reference, the log
    says so with the reason, and asking for FLA by name raises."""
    monkeypatch.delenv("DELTAPACK_BACKEND", raising=False)
    monkeypatch.setattr(ops.OPS["gated_delta_rule"], "_logged", set())  # logged once per process: log it again here
    segments = segments_of([5, 70, 130])
    inputs = [t.detach() for t in gdn_inputs([5, 70, 130], torch.float32)]
    with caplog.at_level(logging.INFO, logger="deltapack"):
        out, _ = ops.gated_delta_rule(*inputs, segments=segments)
    ref, _ = reference.gated_delta_rule_ref(*inputs, segments=segments)
    assert torch.equal(out, ref)
    assert "gated_delta_rule runs on the reference backend (fla: q is torch.float32" in caplog.text
    with pytest.raises(RuntimeError, match="torch.float32"):
        ops.gated_delta_rule(*inputs, segments=segments, backend="fla")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_delta_rule_matches_reference(backend):
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(4)
    lengths = random_lengths(2500, gen)
    segments = segments_of(lengths)
    inputs = gdn_inputs(lengths, dtype)
    out, final = ops.gated_delta_rule(*inputs, segments=segments, output_final_state=True, backend=backend)
    ref_inputs = upcast(inputs)
    ref, ref_final = reference.gated_delta_rule_ref(*ref_inputs, segments=segments, output_final_state=True)
    assert out.dtype == dtype and out.shape == inputs[2].shape
    assert_close(out, ref, TOL[dtype])
    assert_close(final, ref_final, TOL[dtype], "final state")
    for name, got, want in zip(("dq", "dk", "dv", "dg", "dbeta"), grads(out, inputs), grads(ref, ref_inputs)):
        assert_close(got, want, TOL[dtype], name)


def test_each_document_is_bit_exact_alone():
    """Packed through FLA equals each document through FLA alone, bit for bit; one long sequence does not."""
    gen = torch.Generator().manual_seed(5)
    lengths = random_lengths(1500, gen)
    segments = segments_of(lengths)
    host = segments.cu_seqlens_host
    x, w, _ = conv_inputs(lengths, torch.bfloat16, bias=False)
    inputs = gdn_inputs(lengths, torch.bfloat16)
    conv = ops.causal_conv1d(x, w, None, "silu", segments=segments, backend="fla")
    core, _ = ops.gated_delta_rule(*inputs, segments=segments, backend="fla")
    leaky, _ = ops.gated_delta_rule(*inputs, segments=segments_of([sum(lengths)]), backend="fla")
    assert not torch.equal(leaky, core)  # the test can fail: one sequence carries state across documents
    for a, b in zip(host[:-1], host[1:]):
        one = segments_of([b - a])
        alone_conv = ops.causal_conv1d(x[:, a:b], w, None, "silu", segments=one, backend="fla")
        alone_core, _ = ops.gated_delta_rule(*(t[:, a:b] for t in inputs), segments=one, backend="fla")
        assert torch.equal(conv[:, a:b], alone_conv)
        assert torch.equal(core[:, a:b], alone_core)


def test_split_calls_equal_one_call(monkeypatch):
    """Streams over the launch-grid limit are split at document boundaries; the result does not change."""
    gen = torch.Generator().manual_seed(6)
    lengths = random_lengths(2000, gen, short=True)  # every document fits the tiny per-call limit below
    inputs = gdn_inputs(lengths, torch.bfloat16)
    x, w, b = conv_inputs(lengths, torch.bfloat16)
    whole = segments_of(lengths)
    whole_core, whole_final = ops.gated_delta_rule(*inputs, segments=whole, output_final_state=True, backend="fla")
    whole_conv = ops.causal_conv1d(x, w, b, "silu", segments=whole, backend="fla")
    whole_grads = grads(whole_core, inputs)
    monkeypatch.setattr(fla, "MAX_CHUNKS_PER_CALL", 5)
    split = segments_of(lengths)  # a new batch: its plan is built under the tiny limit
    core, final = ops.gated_delta_rule(*inputs, segments=split, output_final_state=True, backend="fla")
    assert len(fla.plan_of(split).parts) > 3
    conv = ops.causal_conv1d(x, w, b, "silu", segments=split, backend="fla")
    assert torch.equal(core, whole_core), "output"
    assert torch.equal(final, whole_final), "final states"
    assert torch.equal(conv, whole_conv), "conv output"
    for name, got, want in zip(("dq", "dk", "dv", "dg", "dbeta"), grads(core, inputs), whole_grads):
        assert torch.equal(got, want), name


def test_many_tiny_documents_over_the_grid_limit():
    """70,000 one-token documents (more chunks than one launch takes): runs, and matches the closed form."""
    n_docs = 70_000
    segments = segments_of([1] * n_docs)
    q, k, v, g, beta = (t.detach() for t in gdn_inputs([1] * n_docs, torch.bfloat16))
    out, _ = ops.gated_delta_rule(q, k, v, g, beta, segments=segments, backend="fla")
    # one token alone: S = beta k v^T, o = S^T (scale q) with q, k L2-normalised
    qn, kn = reference.l2norm(q.float()), reference.l2norm(k.float())
    qk = (qn * kn).sum(-1).repeat_interleave(2, dim=2) * 16**-0.5
    expected = qk.unsqueeze(-1) * beta.float().unsqueeze(-1) * v.float()
    assert_close(out, expected, TOL[torch.bfloat16])
    x, w, b = (t.detach() if t is not None else None for t in conv_inputs([1] * n_docs, torch.bfloat16))
    y = ops.causal_conv1d(x, w, b, "silu", segments=segments, backend="fla")
    assert_close(y, F.silu(x.float() * w[:, -1].float() + b.float()), TOL[torch.bfloat16])


def test_one_huge_document():
    """One document of 2^16 tokens against the reference (bf16), forward and gradients of q, v and g."""
    lengths = [2**16]
    segments = segments_of(lengths)
    inputs = gdn_inputs(lengths, torch.bfloat16)
    out, _ = ops.gated_delta_rule(*inputs, segments=segments, backend="fla")
    ref_inputs = upcast(inputs)
    ref, _ = reference.gated_delta_rule_ref(*ref_inputs, segments=segments)
    assert_close(out, ref, TOL[torch.bfloat16])
    got, want = grads(out, inputs), grads(ref, ref_inputs)
    for i, name in ((0, "dq"), (2, "dv"), (3, "dg")):
        assert_close(got[i], want[i], TOL[torch.bfloat16], name)


def test_dispatch_picks_fla_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv("DELTAPACK_BACKEND", raising=False)
    segments = segments_of([3, 9])
    inputs = [t.detach() for t in gdn_inputs([3, 9], torch.bfloat16)]
    rule = ops.OPS["gated_delta_rule"]
    assert rule.choose(*inputs, segments=segments)[0] == "fla"
    monkeypatch.setenv("DELTAPACK_BACKEND", "reference")
    assert rule.choose(*inputs, segments=segments)[0] == "reference"
