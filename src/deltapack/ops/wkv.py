"""RWKV-4's WKV over a packed stream, numerator, denominator and stabiliser reset at every document start.

Per channel d (w = exp(time_decay) > 0, u = time_first), document-local positions:

    wkv_t = (sum_{s<t} e^{-(t-1-s) w + k_s} v_s + e^{u + k_t} v_t) / (sum_{s<t} e^{-(t-1-s) w + k_s} + e^{u + k_t})

``rwkv_linear_attention_cpu`` runs this token by token with the state (num, den, max) stabilised by a running max.
Here the state after each token is a stabilised triple (n, d, p) meaning (e^p n, e^p d); two adjacent windows
combine associatively (the earlier one decays by e^{-w * length of the later}, both rescale to the larger exponent),
so a segmented log-depth (Hillis-Steele) scan computes every token's state in ceil(log2(longest document))
vectorised steps: no loop per token or per document. A window never reaches into the previous document (a token
combines with the one ``stride`` back only when that token is in its own document), so every document starts from
the empty state, as alone. The exponent p is detached: the result does not depend on it (it only keeps exponents
<= 0), so gradients are exact without differentiating through the max.

No maintained kernel computes RWKV-4's WKV with varlen offsets; this reference is also the GPU path (no host sync).

Legend: T = tokens of the packed stream, D = channels.
"""

from __future__ import annotations

import torch

from deltapack.ops import opaque
from deltapack.ops.dispatch import register_op
from deltapack.ops.segments import Segments
from deltapack.ops.varlen import acc_dtype, check_stream, log_steps, positions

__all__ = ["wkv", "wkv_ref"]


def wkv_ref(
    time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segments: Segments
) -> torch.Tensor:
    """Exact varlen RWKV-4 WKV.

    Args:
        time_decay: [D] (w = exp(time_decay)). time_first: [D] (u, the bonus of the current token).
        k, v: [1, T, D] keys and values of the packed stream.
        segments: the stream's documents (``cu_seqlens``, ``seq_idx``, ``max_seqlen``).

    Returns:
        wkv: [1, T, D] in the dtype of k, computed in fp32 (fp64 for fp64 inputs).
    """
    check_stream("k", k, segments, 3)
    if v.shape != k.shape:
        raise ValueError(f"deltapack: v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, p in (("time_decay", time_decay), ("time_first", time_first)):
        if p.numel() != k.shape[-1]:
            raise ValueError(f"deltapack: {name} must hold one value per channel ({k.shape[-1]}), got {tuple(p.shape)}")
    dtype = acc_dtype(k)
    w = torch.exp(time_decay.to(dtype)).reshape(1, 1, -1)
    u = time_first.to(dtype).reshape(1, 1, -1)
    kf, vf = k.to(dtype), v.to(dtype)
    pos = positions(segments)[None, :, None]  # [1, T, 1]

    # inclusive state after token t, over its own document: (n, d, p) = (sum e^{k_s - (t-s) w - p} v_s, ..., p).
    # p is detached; the gradient of k enters through e^{k - p} (value 1) and that of w through the decays.
    p = kf.detach()
    lift = torch.exp(kf - p)
    n, d = vf * lift, lift
    for stride in log_steps(segments):
        same_doc = pos[:, stride:] >= stride
        p_cur = p[:, stride:]
        p_prev = p[:, :-stride] - w * stride  # the earlier window, decayed over this one's `stride` tokens
        p_new = torch.where(same_doc, torch.maximum(p_cur, p_prev.detach()), p_cur)
        e_cur = torch.exp(p_cur - p_new)
        e_prev = torch.exp(torch.where(same_doc, p_prev - p_new, float("-inf")))
        n = torch.cat([n[:, :stride], e_cur * n[:, stride:] + e_prev * n[:, :-stride]], dim=1)
        d = torch.cat([d[:, :stride], e_cur * d[:, stride:] + e_prev * d[:, :-stride]], dim=1)
        p = torch.cat([p[:, :stride], p_new], dim=1)

    # output at t: the state after t - 1 (none at a document start) plus the current token with the bonus u
    has_prev = pos >= 1
    n_prev, d_prev, p_prev = (torch.nn.functional.pad(x[:, :-1], (0, 0, 1, 0)) for x in (n, d, p))
    bonus = u + kf
    top = torch.where(has_prev, torch.maximum(p_prev, bonus.detach()), bonus.detach())
    e_prev = torch.exp(torch.where(has_prev, p_prev - top, float("-inf")))
    e_cur = torch.exp(bonus - top)
    out = (e_prev * n_prev + e_cur * vf) / (e_prev * d_prev + e_cur)
    return out.to(k.dtype)


WKV = register_op("wkv", wkv_ref, meta=opaque.like(2))  # the shape and dtype of k


def wkv(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segments: Segments,
    backend: str | None = None,
) -> torch.Tensor:
    """RWKV-4 WKV over a packed stream (arguments as :func:`wkv_ref`): the reference on every device (no host sync)."""
    return WKV(time_decay, time_first, k, v, segments=segments, backend=backend)
