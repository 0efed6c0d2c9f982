"""Backend selection of the varlen primitives (CPU): argument, DELTAPACK_BACKEND, automatic; FLA's index plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltapack.ops import attention, dispatch, fla, reference

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("DELTAPACK_BACKEND", raising=False)
    monkeypatch.delenv("DELTAPACK_ATTENTION_BACKEND", raising=False)


def test_automatic_choice_on_cpu_is_the_reference():
    assert torch.cuda.is_available() or not fla.AVAILABLE  # importable here, and off without CUDA
    assert dispatch.resolve_backend(None, CPU, "gated_delta_rule") == "reference"


def test_environment_and_argument_override(monkeypatch):
    monkeypatch.setenv("DELTAPACK_BACKEND", "fla")
    with pytest.raises(RuntimeError, match="backend 'fla' was requested for causal_conv1d but cannot run here"):
        dispatch.resolve_backend(None, CPU, "causal_conv1d")
    assert dispatch.resolve_backend("reference", CPU, "causal_conv1d") == "reference"  # the argument wins


def test_asking_for_fla_on_cpu_raises_a_clear_error():
    x = torch.randn(1, 6, 4)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"install deltapack\[gpu\] on a CUDA machine"):
        dispatch.causal_conv1d(x, torch.randn(4, 3), cu_seqlens=cu, backend="fla")


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="expected one of"):
        dispatch.resolve_backend("triton", CPU, "causal_conv1d")
    monkeypatch.setenv("DELTAPACK_ATTENTION_BACKEND", "xformers")
    with pytest.raises(ValueError, match="expected one of"):
        attention.resolve_attention_backend(None, torch.empty(0, 1, 8))


def test_dispatch_with_the_reference_equals_the_reference():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 9, 4, generator=gen), torch.randn(4, 3, generator=gen)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5], dtype=torch.int32)
    got = dispatch.causal_conv1d(x, w, None, "silu", cu_seqlens=cu, backend="reference")
    assert torch.equal(got, reference.causal_conv1d_ref(x, w, None, "silu", seq_idx=seq_idx))


def test_attention_backend_on_cpu(monkeypatch):
    q = torch.empty(0, 1, 64)
    assert attention.resolve_attention_backend(None, q) == "reference"
    with pytest.raises(RuntimeError, match="needs CUDA fp16/bf16 inputs"):
        attention.resolve_attention_backend("torch_varlen", q)
    monkeypatch.setenv("DELTAPACK_ATTENTION_BACKEND", "flash_attn")
    with pytest.raises(RuntimeError, match="flash-attn"):
        attention.resolve_attention_backend(None, q)


def test_varlen_attention_reference_keeps_documents_apart():
    gen = torch.Generator().manual_seed(1)
    lengths = [3, 1, 7]
    cu = torch.tensor([0, 3, 4, 11], dtype=torch.int32)
    q, k, v = (torch.randn(11, h, 8, generator=gen) for h in (4, 2, 2))
    out = attention.varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=7)
    expand = lambda t: t.repeat_interleave(2, dim=1).transpose(0, 1)  # noqa: E731
    leaky = F.scaled_dot_product_attention(q.transpose(0, 1), expand(k), expand(v), is_causal=True).transpose(0, 1)
    assert (leaky - out).abs().max() > 1e-3  # causal attention over the stream leaks; the reference must not
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        alone = F.scaled_dot_product_attention(q[s].transpose(0, 1), expand(k[s]), expand(v[s]), is_causal=True)
        assert (out[s] - alone.transpose(0, 1)).abs().max() <= 1e-6
        start += n


def test_fla_plan_chunks_and_splits(monkeypatch):
    """FLA's per-batch index plan: (document, chunk) rows as FLA defines them, split under the grid limit."""
    lengths = [1, 64, 65, 200, 3, 130]
    host = [0]
    for n in lengths:
        host.append(host[-1] + n)
    cu = torch.tensor(host, dtype=torch.int32)
    expected = [(d, c) for d, n in enumerate(lengths) for c in range(-(-n // fla.CHUNK))]
    cache: dict = {}
    plan = fla.prepare(cu, tuple(host), cache)
    assert cache["fla"] is plan and fla.prepare(cu, tuple(host), cache) is plan  # built once per batch
    assert [tuple(r) for r in plan.parts[0].chunk_indices.tolist()] == expected

    monkeypatch.setattr(fla, "MAX_CHUNKS_PER_CALL", 4)
    parts = fla.prepare(cu, tuple(host), None).parts
    assert [(p.start, p.end) for p in parts][0][0] == 0 and parts[-1].end == host[-1]
    assert all(a.end == b.start for a, b in zip(parts[:-1], parts[1:]))
    assert all(len(p.chunk_indices) <= 4 for p in parts)
    for p in parts:
        assert p.cu_seqlens.tolist() == p.cu_seqlens_cpu.tolist() and p.cu_seqlens_cpu[-1] == p.end - p.start
    monkeypatch.setattr(fla, "MAX_CHUNKS_PER_CALL", 3)
    with pytest.raises(ValueError, match="a document of 200 tokens needs 4 chunks"):
        fla.prepare(cu, tuple(host), None)


def test_varlen_attention_key_segments_align_bottom_right():
    """With cu_seqlens_k, each query segment is the tail of its document and reads the document's keys up to its own
    position: equal to the tail rows of causal attention over the whole document. Aligning top-left instead (what a
    kernel without the convention does) would differ."""
    gen = torch.Generator().manual_seed(0)
    doc_lengths, tail_lengths = [9, 4, 12], [3, 4, 5]
    qs, ks, vs, want = [], [], [], []
    for n, t in zip(doc_lengths, tail_lengths):
        q, k, v = (torch.randn(n, 4, 8, generator=gen) for _ in range(3))
        whole = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        qs.append(q[n - t :])
        ks.append(k[:n])
        vs.append(v[:n])
        want.append(whole.transpose(0, 1)[n - t :])
    cu_q = torch.tensor([0, *torch.tensor(tail_lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(doc_lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v, want = (torch.cat(t) for t in (qs, ks, vs, want))
    out = attention.varlen_attention(
        q, k, v, cu_seqlens=cu_q, max_seqlen=5, cu_seqlens_k=cu_k, max_seqlen_k=12, backend="reference"
    )
    assert (out - want).abs().max() < 1e-5
    top_left = torch.cat(
        [
            F.scaled_dot_product_attention(
                a.transpose(0, 1), b.transpose(0, 1), c.transpose(0, 1), is_causal=True
            ).transpose(0, 1)
            for a, b, c in zip(qs, ks, vs)
        ]
    )
    assert (top_left - want).abs().max() > 1e-2
    with pytest.raises(ValueError, match="max_seqlen_k"):
        attention.varlen_attention(q, k, v, cu_seqlens=cu_q, max_seqlen=5, cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match="one key segment per query segment"):
        attention.varlen_attention(q, k, v, cu_seqlens=cu_q, max_seqlen=5, cu_seqlens_k=cu_k[:-1], max_seqlen_k=12)
