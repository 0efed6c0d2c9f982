"""Token-by-token oracles of the recurrences (the Mamba scans in float64, KDA in the dtype of its inputs): slow and
plain, what the chunked references and the fast paths are checked against (CPU tests and GPU tests alike)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltapack.ops.kda import _check as _check_kda
from deltapack.ops.reference import l2norm
from deltapack.ops.segments import Segments
from deltapack.ops.selective_scan import _check as _check_selective_scan
from deltapack.ops.selective_scan import _process_delta
from deltapack.ops.ssd import _check as _check_ssd
from deltapack.ops.ssd import _process_dt


def ssd_recurrent_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    segments: Segments,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """Token-by-token form of ``ssd_ref`` (same arguments), in float64: slow, the oracle for the chunked one."""
    _check_ssd(x, dt, A, B, C, segments)
    _, total, heads, _ = x.shape
    rep = heads // B.shape[2]
    dt_TH = _process_dt(dt[0].double(), dt_bias, dt_softplus, dt_limit)
    x_THP, A_H = x[0].double(), A.double()
    B_THN = B[0].double().repeat_interleave(rep, dim=1)
    C_THN = C[0].double().repeat_interleave(rep, dim=1)
    seg = segments.seq_idx[0].tolist()
    state = x_THP.new_zeros(heads, x.shape[-1], B.shape[-1])
    outs = []
    for t in range(total):
        if t == 0 or seg[t] != seg[t - 1]:
            state = torch.zeros_like(state)
        decay = (dt_TH[t] * A_H).exp()[:, None, None]
        state = decay * state + (dt_TH[t][:, None] * x_THP[t])[:, :, None] * B_THN[t][:, None, :]
        outs.append((state * C_THN[t][:, None, :]).sum(-1))
    y = torch.stack(outs)
    if D is not None:
        y = y + D.double()[:, None] * x_THP
    return y.unsqueeze(0).to(x.dtype)


def selective_scan_recurrent_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    segments: Segments,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Token-by-token form of ``selective_scan_ref`` (same arguments), in float64: the oracle, slow."""
    _check_selective_scan(u, delta, A, B, C, segments)
    _, total, channels = u.shape
    rep = channels // B.shape[2]
    delta_TD = _process_delta(delta[0].double(), delta_bias, delta_softplus)
    u_TD, A_DN = u[0].double(), A.double()
    B_TDN = B[0].double().repeat_interleave(rep, dim=1)
    C_TDN = C[0].double().repeat_interleave(rep, dim=1)
    seg = segments.seq_idx[0].tolist()
    h = u_TD.new_zeros(channels, A.shape[1])
    outs = []
    for t in range(total):
        if t == 0 or seg[t] != seg[t - 1]:
            h = torch.zeros_like(h)
        h = torch.exp(delta_TD[t][:, None] * A_DN) * h + (delta_TD[t] * u_TD[t])[:, None] * B_TDN[t]
        outs.append((h * C_TDN[t]).sum(-1))
    y = torch.stack(outs)
    if D is not None:
        y = y + D.double() * u_TD
    if z is not None:
        y = y * F.silu(z[0].double())
    return y.unsqueeze(0).to(u.dtype)


def kda_recurrent_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    segments: Segments,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """Token-by-token form of ``kda_ref`` (same arguments, in the dtype of the inputs): slow, an oracle."""
    _check_kda(q, k, v, g, beta, segments)
    total, heads, head_k = q.shape[1:]
    starts = set(segments.cu_seqlens_host[:-1])
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
