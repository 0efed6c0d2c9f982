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
documents and no host sync) and ``fla`` (CUDA: simple GLA with q = C, k = B, v = dt * x, g = dt * A, scale 1, per
document, computed in fp32 by FLA's kernels launched with the batch's plan, :mod:`deltapack.ops.simple_gla_fla`; the
first of :data:`STRATEGIES` that passes its first-use check on this GPU, see :func:`ssd`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deltapack.ops import opaque, simple_gla_fla
from deltapack.ops.dispatch import fla_backend, public_function, register_op
from deltapack.ops.fallback import Fallback, KernelFailure, check_fast_backend
from deltapack.ops.fla_index import host_offsets
from deltapack.ops.segments import Segments
from deltapack.ops.varlen import acc_dtype, check_stream

__all__ = ["SSD", "ssd", "ssd_ref"]

logger = logging.getLogger("deltapack")


def _check(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, segments: Segments
) -> None:
    check_stream("x", x, segments, 4)
    _, total, heads, _ = x.shape
    if tuple(dt.shape) != (1, total, heads):
        raise ValueError(f"dt must be [1, T, H] = {(1, total, heads)}, got {tuple(dt.shape)}")
    if tuple(A.shape) != (heads,):
        raise ValueError(f"A must be [H] = ({heads},), got {tuple(A.shape)}")
    if B.dim() != 4 or tuple(B.shape[:2]) != (1, total) or heads % B.shape[2]:
        raise ValueError(f"B must be [1, T, G, N] with T = {total} and G dividing H = {heads}, got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C must have the shape of B {tuple(B.shape)}, got {tuple(C.shape)}")


def _process_dt(
    dt: Tensor,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    **_: object,
) -> Tensor:
    """What the Mamba2 layers do to dt before the scan, in fp32 (fp64 for fp64 input): bias, softplus, clamp (the
    defaults are :func:`ssd_ref`'s; the scan's other options are not read here)."""
    dt = dt.to(acc_dtype(dt))
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
    segments: Segments,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """Exact chunked SSD scan over a packed stream (pure PyTorch, autograd, any device), in fp32 (fp64 input: fp64).

    Args:
        x: [1, T, H, P] the scan input (the model's conv output for x).
        dt: [1, T, H] the raw time step (before ``dt_bias`` / softplus / clamp, which this op applies when asked).
        A: [H] the (negative) decay rate, fp32.
        B, C: [1, T, G, N], G divides H.
        segments: the batch's segments (``seq_idx`` [1, T] int32, the document of each token, is what is read).
        chunk_size: L, tokens per chunk (the result does not depend on it, up to rounding).
        D: [H] skip weight or None. dt_bias: [H] or None. dt_softplus: apply softplus to dt + dt_bias.
        dt_limit: clamp of dt after softplus, as the layers' ``time_step_limit``.

    Returns:
        y: [1, T, H, P] in the dtype of x.
    """
    _check(x, dt, A, B, C, segments)
    cdt = acc_dtype(x)
    dt_TH = _process_dt(dt[0], dt_bias, dt_softplus, dt_limit)
    x_THP = x[0].to(cdt)
    y_THP = gated_linear_attention_ref(
        C[0].to(cdt), B[0].to(cdt), x_THP * dt_TH[..., None], dt_TH * A.to(cdt), segments, chunk_size
    )
    if D is not None:
        y_THP = y_THP + D.to(cdt)[:, None] * x_THP
    return y_THP.unsqueeze(0).to(x.dtype)


def gated_linear_attention_ref(
    q_TGN: torch.Tensor, k_TGN: torch.Tensor, v_THP: torch.Tensor, g_TH: torch.Tensor, segments: Segments, chunk: int
) -> torch.Tensor:
    """The core of the SSD scan (simple GLA, scale 1): o_t = sum_{s <= t, same document} exp(g_{s+1} + .. + g_t)
    (q_t . k_s) v_s, chunked over the stream with every decay across a document start masked to zero.

    q, k: [T, G, N] (head h reads group h // (H / G)); v: [T, H, P]; g: [T, H] log decays. Returns [T, H, P].
    """
    total, heads, head_dim = v_THP.shape
    rep = heads // q_TGN.shape[1]
    pad = (-total) % chunk
    v_cLHP = _chunk(v_THP, pad, chunk)
    cum_cLH = _chunk(g_TH, pad, chunk).cumsum(1)  # log decay from the chunk start
    k_cLGN, q_cLGN = _chunk(k_TGN, pad, chunk), _chunk(q_TGN, pad, chunk)
    seg_cL = _chunk(segments.seq_idx[0], pad, chunk, value=-1)  # the padded tail is a document of its own
    num_chunks = seg_cL.shape[0]
    last_c = seg_cL[:, -1]  # the document whose state leaves each chunk
    prev_last_c = torch.cat([last_c.new_full((1,), -2), last_c[:-1]])  # the document whose state enters it

    # 1. within each chunk: causal, same-document pairs only (every other decay is exactly zero)
    causal_LL = torch.ones(chunk, chunk, dtype=torch.bool, device=v_THP.device).tril()
    keep_cLL = (seg_cL[:, :, None] == seg_cL[:, None, :]) & causal_LL
    pair_cLLH = (cum_cLH[:, :, None] - cum_cLH[:, None, :]).masked_fill(~keep_cLL[..., None], -math.inf).exp()
    scores_cLLG = torch.einsum("clgn,csgn->clsg", q_cLGN, k_cLGN)
    scores_cLLH = scores_cLLG.repeat_interleave(rep, dim=-1, output_size=heads) * pair_cLLH
    o_cLHP = torch.einsum("clsh,cshp->clhp", scores_cLLH, v_cLHP)

    # 2. the state each chunk leaves, from the tokens of the chunk's last document
    to_end_cLH = (cum_cLH[:, -1:] - cum_cLH).masked_fill((seg_cL != last_c[:, None])[..., None], -math.inf).exp()
    k_cLHN = k_cLGN.repeat_interleave(rep, dim=2, output_size=heads)
    local_cHPN = torch.einsum("clhn,clhp->chpn", k_cLHN * to_end_cLH[..., None], v_cLHP)

    # 3. between chunks: a chunk carries the incoming state through only when it holds no document start
    through_c = last_c == prev_last_c
    log_carry_Hc = cum_cLH[:, -1].masked_fill(~through_c[:, None], -math.inf).t()
    carry_Hcc = _segsum(log_carry_Hc).exp()  # [H, i, z]: decay from the end of chunk z to the end of chunk i
    end_cHPN = torch.einsum("hiz,zhpn->ihpn", carry_Hcc, local_cHPN)
    start_cHPN = torch.cat([torch.zeros_like(end_cHPN[:1]), end_cHPN[:-1]])

    # 4. the incoming state's contribution, to the tokens of the document it belongs to
    from_start_cLH = cum_cLH.masked_fill((seg_cL != prev_last_c[:, None])[..., None], -math.inf).exp()
    q_cLHN = q_cLGN.repeat_interleave(rep, dim=2, output_size=heads)
    o_cLHP = o_cLHP + torch.einsum("clhn,chpn->clhp", q_cLHN, start_cHPN) * from_start_cLH[..., None]
    return o_cLHP.reshape(num_chunks * chunk, heads, head_dim)[:total]


def _segsum(v: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [..., n, n]: out[i, j] = sum(v[j+1 .. i]) for i >= j, -inf above the diagonal.

    Summed without subtracting cumulative sums, so a -inf entry (a reset) gives -inf only for the spans that hold it.
    """
    n = v.shape[-1]
    strict = torch.ones(n, n, dtype=torch.bool, device=v.device).tril(-1)
    spans = v[..., :, None].expand(*v.shape, n).masked_fill(~strict, 0).cumsum(-2)
    return spans.masked_fill(~strict.logical_or(torch.eye(n, dtype=torch.bool, device=v.device)), -math.inf)


# ---------------------------------------------------------------------------------------------- the CUDA backend
Gla = Callable[[Tensor, Tensor, Tensor, Tensor, Segments], Tensor]


def _gla_ref(q: Tensor, k: Tensor, v: Tensor, g: Tensor, segments: Segments) -> Tensor:
    """:func:`gated_linear_attention_ref` with the shapes of a ``Gla`` (q, k: [1, T, G, N]; v: [1, T, H, P];
    g: [1, T, H]), in the dtype of v."""
    cdt = acc_dtype(v)
    out = gated_linear_attention_ref(q[0].to(cdt), k[0].to(cdt), v[0].to(cdt), g[0].to(cdt), segments, 64)
    return out.unsqueeze(0).to(v.dtype)


class _GatedLinearAttention(torch.autograd.Function):
    """o = simple GLA(q, k, v, g) with scale 1 per document, where ``fwd`` computes that forward (a kernel).

    The backward is three more calls of the same forward, so it needs no backward kernel (the fallback for a GPU
    where FLA's backward does not run): with D(l, s) the decay from s to l,
        dq_l = sum_{s<=l} D(l, s) (do_l . v_s) k_s    = fwd(do, v, k, g)
        dk_s = sum_{l>=s} D(l, s) (do_l . v_s) q_l    = the same, run backwards in time: fwd(v, do, q, g reversed)
        dv_s = sum_{l>=s} D(l, s) (q_l . k_s) do_l    = fwd(k, q, do, g reversed)
        dg_t = sum over later tokens t' >= t of the same document of (q_t' . dq_t' - k_t' . dk_t')
    Reversed in time, the stream's documents come in reverse order and the decay between two tokens is that of the
    tokens after the earlier one, so the gates shift by one (the gate at a document start is never read).
    """

    @staticmethod
    def forward(ctx, q, k, v, g, fwd, segments):  # noqa: ANN001, ANN205 - autograd signature
        ctx.save_for_backward(q, k, v, g)
        ctx.fwd, ctx.segments = fwd, segments
        return fwd(q, k, v, g, segments)

    @staticmethod
    def backward(ctx, do):  # noqa: ANN001, ANN205
        q, k, v, g = ctx.saved_tensors
        fwd, segments = ctx.fwd, ctx.segments
        do = do.to(v.dtype).contiguous()
        back = segments.plan(_reversed_segments)
        g_back = torch.cat([torch.zeros_like(g[:, :1]), g.flip(1)[:, :-1]], 1)

        def backwards(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return fwd(a.flip(1), b.flip(1), c.flip(1), g_back, back).flip(1)

        dq = fwd(do, v, k, g, segments)
        dk = backwards(v, do, q)
        dv = backwards(k, q, do)
        # per-token dots in the inputs' dtype, the sums along the stream (which cancel) in fp64
        d_cum = (q * dq).sum(-1, dtype=torch.float64) - (k * dk).sum(-1, dtype=torch.float64)  # [1, T, H]
        after = d_cum.flip(1).cumsum(1).flip(1)  # sum over t' >= t in the stream
        end = segments.cu_seqlens.long()[segments.seq_idx[0].long() + 1]  # [T] end of each token's document
        after = torch.cat([after, torch.zeros_like(after[:, :1])], 1)
        dg = (after[:, : g.shape[1]] - after[:, end]).to(g.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, None, None


def _reversed_segments(segments: Segments) -> Segments:
    """The segments of the stream flipped in time (documents in reverse order), built on the device (no copy from
    the host, so no sync)."""
    host = segments.cu_seqlens_host
    return Segments(
        cu_seqlens=host[-1] - segments.cu_seqlens.flip(0),
        cu_seqlens_host=tuple(host[-1] - c for c in reversed(host)),
        seq_idx=(len(host) - 2) - segments.seq_idx.flip(1),
        max_seqlen=segments.max_seqlen,
    )


def gla_from_forward_calls(forward_kernel: Gla) -> Gla:
    """A ``Gla`` whose backward is three more calls of ``forward_kernel(q, k, v, g, segments)`` (q, k per head:
    [1, T, H, N]), see :class:`_GatedLinearAttention`."""

    def gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, segments: Segments) -> Tensor:
        heads = v.shape[2]
        q, k = (t.repeat_interleave(heads // t.shape[2], dim=2, output_size=heads) for t in (q, k))
        return _GatedLinearAttention.apply(q, k, v, g, forward_kernel, segments)

    return gla


_FAILURE = KernelFailure("FLA's simple GLA kernels", "the SSD scan")


def _chunk_simple_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, segments: Segments) -> Tensor:
    """FLA's public ``chunk_simple_gla`` forward (scale 1, the batch's offsets): a host sync or two per call (its
    wrapper builds indices on the host and reads a chunk count back); the last resort before the reference."""
    from fla.ops.simple_gla import chunk_simple_gla

    o, _ = chunk_simple_gla(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        g=g.float().contiguous(),
        scale=1.0,
        cu_seqlens=segments.cu_seqlens,
        cu_seqlens_cpu=segments.plan(host_offsets),
    )
    return o


def _caught(kernel: Gla) -> Gla:
    """``kernel``, with a run-time failure recorded once (logged) and the exact reference computing this call and
    every later one: never a crash mid-training, never a leak."""

    def run(q: Tensor, k: Tensor, v: Tensor, g: Tensor, segments: Segments) -> Tensor:
        if not _FAILURE:
            try:
                return kernel(q, k, v, g, segments)
            except Exception as exc:  # noqa: BLE001 - any kernel failure: the reference is exact
                _FAILURE.record(exc)
        return _gla_ref(q, k, v, g, segments)

    return run


def _fla_native(q: Tensor, k: Tensor, v: Tensor, g: Tensor, segments: Segments) -> Tensor:
    return simple_gla_fla.simple_gla(q, k, v, g, segments)


def _fla_native_caught(q: Tensor, k: Tensor, v: Tensor, g: Tensor, segments: Segments) -> Tensor:
    """FLA's forward and backward kernels; a failure of either at run time is recorded once and the reference
    takes over (that call's backward included)."""
    run = functools.partial(simple_gla_fla.simple_gla, fallback=Fallback(_FAILURE, _gla_ref))
    return _caught(run)(q, k, v, g, segments)


# How the ``fla`` backend computes simple GLA, best first: (name, what the first-use check runs, what runs after).
# The first whose check passes on this GPU is used for the rest of the process.
STRATEGIES: tuple[tuple[str, Gla, Gla], ...] = (
    ("FLA's forward and backward kernels, no host sync", _fla_native, _fla_native_caught),
    (
        "FLA's forward kernels, backward from three more forwards, no host sync",
        gla_from_forward_calls(simple_gla_fla.simple_gla_forward),
        gla_from_forward_calls(_caught(simple_gla_fla.simple_gla_forward)),
    ),
    (
        "FLA's chunk_simple_gla forward, backward from three more forwards (host syncs in FLA's wrapper)",
        gla_from_forward_calls(_chunk_simple_gla),
        gla_from_forward_calls(_caught(_chunk_simple_gla)),
    ),
)
_CHOSEN: list[Gla] = []  # the strategy this process runs, set by the first-use check


def ssd_via_gla(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, segments: Segments, **options: Any
) -> Tensor:
    """:func:`ssd_ref`'s arguments (``options``: its keywords, and ``gla``), computed as
    SSD = simple GLA(q = C, k = B, v = dt * x, g = dt * A) + D * x in fp32 (fp64 for fp64 inputs), with
    ``gla(q, k, v, g, segments)`` (q, k: [1, T, G, N] per group; v: [1, T, H, P]; g: [1, T, H]; autograd) for the
    scan: default, the strategy the ``fla`` backend chose on this GPU (``chunk_size`` is the kernel's own)."""
    gla: Gla = options.pop("gla", None) or _CHOSEN[0]
    D: Tensor | None = options.get("D")
    cdt = acc_dtype(x)
    dt_TH = _process_dt(dt[0], **options)
    x_1THP = x.to(cdt)
    v_1THP = x_1THP * dt_TH[None, :, :, None]
    g_1TH = (dt_TH * A.to(cdt)).unsqueeze(0)
    y_1THP = gla(C.to(cdt), B.to(cdt), v_1THP, g_1TH, segments)
    if D is not None:
        y_1THP = y_1THP + D.to(cdt)[:, None] * x_1THP
    return y_1THP.to(x.dtype)


def ssd_via_forward_kernel(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, segments: Segments, **options: Any
) -> Tensor:
    """:func:`ssd_via_gla` with the backward built from three more calls of ``options["forward_kernel"]``
    (``forward_kernel(q, k, v, g, segments)``, q and k per head)."""
    gla = gla_from_forward_calls(options.pop("forward_kernel"))
    return ssd_via_gla(x, dt, A, B, C, segments=segments, gla=gla, **options)


_FAST_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _verify_fla(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, **_: object) -> tuple[bool, str]:
    if not x.is_cuda:
        return False, f"x is on {x.device.type}; FLA runs on CUDA"
    if x.dtype not in _FAST_DTYPES:
        return False, f"x is {x.dtype}; the FLA path takes bf16 / fp16 / fp32 (and computes in fp32)"
    if x.shape[-1] > 256 or B.shape[-1] > 256:
        return False, f"head dim {x.shape[-1]} / state {B.shape[-1]} above FLA's 256"
    return True, ""


def _load_fla() -> Callable[..., torch.Tensor]:
    import fla.ops.simple_gla  # noqa: F401 - fails here, not mid-forward, when FLA is missing

    if torch.cuda.is_available() and not _CHOSEN:
        _CHOSEN.append(_choose_on_this_gpu())
    return ssd_via_gla


def _choose_on_this_gpu(
    strategies: tuple[tuple[str, Gla, Gla], ...] = STRATEGIES, device: str = "cuda", more_documents: int = 29
) -> Gla:
    """Once per process: each strategy in turn vs the reference (outputs and input gradients, relative L2, fp32
    with TF32 matmuls) on a small packed stream with the Mamba2 dims; the first that passes is used, and one log
    line says which. Raises (so the reference runs) when none does."""
    gen = torch.Generator().manual_seed(0)
    # a 1-token document, one of a chunk plus one, one of a chunk, then enough documents that the kernels' Triton
    # autotuning (on this first call; its keys hold no token or document count) sees a GPU-filling grid
    lengths = [1, 65, 64, *torch.randint(20, 150, (more_documents,), generator=gen).tolist()]
    segments = Segments.from_cu_seqlens([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    total, heads, head_dim, groups, state = sum(lengths), 8, 64, 2, 128  # the GPU tests' heads and groups

    def rnd(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    A = (-torch.rand(heads, generator=gen) * 0.1).to(device)
    inputs = [rnd(1, total, heads, head_dim), rnd(1, total, heads), A, rnd(1, total, groups, state, scale=0.1),
              rnd(1, total, groups, state, scale=0.1)]  # fmt: skip
    kw = dict(segments=segments, D=torch.ones(heads, device=device), dt_softplus=True)
    errors = []
    for name, checked, runs in strategies:
        try:
            check_fast_backend(
                name,
                lambda *xs, gla=checked: ssd_via_gla(*xs, gla=gla, **kw),
                lambda *xs: ssd_ref(*xs, **kw),
                inputs,
                tol=1e-2,
            )
        except RuntimeError as exc:
            errors.append(str(exc))
            logger.warning("deltapack: the SSD scan cannot use %s: %s", name, exc)
            continue
        logger.info("deltapack: the SSD scan runs %s", name)
        return runs
    raise RuntimeError("; ".join(errors))


# y has the shape and dtype of x; one FLA backend whose strategy is chosen on first use (see STRATEGIES)
SSD = register_op("ssd", ssd_ref, fla_backend(_load_fla, _verify_fla), meta=opaque.like_first)


ssd = public_function(
    SSD,
    """The SSD scan over a packed stream; the state starts at zero for each document (arguments as :func:`ssd_ref`).

    Backends: "fla" (CUDA: FLA's simple-GLA kernels forward and backward with the batch's plan, no host sync; should
    their backward fail its first-use check, a backward from three more forward calls, :class:`_GatedLinearAttention`)
    or "reference"; None chooses (see :mod:`deltapack.ops.dispatch`).

    Returns:
        y: [1, T, H, P] in the dtype of x.
    """,
    check=_check,
)
