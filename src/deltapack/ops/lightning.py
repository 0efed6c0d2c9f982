"""Lightning attention (MiniMax): linear attention with a fixed decay per head, state reset at every document.

Per head h, document-local positions t >= s:

    o_t = sum_{s <= t} exp(-slope_h * (t - s)) * (q_t . k_s) * v_s        (no query scale, no normaliser)

which is ``MiniMaxLightningAttention``'s block recurrence (its ``query_decay`` / ``key_decay`` / ``diagonal_decay``
buffers are these powers of ``exp(-slope)`` inside and across blocks). The same recurrence is FLA's simple GLA with a
constant per-head gate ``g_gamma = -slope`` and ``scale = 1``, which is the CUDA fast path.

Legend: T = tokens of the packed stream, H = heads, K / V = key / value head dims, L = chunk length, C = chunks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deltapack.ops.dispatch import Backend, public_function, register_op
from deltapack.ops.fallback import check_fast_backend
from deltapack.ops.fla import verify_chunked
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


def _load_fla() -> Callable[..., torch.Tensor]:
    from fla.ops.simple_gla import chunk_simple_gla

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
            cu_seqlens_cpu=torch.tensor(segments.cu_seqlens_host, dtype=torch.long),
        )
        return o.to(q.dtype)

    probe = Segments.from_cu_seqlens([0, 1, 6, 76], "cuda")  # a 1-token document, one inside a chunk, one across
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = [(torch.randn(1, 76, 2, 32, device="cuda", generator=gen) * 0.3).bfloat16() for _ in range(3)]
    slope = torch.tensor([0.1, 0.01], device="cuda")
    check_fast_backend(
        "FLA's chunk_simple_gla",
        lambda q, k, v: run(q, k, v, slope, segments=probe),
        lambda q, k, v: lightning_attention_ref(q, k, v, slope, segments=probe),
        qkv,
    )
    return run


def _verify_fla(q, k, v, slope, *, segments: Segments, **_: object) -> tuple[bool, str]:
    return verify_chunked(q, k, v, segments, "FLA's simple GLA")


LIGHTNING_ATTENTION = register_op("lightning_attention", lightning_attention_ref)
LIGHTNING_ATTENTION.add_backend(Backend("fla", load=_load_fla, verify=_verify_fla, package="fla"))


lightning_attention = public_function(
    LIGHTNING_ATTENTION,
    """Lightning attention over a packed stream (arguments as :func:`lightning_attention_ref`).

    Backends: "fla" (CUDA, bf16 / fp16 inputs: FLA's ``chunk_simple_gla`` on fp32 q, k, v with the gate -slope per
    token, ``scale=1`` and ``cu_seqlens``, host offsets given so it does not sync; checked forward and backward
    against the reference once per process on first use, refused with a warning if it fails) or "reference"; None
    chooses (see :mod:`deltapack.ops.dispatch`).
    """,
    check=_check,
)
