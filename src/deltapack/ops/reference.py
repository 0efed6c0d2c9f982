"""Exact pure-PyTorch varlen references of the two GDN primitives.

These are the oracle every faster backend is tested against, and the path that runs wherever no kernel is
installed (any device, autograd included). They are written for clarity first. Each has the signature of its
public op in :mod:`deltapack.ops` less ``backend=``.

Legend (shapes): T = tokens in the packed stream, D = conv channels, W = conv width, N = documents,
Hk / Hv = key / value heads (Hv = r * Hk), K / V = key / value head dim.

The varlen rule, as in flash-attn and FLA: a packed stream is one row (batch size 1), and its
:class:`~deltapack.ops.Segments` say where each document starts (see :mod:`deltapack.ops.segments`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deltapack.ops.segments import Segments

CHUNK = 64  # the reference delta rule's chunk length (FLA's and transformers' too)
KDA_CHUNK = 16  # its chunk length with a per-channel decay (an [L, L, K] tensor per chunk and head)

_ACTIVATIONS = {None: None, "silu": F.silu, "swish": F.silu}


def causal_conv1d_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None, *, segments: Segments
) -> Tensor:
    """Depthwise causal conv1d over a packed stream that never reads across a document boundary.

    Args:
        x: [1, T, D] the packed stream, channels last.
        weight: [D, W] per-channel taps; ``weight[:, -1]`` multiplies the current token (as in ``nn.Conv1d``
            with ``padding=W-1`` truncated to the first T outputs).
        bias: [D] or None.
        activation: None or "silu" / "swish".
        segments: the documents of the stream; a tap reads token ``t - s`` only inside the document of ``t``.

    Returns:
        [1, T, D] in the dtype of ``x``; computed in the dtype of ``weight`` (as the model does).
    """
    _check_stream("x", x, 3, segments)
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [D, W] with D = {x.shape[-1]}, got shape {tuple(weight.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(k for k in _ACTIVATIONS if k)} or None, got {activation!r}"
        )
    total, channels = x.shape[1:]
    width = weight.shape[1]
    # Lay the documents out one after another, each behind W - 1 zeros, and run the same F.conv1d the model runs:
    # no tap can reach the previous document, and each document sees exactly the arithmetic it sees alone.
    doc = segments.seq_idx.reshape(-1).to(x.device, torch.long)
    dest = torch.arange(total, device=x.device) + (doc + 1) * (width - 1)
    gapped = x.new_zeros(total + segments.num_docs * (width - 1), channels, dtype=weight.dtype)
    gapped = gapped.index_copy(0, dest, x[0].to(weight.dtype))
    out = F.conv1d(gapped.t().unsqueeze(0), weight.unsqueeze(1), bias, groups=channels)  # [1, D, L - W + 1]
    out = out[0].t().index_select(0, dest - (width - 1)).unsqueeze(0)
    act = _ACTIVATIONS[activation]
    if act is not None:
        out = act(out)
    return out.to(x.dtype)


def _check_stream(name: str, x: torch.Tensor, dims: int, segments: Segments) -> None:
    if x.dim() != dims or x.shape[0] != 1 or x.shape[1] != segments.total_tokens:
        shape = ", ".join(["1", str(segments.total_tokens)] + ["..."] * (dims - 2))
        raise ValueError(
            f"{name} must be one packed stream [{shape}] of the {segments.total_tokens} tokens the segments "
            f"describe, got shape {tuple(x.shape)}"
        )


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, as transformers' and FLA's GDN compute it."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _chunk_layout(
    cu_seqlens_host: list[int], chunk_size: int, device: torch.device
) -> tuple[torch.Tensor, int, list[int]]:
    """Where each token lands when every document is padded on its own to a whole number of chunks.

    Returns (dest [T] int64 index into the padded stream, padded length, first chunk of each document).
    """
    lengths = [b - a for a, b in zip(cu_seqlens_host[:-1], cu_seqlens_host[1:])]
    chunks = [-(-n // chunk_size) for n in lengths]
    first_chunk, acc = [], 0
    for c in chunks:
        first_chunk.append(acc)
        acc += c
    dest = torch.cat([torch.arange(n, device=device) + first * chunk_size for n, first in zip(lengths, first_chunk)])
    return dest, acc * chunk_size, first_chunk


def gated_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    segments: Segments,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule whose state starts at zero for every document (or at ``initial_state``), in fp32;
    the gate is one log-decay per value head (Gated DeltaNet) or one per key channel (KDA: this is also
    :func:`deltapack.ops.kda.kda_ref`).

    The recurrence per value head h, token t (S is [K, V]; exp(g_t) a scalar, or diag(exp(g_t)) per channel):
        S = exp(g_t) * S;  S = S + beta_t * k_t (v_t - S^T k_t)^T;  o_t = S^T (scale * q_t)
    computed chunk by chunk (the WY/UT form transformers and FLA use). Each document is padded on its own to a
    whole number of chunks, so its chunks line up exactly as when it runs alone, and the state is reset at the
    first chunk of every document. Inside a chunk the pairwise decays exp(G_i - G_j) (G = cumulative log-decay) are
    formed directly, never as exp(G_i) * exp(-G_j), so any decay >= -inf is safe; per channel that costs an
    [L, L, K] tensor per chunk and head, hence the shorter default chunk there.

    Args:
        q, k: [1, T, Hk, K]. v: [1, T, Hv, V] with Hv a multiple of Hk (value head h reads key head h // (Hv/Hk)).
        g: [1, T, Hv] log-decay per head, or [1, T, Hv, K] per key channel (<= 0, fp32 preferred).
        beta: [1, T, Hv] write strength in (0, 1).
        segments: the documents of the stream.
        scale: query scale, default K ** -0.5.
        use_qk_l2norm: L2-normalise q and k first (what the Qwen3.5 / Qwen3-Next and KDA layers ask for).
        initial_state: [N, Hv, K, V] the state each document starts from; None: zeros. Gradients flow into it
            (context parallelism hands states across ranks through it).
        output_final_state: also return each document's final state.
        chunk_size: tokens per chunk (default 64 for a per-head decay, 16 per channel); the result does not depend
            on it beyond rounding.

    Returns:
        o: [1, T, Hv, V] in the dtype of q (computed in fp32);
        final state: [N, Hv, K, V] fp32, or None.
    """
    _check_gated_delta_rule(q, k, v, g, beta, segments, initial_state)
    num_k_heads, head_k = q.shape[2:]
    num_v_heads, head_v = v.shape[-2:]
    per_channel = g.dim() == 4
    out_dtype = q.dtype
    scale = head_k**-0.5 if scale is None else scale
    group = num_v_heads // num_k_heads

    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if group > 1:
        q = q.repeat_interleave(group, dim=2)
        k = k.repeat_interleave(group, dim=2)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * scale

    # scatter into the per-document chunk-aligned layout: [Hv, C_total, chunk, *]
    chunk_size = chunk_size or (KDA_CHUNK if per_channel else CHUNK)
    dest, padded_len, first_chunk = _chunk_layout(segments.cu_seqlens_host, chunk_size, q.device)

    def to_chunks(x: torch.Tensor) -> torch.Tensor:  # [1, T, H, *] -> [H, C, L, *]
        buf = x.new_zeros((padded_len, *x.shape[2:])).index_copy(0, dest, x[0])
        return buf.reshape(padded_len // chunk_size, chunk_size, *x.shape[2:]).movedim(2, 0)

    qc, kc, vc = (to_chunks(x) for x in (q, k, v))  # [Hv, C, L, K|V]
    bc = to_chunks(beta)  # [Hv, C, L]
    cum = to_chunks(g if per_channel else g[..., None]).cumsum(2)  # [Hv, C, L, K or 1]: log decay from chunk start

    k_beta = kc * bc.unsqueeze(-1)
    v_beta = vc * bc.unsqueeze(-1)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    if per_channel:  # the decay from token j to token i >= j per channel: [Hv, C, L(i), L(j), K]
        pair_decay = (cum.unsqueeze(3) - cum.unsqueeze(2)).masked_fill(upper[..., None], float("-inf")).exp()
        system = torch.einsum("hcid,hcjd,hcijd->hcij", k_beta, kc, pair_decay)
        attn = torch.einsum("hcid,hcjd,hcijd->hcij", qc, kc, pair_decay)  # causal, diagonal included
    else:  # one decay per head: [Hv, C, L(i), L(j)]
        cum_HCL = cum[..., 0]
        pair_decay = (cum_HCL.unsqueeze(-1) - cum_HCL.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()
        system = (k_beta @ kc.transpose(-1, -2)) * pair_decay
        attn = (qc @ kc.transpose(-1, -2)) * pair_decay
    # UT transform: solve (I + strict_tril(diag(beta) K Gamma K^T)) X = B; unitriangular ignores the diagonal
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * cum.exp(), upper=False, unitriangular=True)
    q_dec = qc * cum.exp()
    k_dec = kc * (cum[:, :, -1:] - cum).exp()
    chunk_decay = cum[:, :, -1].exp().unsqueeze(-1)  # [Hv, C, K or 1, 1]

    o, final = delta_rule_across_chunks(
        u, w, q_dec, attn, k_dec, chunk_decay, first_chunk, initial_state, output_final_state
    )
    o = o.reshape(num_v_heads, padded_len, head_v)  # [Hv, padded, V]
    o = o.index_select(1, dest).transpose(0, 1)  # [T, Hv, V]
    o = o.unsqueeze(0).to(out_dtype)
    return o, final


def delta_rule_across_chunks(
    u: Tensor,
    w: Tensor,
    q_dec: Tensor,
    attn: Tensor,
    k_dec: Tensor,
    chunk_decay: Tensor,
    first_chunk: list[int],
    initial_state: Tensor | None,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """The chunk-to-chunk pass of a chunked (gated) delta rule (the WY/UT form), shared by the gated delta rule and
    KDA: the state [Hv, K, V] starts at zero (or ``initial_state[n]``) at the first chunk of document n.

    Args:
        u: [Hv, C, L, V], w: [Hv, C, L, K] the UT transform's solutions; q_dec: [Hv, C, L, K] the queries decayed from
            the chunk start; attn: [Hv, C, L, L] the causal in-chunk scores; k_dec: [Hv, C, L, K] the keys decayed to
            the chunk end; chunk_decay: [Hv, C, 1, 1] or [Hv, C, K, 1] the decay over each chunk.
        first_chunk: the first chunk of each document (host ints). initial_state: [N, Hv, K, V] or None.

    Returns:
        (o [Hv, C, L, V], final states [N, Hv, K, V] or None).
    """
    num_chunks = u.shape[1]
    starts = {c: n for n, c in enumerate(first_chunk)}  # first chunk -> document
    doc_end_chunk = {c - 1 for c in first_chunk[1:]} | {num_chunks - 1}
    state = u.new_zeros(u.shape[0], w.shape[-1], u.shape[-1])
    outs, finals = [], []
    for c in range(num_chunks):
        if c in starts:
            state = torch.zeros_like(state) if initial_state is None else initial_state[starts[c]].float()
        v_new = u[:, c] - w[:, c] @ state
        outs.append(q_dec[:, c] @ state + attn[:, c] @ v_new)
        state = state * chunk_decay[:, c] + k_dec[:, c].transpose(-1, -2) @ v_new
        if output_final_state and c in doc_end_chunk:
            finals.append(state)
    return torch.stack(outs, dim=1), (torch.stack(finals) if output_final_state else None)


def _check_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, segments: Segments, initial_state: Tensor | None
) -> None:
    _check_stream("q", q, 4, segments)
    num_k_heads, head_k = q.shape[2:]
    num_v_heads, head_v = v.shape[-2:]
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:2] != q.shape[:2] or num_v_heads % num_k_heads:
        raise ValueError(
            f"v must be [1, T, Hv, V] with T = {q.shape[1]} and Hv a multiple of Hk = {num_k_heads}, "
            f"got {tuple(v.shape)}"
        )
    per_head = (*q.shape[:2], num_v_heads)
    if tuple(g.shape) not in (per_head, (*per_head, head_k)):
        raise ValueError(
            f"g must be [1, T, Hv] = {per_head} (one decay per head) or [1, T, Hv, K] = {(*per_head, head_k)} "
            f"(per channel), got {tuple(g.shape)}"
        )
    if tuple(beta.shape) != per_head:
        raise ValueError(f"beta must be [1, T, Hv] = {per_head}, got {tuple(beta.shape)}")
    expected = (segments.num_docs, num_v_heads, head_k, head_v)
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(f"initial_state must be [N, Hv, K, V] = {expected}, got {tuple(initial_state.shape)}")
