"""Lightning attention (MiniMax): linear attention with a fixed decay per head, state reset at every document.

Per head h, document-local positions t >= s:

    o_t = sum_{s <= t} exp(-slope_h * (t - s)) * (q_t . k_s) * v_s        (no query scale, no normaliser)

which is ``MiniMaxLightningAttention``'s block recurrence (its ``query_decay`` / ``key_decay`` / ``diagonal_decay``
buffers are these powers of ``exp(-slope)`` inside and across blocks). The same recurrence is FLA's simple GLA with a
constant per-head gate ``g_gamma = -slope`` and ``scale = 1``: its fused recurrent kernel is the CUDA fast path (no
host sync), its chunked kernel a second one, asked for by name (see :func:`lightning_attention`).

Legend: T = tokens of the packed stream, H = heads, K / V = key / value head dims, L = chunk length, C = chunks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from deltapack.ops import opaque
from deltapack.ops.dispatch import fla_backend, public_function, register_op
from deltapack.ops.fallback import check_fast_backend
from deltapack.ops.fla import verify_chunked
from deltapack.ops.fla_index import host_offsets
from deltapack.ops.fla_index import install as install_chunk_index
from deltapack.ops.segments import Segments
from deltapack.ops.varlen import acc_dtype, check_stream, chunk_layout

__all__ = ["lightning_attention", "lightning_attention_ref"]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, segments: Segments) -> None:
    check_stream("q", q, segments, 4)
    if k.shape != q.shape:
        raise ValueError(f"deltapack: k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"deltapack: v must be [1, T, H, V] with [1, T, H] = {tuple(q.shape[:3])}, got {tuple(v.shape)}"
        )
    if slope.numel() != q.shape[2]:
        raise ValueError(f"deltapack: slope must hold one decay rate per head ({q.shape[2]}), got {tuple(slope.shape)}")


def lightning_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, *, segments: Segments, chunk_size: int = 64
) -> torch.Tensor:
    """Exact chunked lightning attention over a packed stream, state zero at every document start.

    Args:
        q, k: [1, T, H, K]. v: [1, T, H, V]. slope: [H] (any shape with H elements) decay rate, > 0.
        segments: the stream's documents (``cu_seqlens``, ``cu_seqlens_host``, ``seq_idx``).
        chunk_size: chunk length L; each document is padded on its own to whole chunks.

    Returns:
        o: [1, T, H, V] in the dtype of q, computed in fp32 (fp64 for fp64 inputs); a loop over chunks carries
            the [H, K, V] state.
    """
    _check(q, k, v, slope, segments)
    layout = chunk_layout(segments, chunk_size)
    dtype = acc_dtype(q)
    qc, kc, vc = (layout.to_chunks(x.to(dtype)) for x in (q, k, v))  # [H, C, L, K|V]
    rate = slope.reshape(-1, 1, 1).to(dtype)  # [H, 1, 1]
    pos = torch.arange(chunk_size, device=q.device, dtype=dtype)
    lag = pos[:, None] - pos[None, :]  # [L, L] t - s
    pair = torch.exp((-rate * lag).masked_fill(lag < 0, float("-inf")))  # [H, L, L]
    o_intra = ((qc @ kc.transpose(-1, -2)) * pair[:, None]) @ vc
    q_dec = qc * torch.exp(-rate[..., 0] * (pos + 1))[:, None, :, None]  # decay from the chunk start to t
    k_dec = kc * torch.exp(-rate[..., 0] * (chunk_size - 1 - pos))[:, None, :, None]  # decay from s to the chunk end
    kv = k_dec.transpose(-1, -2) @ vc  # [H, C, K, V]
    chunk_decay = torch.exp(-rate * chunk_size)  # [H, 1, 1]
    state = kv.new_zeros(kv.shape[0], kv.shape[2], kv.shape[3])
    states = []
    for c in range(kv.shape[1]):
        state = torch.where(layout.first[c], torch.zeros_like(state), state)
        states.append(state)
        state = state * chunk_decay + kv[:, c]
    o = o_intra + q_dec @ torch.stack(states, dim=1)
    return layout.from_chunks(o).to(q.dtype)


def _probe() -> tuple[list[torch.Tensor], torch.Tensor, Segments]:
    """A 76-token bf16 probe: a 1-token document, one inside a 64-token chunk, one across."""
    probe = Segments.from_cu_seqlens([0, 1, 6, 76], "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = [(torch.randn(1, 76, 2, 32, device="cuda", generator=gen) * 0.3).bfloat16() for _ in range(3)]
    return qkv, torch.tensor([0.1, 0.01], device="cuda"), probe


def _checked(name: str, run: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``run`` once it passed forward and backward against the reference on the probe (raises otherwise)."""
    qkv, slope, probe = _probe()
    check_fast_backend(
        name,
        lambda q, k, v: run(q, k, v, slope, segments=probe),
        lambda q, k, v: lightning_attention_ref(q, k, v, slope, segments=probe),
        qkv,
    )
    return run


def _load_fla_recurrent() -> Callable[..., torch.Tensor]:
    from fla.ops.simple_gla import fused_recurrent_simple_gla

    def run(q, k, v, slope, *, segments: Segments, **_: object) -> torch.Tensor:
        # one program per (document, head, 64-wide tile of K and V) walks its document token by token with the state
        # in registers, in fp32; the decay is the constant per-head log gate g_gamma = -slope (no gradient)
        o, _ = fused_recurrent_simple_gla(
            q, k, v, g_gamma=-slope.reshape(-1).float(), scale=1.0, cu_seqlens=segments.cu_seqlens
        )
        return o

    return _checked("FLA's fused_recurrent_simple_gla", run)


def _load_fla_chunk() -> Callable[..., torch.Tensor]:
    from fla.ops.simple_gla import chunk_simple_gla

    install_chunk_index(importlib.import_module("fla.ops.simple_gla.chunk"))

    def run(q, k, v, slope, *, segments: Segments, **_: object) -> torch.Tensor:  # chunk_size: FLA's own
        # fp32 q, k, v and a per-token gate: the combination whose backward runs on Hopper (bf16 inputs with a gate
        # are refused there by FLA 0.6 with Triton < 3.7.1); its TF32 dots stay well inside bf16's own error
        g = (-slope.reshape(1, 1, -1).float()).expand(1, q.shape[1], q.shape[2]).contiguous()
        o, _ = chunk_simple_gla(
            q.float(),
            k.float(),
            v.float(),
            g=g,
            scale=1.0,
            cu_seqlens=segments.cu_seqlens,
            cu_seqlens_cpu=segments.plan(host_offsets),
        )
        return o.to(q.dtype)

    return _checked("FLA's chunk_simple_gla", run)


def _verify_fla_recurrent(q, k, v, slope, *, segments: Segments, **_: object) -> tuple[bool, str]:
    if not q.is_cuda:
        return False, f"q is on {q.device.type}; FLA runs on CUDA"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False, f"q, k, v are {q.dtype}, {k.dtype}, {v.dtype}; FLA's recurrent simple GLA is used for bf16 / fp16"
    if slope.requires_grad:
        return False, "slope requires a gradient; FLA's g_gamma gets none"
    return True, ""


def _verify_fla_chunk(q, k, v, slope, *, segments: Segments, **_: object) -> tuple[bool, str]:
    return verify_chunked(q, k, v, segments, "FLA's simple GLA")


LIGHTNING_ATTENTION = register_op(
    "lightning_attention",
    lightning_attention_ref,
    fla_backend(_load_fla_recurrent, _verify_fla_recurrent),
    fla_backend(_load_fla_chunk, _verify_fla_chunk, name="fla_chunk"),
    meta=opaque.like_value,  # o [1, T, H, V] in the dtype of q
)


lightning_attention = public_function(
    LIGHTNING_ATTENTION,
    """Lightning attention over a packed stream (arguments as :func:`lightning_attention_ref`).

    Backends, each checked forward and backward against the reference once per process on first use and refused
    with a warning if it fails:

    - "fla" (CUDA, bf16 / fp16, a slope without gradient): FLA's ``fused_recurrent_simple_gla`` with
      ``g_gamma = -slope``, ``scale=1`` and ``cu_seqlens``; fp32 state, no host sync.
    - "fla_chunk" (asked for by name only, as it syncs): FLA's ``chunk_simple_gla`` on fp32 q, k, v with the gate
      -slope per token and the batch's device chunk index; FLA 0.6 still reads its chunk count on the host three
      times per forward+backward (``chunk_fwd_h`` / ``chunk_bwd_dh``).
    - "reference" (everything else). None chooses (see :mod:`deltapack.ops.dispatch`).
    """,
    check=_check,
)
