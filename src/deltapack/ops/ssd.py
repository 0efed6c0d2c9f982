"""The SSD scan of Mamba2 layers over a packed stream, with the state reset at every document start.

Recurrence per head h (state [P, N], zero at the first token of every document):
    dt_t = clamp(softplus(dt_t + dt_bias))            (each step optional, as the model asks)
    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T
    y_t = S_t C_t + D_h * x_t
B and C are shared by the H / G heads of a group (head h reads group h // (H / G)), as in mamba_ssm's
``mamba_chunk_scan_combined``, whose argument names and order this op keeps, with ``segments=`` in place of
``seq_idx``/``cu_seqlens``.

Legend: T = tokens of the packed stream, H = heads, P = head dim, G = groups, N = state size, L = chunk length,
c = chunk index, l / s = positions inside a chunk.

Backends: ``reference`` (:func:`ssd_ref`, pure PyTorch, any device, autograd; the packed stream is cut into chunks of
L tokens regardless of documents, and every decay that would cross a document start is masked to zero: no loop over
documents and no host sync) and ``fla`` (FLA's ``chunk_simple_gla`` with q = C, k = B, v = dt * x, g = dt * A,
scale 1 and the batch's ``cu_seqlens``, CUDA only; asked for by name, see :func:`ssd`).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("deltapack")

BACKENDS = ("reference", "fla")
_logged: set[str] = set()


def _check(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, segments: Any) -> None:
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"x must be one packed stream [1, T, H, P], got shape {tuple(x.shape)}")
    _, total, heads, _ = x.shape
    if tuple(dt.shape) != (1, total, heads):
        raise ValueError(f"dt must be [1, T, H] = {(1, total, heads)}, got {tuple(dt.shape)}")
    if tuple(A.shape) != (heads,):
        raise ValueError(f"A must be [H] = ({heads},), got {tuple(A.shape)}")
    if B.dim() != 4 or tuple(B.shape[:2]) != (1, total) or heads % B.shape[2]:
        raise ValueError(f"B must be [1, T, G, N] with T = {total} and G dividing H = {heads}, got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C must have the shape of B {tuple(B.shape)}, got {tuple(C.shape)}")
    seq_idx = getattr(segments, "seq_idx", None)
    if seq_idx is None or tuple(seq_idx.shape) != (1, total):
        got = None if seq_idx is None else tuple(seq_idx.shape)
        raise ValueError(f"segments.seq_idx must be [1, T] = (1, {total}) (the document of each token), got {got}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when the input is fp64 (the tests' oracles)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _process_dt(
    dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float]
) -> torch.Tensor:
    """What the Mamba2 layers do to dt before the scan, in fp32 (fp64 for fp64 input): bias, softplus, clamp."""
    dt = dt.to(_compute_dtype(dt))
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _chunk(t: torch.Tensor, pad: int, chunk_size: int, value: float = 0) -> torch.Tensor:
    """[T, *] -> [c, L, *], padding the end of the stream with ``value``."""
    if pad:
        t = torch.cat([t, t.new_full((pad, *t.shape[1:]), value)])
    return t.reshape(-1, chunk_size, *t.shape[1:])


def ssd_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    segments: Any,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    chunk_size: int = 64,
) -> torch.Tensor:
    """Exact chunked SSD scan over a packed stream (pure PyTorch, autograd, any device), in fp32 (fp64 input: fp64).

    Args:
        x: [1, T, H, P] the scan input (the model's conv output for x).
        dt: [1, T, H] the raw time step (before ``dt_bias`` / softplus / clamp, which this op applies when asked).
        A: [H] the (negative) decay rate, fp32.
        B, C: [1, T, G, N], G divides H.
        segments: the batch's segments (``seq_idx`` [1, T] int32, the document of each token, is what is read).
        D: [H] skip weight or None. dt_bias: [H] or None. dt_softplus: apply softplus to dt + dt_bias.
        dt_limit: clamp of dt after softplus, as the layers' ``time_step_limit``.
        chunk_size: L, tokens per chunk (the result does not depend on it, up to rounding).

    Returns:
        y: [1, T, H, P] in the dtype of x.
    """
    _check(x, dt, A, B, C, segments)
    _, total, heads, head_dim = x.shape
    rep = heads // B.shape[2]
    pad = (-total) % chunk_size

    dt_TH = _process_dt(dt[0], dt_bias, dt_softplus, dt_limit)
    cdt = _compute_dtype(x)
    x_THP = x[0].to(cdt)
    xdt_cLHP = _chunk(x_THP * dt_TH[..., None], pad, chunk_size)
    cum_cLH = _chunk(dt_TH * A.to(cdt), pad, chunk_size).cumsum(1)  # log decay from the chunk start
    B_cLGN = _chunk(B[0].to(cdt), pad, chunk_size)
    C_cLGN = _chunk(C[0].to(cdt), pad, chunk_size)
    seg_cL = _chunk(segments.seq_idx[0], pad, chunk_size, value=-1)  # the padded tail is a document of its own
    num_chunks = seg_cL.shape[0]
    last_c = seg_cL[:, -1]  # the document whose state leaves each chunk
    prev_last_c = torch.cat([last_c.new_full((1,), -2), last_c[:-1]])  # the document whose state enters it

    # 1. within each chunk: causal, same-document pairs only (every other decay is exactly zero)
    causal_LL = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    keep_cLL = (seg_cL[:, :, None] == seg_cL[:, None, :]) & causal_LL
    pair_cLLH = (cum_cLH[:, :, None] - cum_cLH[:, None, :]).masked_fill(~keep_cLL[..., None], -math.inf).exp()
    scores_cLLG = torch.einsum("clgn,csgn->clsg", C_cLGN, B_cLGN)
    scores_cLLH = scores_cLLG.repeat_interleave(rep, dim=-1, output_size=heads) * pair_cLLH
    y_cLHP = torch.einsum("clsh,cshp->clhp", scores_cLLH, xdt_cLHP)

    # 2. the state each chunk leaves, from the tokens of the chunk's last document
    to_end_cLH = (cum_cLH[:, -1:] - cum_cLH).masked_fill((seg_cL != last_c[:, None])[..., None], -math.inf).exp()
    B_cLHN = B_cLGN.repeat_interleave(rep, dim=2, output_size=heads)
    local_cHPN = torch.einsum("clhn,clhp->chpn", B_cLHN * to_end_cLH[..., None], xdt_cLHP)

    # 3. between chunks: a chunk carries the incoming state through only when it holds no document start
    through_c = last_c == prev_last_c
    log_carry_Hc = cum_cLH[:, -1].masked_fill(~through_c[:, None], -math.inf).t()
    carry_Hcc = _segsum(log_carry_Hc).exp()  # [H, i, z]: decay from the end of chunk z to the end of chunk i
    end_cHPN = torch.einsum("hiz,zhpn->ihpn", carry_Hcc, local_cHPN)
    start_cHPN = torch.cat([torch.zeros_like(end_cHPN[:1]), end_cHPN[:-1]])

    # 4. the incoming state's contribution, to the tokens of the document it belongs to
    from_start_cLH = cum_cLH.masked_fill((seg_cL != prev_last_c[:, None])[..., None], -math.inf).exp()
    C_cLHN = C_cLGN.repeat_interleave(rep, dim=2, output_size=heads)
    y_cLHP = y_cLHP + torch.einsum("clhn,chpn->clhp", C_cLHN, start_cHPN) * from_start_cLH[..., None]

    y_THP = y_cLHP.reshape(num_chunks * chunk_size, heads, head_dim)[:total]
    if D is not None:
        y_THP = y_THP + D.to(cdt)[:, None] * x_THP
    return y_THP.unsqueeze(0).to(x.dtype)


def _segsum(v: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [..., n, n]: out[i, j] = sum(v[j+1 .. i]) for i >= j, -inf above the diagonal.

    Summed without subtracting cumulative sums, so a -inf entry (a reset) gives -inf only for the spans that hold it.
    """
    n = v.shape[-1]
    strict = torch.ones(n, n, dtype=torch.bool, device=v.device).tril(-1)
    spans = v[..., :, None].expand(*v.shape, n).masked_fill(~strict, 0).cumsum(-2)
    return spans.masked_fill(~strict.logical_or(torch.eye(n, dtype=torch.bool, device=v.device)), -math.inf)


def ssd_recurrent_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    segments: Any,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """Token-by-token form of :func:`ssd_ref` (same arguments), in float64: slow, the oracle for the chunked one."""
    _check(x, dt, A, B, C, segments)
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


def _fla_ssd(
    x: torch.Tensor,
    dt_TH: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    segments: Any,
    D: torch.Tensor | None,
) -> torch.Tensor:
    """SSD as FLA's simple GLA: q = C, k = B (repeated per head), v = dt * x, g = dt * A, scale 1."""
    from fla.ops.simple_gla import chunk_simple_gla

    heads = x.shape[2]
    rep = heads // B.shape[2]
    q = C.repeat_interleave(rep, dim=2, output_size=heads).to(x.dtype)
    k = B.repeat_interleave(rep, dim=2, output_size=heads).to(x.dtype)
    v = (x.float() * dt_TH[None, :, :, None]).to(x.dtype)
    g = (dt_TH * A.float()).unsqueeze(0)
    y, _ = chunk_simple_gla(
        q,
        k,
        v,
        g=g,
        scale=1.0,
        cu_seqlens=segments.cu_seqlens.long(),
        cu_seqlens_cpu=torch.tensor(segments.cu_seqlens_host, dtype=torch.long),
    )
    if D is not None:
        y = (y.float() + D.float()[:, None] * x.float()).to(x.dtype)
    return y


def _choose(backend: str | None, device: torch.device) -> str:
    requested = backend or os.environ.get("DELTAPACK_SSD_BACKEND") or "auto"
    if requested not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown SSD backend {requested!r}; expected one of {BACKENDS} or 'auto'")
    chosen = "reference" if requested == "auto" else requested
    if chosen == "fla":
        if device.type != "cuda":
            raise RuntimeError(f"the SSD backend 'fla' runs on CUDA tensors only, got {device.type}")
        try:
            import fla.ops.simple_gla  # noqa: F401
        except ImportError as err:
            raise RuntimeError(f"the SSD backend 'fla' was requested but FLA does not import ({err})") from err
    if chosen not in _logged:
        _logged.add(chosen)
        logger.info("deltapack: ssd runs on the %s backend", chosen)
    return chosen


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    segments: Any,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    backend: str | None = None,
) -> torch.Tensor:
    """The SSD scan over a packed stream; the state starts at zero for each document.

    Arguments as in :func:`ssd_ref`. ``backend``: "reference", "fla" or None; None reads DELTAPACK_SSD_BACKEND, else
    the reference (exact, any device, no host sync, no loop over documents). "fla" runs FLA's ``chunk_simple_gla``
    with the batch's ``cu_seqlens`` (CUDA; its backward depends on the Triton / FLA build, see docs/gpu.md) and
    raises when it cannot run: a backend asked for is never silently replaced.

    Returns:
        y: [1, T, H, P] in the dtype of x.
    """
    _check(x, dt, A, B, C, segments)
    if _choose(backend, x.device) == "fla":
        return _fla_ssd(x, _process_dt(dt[0], dt_bias, dt_softplus, dt_limit), A, B, C, segments, D)
    return ssd_ref(x, dt, A, B, C, segments=segments, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
