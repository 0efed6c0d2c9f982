"""Backend selection of the varlen primitives (CPU): argument, DELTAPACK_BACKEND, automatic; FLA's index plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltapack import ops
from deltapack.ops import Segments, attention, fla, reference

GDN_OPS = (ops.OPS["causal_conv1d"], ops.OPS["gated_delta_rule"])


def seg_of(lengths):
    return Segments.from_cu_seqlens([0, *torch.tensor(lengths).cumsum(0).tolist()])


def conv_inputs(total=6, channels=4):
    return torch.randn(1, total, channels), torch.randn(channels, 3)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("DELTAPACK_BACKEND", raising=False)
    monkeypatch.delenv("DELTAPACK_ATTENTION_BACKEND", raising=False)


def test_automatic_choice_on_cpu_is_the_reference():
    assert torch.cuda.is_available() or not fla.AVAILABLE  # importable here, and off without CUDA
    x, w = conv_inputs()
    assert GDN_OPS[0].choose(x, w, segments=seg_of([2, 4]))[0] == "reference"


def test_environment_and_argument_override(monkeypatch):
    x, w = conv_inputs()
    monkeypatch.setenv("DELTAPACK_BACKEND", "fla")
    with pytest.raises(RuntimeError, match="backend 'fla' was requested for causal_conv1d .*but cannot run here"):
        GDN_OPS[0].choose(x, w, segments=seg_of([2, 4]))
    assert GDN_OPS[0].choose(x, w, segments=seg_of([2, 4]), backend="reference")[0] == "reference"  # argument wins


def test_asking_for_fla_on_cpu_raises_a_clear_error():
    x, w = conv_inputs()
    with pytest.raises(RuntimeError, match=r"install deltapack\[gpu\] on a CUDA machine"):
        ops.causal_conv1d(x, w, segments=seg_of([2, 4]), backend="fla")


def test_unknown_backend_names_the_choices(monkeypatch):
    x, w = conv_inputs()
    with pytest.raises(ValueError, match="expected one of"):
        ops.causal_conv1d(x, w, segments=seg_of([2, 4]), backend="tilelang")
    monkeypatch.setenv("DELTAPACK_ATTENTION_BACKEND", "xformers")
    with pytest.raises(ValueError, match="expected one of"):
        attention.resolve_attention_backend(None, torch.empty(0, 1, 8))


def test_dispatch_with_the_reference_equals_the_reference():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 9, 4, generator=gen), torch.randn(4, 3, generator=gen)
    segments = seg_of([4, 5])
    got = ops.causal_conv1d(x, w, None, "silu", segments=segments, backend="reference")
    assert torch.equal(got, reference.causal_conv1d_ref(x, w, None, "silu", segments=segments))


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
    q, k, v = (torch.randn(11, h, 8, generator=gen) for h in (4, 2, 2))
    out = attention.varlen_attention(q, k, v, segments=seg_of(lengths))
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
    host = seg_of(lengths).cu_seqlens_host
    expected = [(d, c) for d, n in enumerate(lengths) for c in range(-(-n // fla.CHUNK))]
    segments = seg_of(lengths)
    plan = fla.plan_of(segments)
    assert fla.plan_of(segments) is plan  # built once per batch
    assert [tuple(r) for r in plan.parts[0].chunk_indices.tolist()] == expected

    monkeypatch.setattr(fla, "MAX_CHUNKS_PER_CALL", 4)
    parts = fla.plan_of(seg_of(lengths)).parts
    assert [(p.start, p.end) for p in parts][0][0] == 0 and parts[-1].end == host[-1]
    assert all(a.end == b.start for a, b in zip(parts[:-1], parts[1:]))
    assert all(len(p.chunk_indices) <= 4 for p in parts)
    for p in parts:
        assert p.cu_seqlens.tolist() == p.cu_seqlens_cpu.tolist() and p.cu_seqlens_cpu[-1] == p.end - p.start
    monkeypatch.setattr(fla, "MAX_CHUNKS_PER_CALL", 3)
    with pytest.raises(ValueError, match="a document of 200 tokens needs 4 chunks"):
        fla.plan_of(seg_of(lengths))
    monkeypatch.setattr(fla, "on_cuda", lambda t: True)  # the verifier says so before any kernel is asked
    ok, why = fla.verify_causal_conv1d(torch.randn(1, host[-1], 4), torch.randn(4, 3), segments=seg_of(lengths))
    assert not ok and "a document of 200 tokens needs 4 chunks" in why


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
    seg_q, seg_k = seg_of(tail_lengths), seg_of(doc_lengths)
    q, k, v, want = (torch.cat(t) for t in (qs, ks, vs, want))
    out = attention.varlen_attention(q, k, v, segments=seg_q, segments_k=seg_k, backend="reference")
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
    with pytest.raises(ValueError, match="key tokens the segments describe"):
        attention.varlen_attention(q, k, v, segments=seg_q)
    with pytest.raises(ValueError, match="one key segment per query segment"):
        attention.varlen_attention(q, k[:13], v[:13], segments=seg_q, segments_k=seg_of(doc_lengths[:2]))
