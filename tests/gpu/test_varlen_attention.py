"""Varlen attention backends against the block-mask reference, on fresh random inputs (CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import TOL, assert_close, random_lengths, requires_cuda, segments_of

from deltapack.ops import attention

pytestmark = [pytest.mark.gpu, requires_cuda]

BACKENDS = ["torch_varlen", "flash_attn", "reference"]


def qkv(total, hq, hkv, dim, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda h: torch.randn(total, h, dim, device="cuda", generator=gen).to(dtype).requires_grad_()  # noqa: E731
    return make(hq), make(hkv), make(hkv)


def skip_unless_runnable(backend: str, dim: int) -> None:
    probe = torch.empty(0, 1, dim, device="cuda", dtype=torch.bfloat16)
    try:
        attention.resolve_attention_backend(backend, probe)
    except RuntimeError as exc:
        pytest.skip(f"{backend} cannot run here: {exc}")


def assert_matches_reference(backend: str, q, k, v, **offsets) -> None:
    """The fast backend on bf16 q, k, v against the reference in fp32: output and the three input gradients."""
    out = attention.varlen_attention(q, k, v, backend=backend, **offsets)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention.varlen_attention_ref(*ref_in, **offsets)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert_close(out, ref, TOL[torch.bfloat16])
    up = torch.randn(out.shape, device=out.device)
    got = torch.autograd.grad(out, (q, k, v), up.to(out.dtype))
    want = torch.autograd.grad(ref, ref_in, up)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, TOL[torch.bfloat16], name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_backend_matches_reference(backend, heads, dim):
    skip_unless_runnable(backend, dim)
    lengths = random_lengths(1200, torch.Generator().manual_seed(dim))
    q, k, v = qkv(sum(lengths), *heads, dim, torch.bfloat16)
    assert_matches_reference(backend, q, k, v, segments=segments_of(lengths))


def test_reference_keeps_documents_apart():
    """The reference equals causal attention on each document alone; causal attention on the stream leaks."""
    lengths = [5, 17, 64, 3]
    segments = segments_of(lengths)
    host = segments.cu_seqlens_host
    q, k, v = (t.detach().float() for t in qkv(sum(lengths), 4, 2, 32, torch.float32))
    out = attention.varlen_attention_ref(q, k, v, segments=segments)
    expand = lambda t: t.repeat_interleave(2, dim=1).transpose(0, 1)  # noqa: E731
    leaky = F.scaled_dot_product_attention(q.transpose(0, 1), expand(k), expand(v), is_causal=True).transpose(0, 1)
    assert (leaky - out).abs().max() > 1e-3
    for a, b in zip(host[:-1], host[1:]):
        alone = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), expand(k[a:b]), expand(v[a:b]), is_causal=True
        ).transpose(0, 1)
        assert (out[a:b] - alone).abs().max() <= 1e-5


def test_automatic_choice_on_cuda(monkeypatch):
    monkeypatch.delenv("DELTAPACK_ATTENTION_BACKEND", raising=False)
    bf16 = torch.empty(0, 1, 128, device="cuda", dtype=torch.bfloat16)
    fp32 = torch.empty(0, 1, 128, device="cuda", dtype=torch.float32)
    assert attention.resolve_attention_backend(None, bf16) in ("torch_varlen", "flash_attn")
    assert attention.resolve_attention_backend(None, fp32) == "reference"  # flash kernels take no fp32
    monkeypatch.setenv("DELTAPACK_ATTENTION_BACKEND", "reference")
    assert attention.resolve_attention_backend(None, bf16) == "reference"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_key_segments_match_reference(backend):
    """Query segments shorter than their key segments (what a context-parallel rank runs): the fast kernel aligns
    causal bottom-right like the reference, forward and backward."""
    skip_unless_runnable(backend, 128)
    k_lengths = random_lengths(1500, torch.Generator().manual_seed(7))
    q_lengths = [max(1, n // 3) if i % 2 else n for i, n in enumerate(k_lengths)]
    q = qkv(sum(q_lengths), 8, 2, 128, torch.bfloat16, seed=1)[0]
    _, k, v = qkv(sum(k_lengths), 8, 2, 128, torch.bfloat16, seed=2)
    assert_matches_reference(backend, q, k, v, segments=segments_of(q_lengths), segments_k=segments_of(k_lengths))
