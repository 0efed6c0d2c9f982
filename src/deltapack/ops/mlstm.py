"""xLSTM's mLSTM over a packed stream, with memory C, normaliser n and max-stabiliser m reset at every document.

Per head, document-local positions, with f'_t = logsigmoid(f_t) and the stabiliser starting at m_{-1} = 0 (as in
transformers, whose ``m`` state starts at zero, not at -inf):

    m_t = max(f'_t + m_{t-1}, i_t)
    C_t = e^{f'_t + m_{t-1} - m_t} C_{t-1} + e^{i_t - m_t} k_t v_t^T,     n_t = (same) n_{t-1} + e^{i_t - m_t} k_t
    h_t = (s q_t)^T C_t / (max(|(s q_t)^T n_t|, e^{-m_t}) + eps),        s = K^-0.5

The stabiliser is part of the result (through ``e^{-m_t}`` and ``eps``), so the reference computes exactly the same
m_t as the recurrence: inside a chunk, m_t = max(b_t + m_prev, max_{s<=t} (b_t - b_s + i_s)) with b the cumulative
f' from the chunk start (transformers' chunkwise form). Each document is padded on its own to whole chunks; a loop
over chunks carries (C, n, m), reset to (0, 0, 0) at the first chunk of every document.

No maintained kernel computes this mLSTM with varlen offsets; the reference is also the GPU path (no host sync).

Legend: T = tokens of the packed stream, H = heads, K / V = query-key / value head dims, L = chunk length,
C = chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltapack.ops import opaque
from deltapack.ops.dispatch import public_function, register_op
from deltapack.ops.segments import Segments
from deltapack.ops.varlen import acc_dtype, check_stream, chunk_layout

__all__ = ["mlstm", "mlstm_ref"]


def mlstm_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    segments: Segments,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Exact chunkwise mLSTM over a packed stream, (C, n, m) = 0 at every document start.

    Args:
        q, k: [1, T, H, K]. v: [1, T, H, V]. i, f: [1, T, H] input / forget gate pre-activations (f before its
            logsigmoid). segments: the stream's documents. eps: added to the denominator (the layer's
            ``config.eps``). chunk_size: chunk length L.

    Returns:
        h: [1, T, H, V] in the dtype of q, computed in fp32 (fp64 for fp64 inputs).
    """
    check_stream("q", q, segments, 4)
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"deltapack: k must be [1, T, H, K] = {tuple(q.shape)} and v [1, T, H, V], got {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    for name, g in (("i", i), ("f", f)):
        if tuple(g.shape) != tuple(q.shape[:3]):
            raise ValueError(f"deltapack: {name} must be [1, T, H] = {tuple(q.shape[:3])}, got {tuple(g.shape)}")
    scale = q.shape[-1] ** -0.5
    layout = chunk_layout(segments, chunk_size)
    dtype = acc_dtype(q)
    qc, kc, vc = (layout.to_chunks(x.to(dtype)) for x in (q, k, v))  # [H, C, L, K|V]
    ic, fc = (layout.to_chunks(x.to(dtype)) for x in (i, f))  # [H, C, L]
    b = F.logsigmoid(fc).cumsum(-1)  # [H, C, L] log forget product from the chunk start to t, inclusive
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    log_w = (b.unsqueeze(-1) - b.unsqueeze(-2) + ic.unsqueeze(-2)).masked_fill(~causal, float("-inf"))  # [H,C,L,L]
    m_intra = log_w.amax(-1)  # [H, C, L]
    a = b[..., -1:] - b + ic  # [H, C, L] log weight of token s in the state at the chunk end
    a_max = a.amax(-1)  # [H, C]
    g = b[..., -1]  # [H, C] log forget product over the whole chunk

    heads, num_chunks = b.shape[:2]
    mat = qc.new_zeros(heads, qc.shape[-1], vc.shape[-1])
    vec = qc.new_zeros(heads, qc.shape[-1])
    m = qc.new_zeros(heads)
    mats, vecs, ms = [], [], []
    for c in range(num_chunks):
        first = layout.first[c]
        mat = torch.where(first, torch.zeros_like(mat), mat)
        vec = torch.where(first, torch.zeros_like(vec), vec)
        m = torch.where(first, torch.zeros_like(m), m)
        mats.append(mat)
        vecs.append(vec)
        ms.append(m)
        m_next = torch.maximum(g[:, c] + m, a_max[:, c])
        decay = torch.exp(g[:, c] + m - m_next)  # [H]
        k_w = kc[:, c] * torch.exp(a[:, c] - m_next[:, None]).unsqueeze(-1)  # [H, L, K]
        mat = decay[:, None, None] * mat + k_w.transpose(-1, -2) @ vc[:, c]
        vec = decay[:, None] * vec + k_w.sum(-2)
        m = m_next
    mat_in, vec_in, m_in = torch.stack(mats, 1), torch.stack(vecs, 1), torch.stack(ms, 1)  # [H, C, ...]

    m_inter = b + m_in.unsqueeze(-1)  # [H, C, L]
    m_all = torch.maximum(m_inter, m_intra)
    weights = (qc @ kc.transpose(-1, -2)) * scale * torch.exp(log_w - m_all.unsqueeze(-1))
    q_in = qc * (scale * torch.exp(m_inter - m_all)).unsqueeze(-1)
    num = q_in @ mat_in + weights @ vc  # [H, C, L, V]
    den = (q_in @ vec_in.unsqueeze(-1)).squeeze(-1) + weights.sum(-1)  # [H, C, L]
    den = torch.maximum(den.abs(), torch.exp(-m_all)) + eps
    h = num / den.unsqueeze(-1)
    return layout.from_chunks(h).to(q.dtype)


MLSTM = register_op("mlstm", mlstm_ref, meta=opaque.like_value)  # h [1, T, H, V] in the dtype of q


mlstm = public_function(
    MLSTM,
    """mLSTM over a packed stream (arguments as :func:`mlstm_ref`): the reference on every device (no host sync).""",
)
