"""Kimi delta attention (KDA) over a packed stream: the gated delta rule with a per-channel decay, state reset per
document.

The recurrence per value head h, token t (S is [K, V], g_t is a [K] log-decay, one per key channel):
    S = diag(exp(g_t)) S;  S = S + beta_t * k_t (v_t - S^T k_t)^T;  o_t = S^T (scale * q_t)
with q and k L2-normalised first when ``use_qk_l2norm`` (what kimi_linear, bailing_hybrid and glm5_next ask for),
``scale`` = K ** -0.5 by default. This is FLA's ``chunk_kda`` / ``naive_recurrent_kda`` and transformers' torch
fallback ``chunk_kimi_delta_attention`` on each document alone.

- :func:`kda_ref`: exact, chunked, pure PyTorch (autograd, any device): the oracle and the CPU path.
- :func:`kda`: the public op; FLA's ``chunk_kda`` with ``cu_seqlens`` for bf16 / fp16 on CUDA, else the reference.

Legend: T = tokens of the packed stream, N = documents, H / Hv = key / value heads (Hv = r * H), K / V = head dims,
C = chunks, L = chunk length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deltapack.ops.reference import _chunk_layout, l2norm

__all__ = ["kda", "kda_recurrent_ref", "kda_ref"]

_FAST_DTYPES = (torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 256  # FLA's KDA kernels take K <= 256


def _offsets(segments: Any, total: int) -> list[int]:
    host = getattr(segments, "cu_seqlens_host", None)
    bounds = [int(c) for c in host] if host is not None else segments.cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"segments.cu_seqlens must start at 0, increase strictly and end at T = {total}, got {bounds}")
    return bounds


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"q must be one packed stream [1, T, H, K], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    _, total, heads, head_k = q.shape
    if v.dim() != 4 or v.shape[:2] != q.shape[:2] or v.shape[2] % heads:
        raise ValueError(
            f"v must be [1, T, Hv, V] with T = {total} and Hv a multiple of H = {heads}, got {tuple(v.shape)}"
        )
    hv = v.shape[2]
    if tuple(g.shape) != (1, total, hv, head_k):
        raise ValueError(
            f"g must be [1, T, Hv, K] = {(1, total, hv, head_k)} (per-channel decay), got {tuple(g.shape)}"
        )
    if tuple(beta.shape) != (1, total, hv):
        raise ValueError(f"beta must be [1, T, Hv] = {(1, total, hv)}, got {tuple(beta.shape)}")


def kda_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    segments: Any,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    output_final_state: bool = False,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked KDA whose state starts at zero for every document (or at ``initial_state``), exact, in fp32.

    Each document is padded on its own to whole chunks, so its chunks line up exactly as when it runs alone; the
    state is reset at the first chunk of every document. Inside a chunk the pairwise decays exp(G_i - G_j) per
    channel (G = cumulative log-decay) are formed directly, never as exp(G_i) * exp(-G_j), so any decay >= -inf is
    safe; that costs an [L, L, K] tensor per chunk and head, hence the short default chunk.

    Args:
        q, k: [1, T, H, K]. v: [1, T, Hv, V] (value head h reads key head h // (Hv / H)).
        g: [1, T, Hv, K] log-decay per channel (<= 0). beta: [1, T, Hv] write strength.
        segments: the documents of the stream (``cu_seqlens`` [N + 1] int32 and ``cu_seqlens_host``), e.g. a
            ``deltapack.Boundaries``.
        scale: query scale, default K ** -0.5. use_qk_l2norm: L2-normalise q and k first (in fp32).
        output_final_state: also return each document's final state. initial_state: [N, Hv, K, V] or None (zeros).
        chunk_size: tokens per chunk (any positive int: the result does not depend on it beyond rounding).

    Returns:
        (o [1, T, Hv, V] in the dtype of q, final states [N, Hv, K, V] fp32 or None).
    """
    _check(q, k, v, g, beta)
    total, heads, head_k = q.shape[1:]
    num_v_heads, head_v = v.shape[2:]
    bounds = _offsets(segments, total)
    if initial_state is not None and tuple(initial_state.shape) != (len(bounds) - 1, num_v_heads, head_k, head_v):
        raise ValueError(
            f"initial_state must be [N, Hv, K, V] = {(len(bounds) - 1, num_v_heads, head_k, head_v)}, "
            f"got {tuple(initial_state.shape)}"
        )
    out_dtype = q.dtype
    scale = head_k**-0.5 if scale is None else scale
    group = num_v_heads // heads
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if group > 1:
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    q = q * scale

    dest, padded_len, first_chunk = _chunk_layout(bounds, chunk_size, q.device)

    def to_chunks(x: torch.Tensor) -> torch.Tensor:  # [1, T, Hv, *] -> [Hv, C, L, *]
        buf = x.new_zeros((padded_len, *x.shape[2:])).index_copy(0, dest, x[0])
        return buf.reshape(padded_len // chunk_size, chunk_size, *x.shape[2:]).movedim(2, 0)

    q_HCLK, k_HCLK, v_HCLV, g_HCLK = (to_chunks(x) for x in (q, k, v, g))
    beta_HCL = to_chunks(beta)
    cum_HCLK = g_HCLK.cumsum(2)  # log decay from the chunk start to each position, per channel
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    # decay from token j to token i >= j, per channel: [Hv, C, L(i), L(j), K]; 0 above the diagonal
    pair = (cum_HCLK.unsqueeze(3) - cum_HCLK.unsqueeze(2)).masked_fill(upper[..., None], float("-inf")).exp()
    k_beta = k_HCLK * beta_HCL.unsqueeze(-1)
    # UT transform: solve (I + strict_tril(diag(beta) K Gamma K^T)) X = B; unitriangular ignores the diagonal
    system = torch.einsum("hcid,hcjd,hcijd->hcij", k_beta, k_HCLK, pair)
    u = torch.linalg.solve_triangular(system, v_HCLV * beta_HCL.unsqueeze(-1), upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * cum_HCLK.exp(), upper=False, unitriangular=True)
    attn = torch.einsum("hcid,hcjd,hcijd->hcij", q_HCLK, k_HCLK, pair)  # causal, diagonal included
    q_dec = q_HCLK * cum_HCLK.exp()
    k_dec = k_HCLK * (cum_HCLK[:, :, -1:] - cum_HCLK).exp()
    chunk_decay = cum_HCLK[:, :, -1].exp().unsqueeze(-1)  # [Hv, C, K, 1]

    num_chunks = q_HCLK.shape[1]
    starts = {c: n for n, c in enumerate(first_chunk)}
    doc_end_chunk = {c - 1 for c in first_chunk[1:]} | {num_chunks - 1}
    state = q.new_zeros(num_v_heads, head_k, head_v)
    outs, finals = [], []
    for c in range(num_chunks):
        if c in starts:
            state = torch.zeros_like(state) if initial_state is None else initial_state[starts[c]].float()
        v_new = u[:, c] - w[:, c] @ state
        outs.append(q_dec[:, c] @ state + attn[:, c] @ v_new)
        state = state * chunk_decay[:, c] + k_dec[:, c].transpose(-1, -2) @ v_new
        if output_final_state and c in doc_end_chunk:
            finals.append(state)

    o = torch.stack(outs, dim=1).reshape(num_v_heads, padded_len, head_v).index_select(1, dest)
    o = o.transpose(0, 1).unsqueeze(0).to(out_dtype)
    return o, (torch.stack(finals) if output_final_state else None)


def kda_recurrent_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    segments: Any,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """Token-by-token form of :func:`kda_ref` (same arguments, in the dtype of the inputs): slow, an oracle."""
    _check(q, k, v, g, beta)
    total, heads, head_k = q.shape[1:]
    starts = set(_offsets(segments, total)[:-1])
    scale = head_k**-0.5 if scale is None else scale
    group = v.shape[2] // heads
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q, k = q.repeat_interleave(group, dim=2) * scale, k.repeat_interleave(group, dim=2)
    state = q.new_zeros(v.shape[2], head_k, v.shape[3])
    outs = []
    for t in range(total):
        if t in starts:
            state = torch.zeros_like(state)
        state = state * g[0, t].exp().unsqueeze(-1)
        pred = (state * k[0, t].unsqueeze(-1)).sum(-2)
        state = state + k[0, t].unsqueeze(-1) * ((v[0, t] - pred) * beta[0, t].unsqueeze(-1)).unsqueeze(-2)
        outs.append((state * q[0, t].unsqueeze(-1)).sum(-2))
    return torch.stack(outs).unsqueeze(0)


def runs_fla(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether FLA's ``chunk_kda`` takes these inputs (bf16 / fp16 on CUDA, head dims <= 256); else the reference.

    fp32 takes the reference, as for the gated delta rule: FLA's Triton dots default to tf32."""
    from deltapack.ops import fla

    return (
        fla.AVAILABLE
        and _fla_chunk_kda is not None
        and q.is_cuda
        and q.dtype in _FAST_DTYPES
        and max(q.shape[-1], v.shape[-1]) <= _MAX_HEAD_DIM
    )


try:  # FLA is an optional extra (deltapack[gpu])
    from fla.ops.kda import chunk_kda as _fla_chunk_kda
except Exception:  # noqa: BLE001 - any import failure means: not available, use the reference
    _fla_chunk_kda = None


def _kda_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    segments: Any,
    scale: float | None,
    use_qk_l2norm: bool,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FLA's ``chunk_kda`` with ``cu_seqlens`` (the decay computed by the caller, as the models do), split at
    document boundaries where the stream has more chunks than one launch takes."""
    from deltapack.ops import fla

    host: Sequence[int] = _offsets(segments, q.shape[1])
    plan = fla.prepare(segments.cu_seqlens, host, getattr(segments, "cache", None))
    outs, finals = [], []
    for part in plan.parts:
        sl = slice(part.start, part.end)
        o, final = _fla_chunk_kda(
            q[:, sl],
            k[:, sl],
            v[:, sl],
            g[:, sl],
            beta[:, sl],
            scale=scale,
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm,
            cu_seqlens=part.cu_seqlens,
            cu_seqlens_cpu=part.cu_seqlens_cpu,
        )
        outs.append(o)
        finals.append(final)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    final = None if not output_final_state else (finals[0] if len(finals) == 1 else torch.cat(finals, dim=0))
    return o, final


def kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    segments: Any,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    output_final_state: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA over a packed stream, state reset per document (arguments and results as in :func:`kda_ref`).

    backend: "reference", "fla" or None (automatic: ``fla`` for bf16 / fp16 CUDA tensors when FLA imports, else the
    reference; also the ``DELTAPACK_BACKEND`` environment variable). "fla" where it cannot run raises.
    """
    from deltapack.ops.dispatch import resolve_backend

    _check(q, k, v, g, beta)
    if getattr(segments, "context_parallel", None) is not None:
        raise NotImplementedError("deltapack: KDA under context parallelism is not supported yet; expected one rank")
    chosen = resolve_backend(backend, q.device, "kda")
    if chosen == "fla" and runs_fla(q, v):
        return _kda_fla(
            q,
            k,
            v,
            g,
            beta,
            segments=segments,
            scale=scale,
            use_qk_l2norm=use_qk_l2norm,
            output_final_state=output_final_state,
        )
    if chosen == "fla" and backend == "fla":
        raise RuntimeError(
            f"deltapack: backend 'fla' was requested for kda but FLA's chunk_kda takes bf16 / fp16 CUDA tensors with "
            f"head dims <= {_MAX_HEAD_DIM} (got {q.dtype} on {q.device.type}, K = {q.shape[-1]}, V = {v.shape[-1]})"
        )
    return kda_ref(
        q,
        k,
        v,
        g,
        beta,
        segments=segments,
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
        output_final_state=output_final_state,
    )
