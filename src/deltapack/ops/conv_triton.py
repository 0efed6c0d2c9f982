"""deltapack's own varlen depthwise causal conv1d in Triton (the "triton" backend of :mod:`deltapack.ops.conv`).

    y[t, c] = act(bias[c] + sum_{s < W} weight[c, W-1-s] * x[t-s, c]),   a tap taken only if seq_idx[t-s] == seq_idx[t]

Every program owns a tile of BT tokens x BD channels of the stream x [T, D] (channels last) and reads the W - 1
halo rows above it again (they come from L2). The document cut needs no host data: a tap is masked where the
document index of the token it reads differs from the output token's (``Segments.seq_idx``).

Forward: one pass, x read and y written, fp32 accumulation, y in x's dtype; nothing is saved but the inputs.

Backward: one pass over dy and x. With dz = dy * act'(pre) (the pre-activation recomputed from x):
    dx[t, c] = sum_s weight[c, W-1-s] * dz[t+s, c]          (t+s in t's document)
    dweight[c, W-1-j] = sum_t dz[t, c] * x[t-j, c]            (t-j in t's document),   dbias[c] = sum_t dz[t, c]
A tile loads each of the 2W - 1 rows of x it needs (offsets -(W-1)..W-1) once, masked to its document, and
recomputes the dz of the W - 1 rows below it (Triton cannot shift a tile in registers; the SiLU is recomputed W
times per element instead of exchanged). A program walks TILES consecutive token tiles of one channel block, sums
dweight and dbias per tile row in fp32 and writes one partial per program ([programs along T, D, W] and
[programs along T, D]); one ``.sum(0)`` adds them up in a fixed order (deterministic, no atomics).

Block sizes (no autotuning) keep the registers below spilling on sm_90, checked with ptxas.

Legend: T = tokens, D = channels, W = conv width (taps), BT x BD = a program's tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltapack.ops.fallback import KernelFailure
from deltapack.ops.reference import causal_conv1d_ref
from deltapack.ops.segments import Segments

__all__ = ["FAILURE", "MAX_WIDTH", "CausalConv1dTriton", "causal_conv1d_triton"]

MAX_WIDTH = 4  # the dweight accumulators are spelled out for up to 4 taps
FWD_BT, FWD_BD, FWD_WARPS = 32, 128, 8  # one 8-channel vector per thread per row: ~70 registers on sm_90
BWD_BT, BWD_BD, BWD_WARPS = 16, 64, 4  # one row of 8 channels per thread: ~170 registers on sm_90, no spills
# A backward program walks TILES token tiles (a power of two up to MAX_TILES, so at most 6 compiled variants):
# about BWD_TOKEN_PROGRAMS programs along T, which bounds the fp32 partials to about 64 x D x (W + 1)
BWD_TOKEN_PROGRAMS, MAX_TILES = 64, 32
FAILURE = KernelFailure("the Triton causal conv1d", "causal_conv1d")


@triton.jit
def _pre(x, w, b, seq, u, doc, ok, c, cmask, D, W: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr,
         BD: tl.constexpr):  # fmt: skip
    """The fp32 pre-activation at rows u [BT] (tokens of document ``doc`` where ``ok``): [BT, BD]."""
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for s in tl.static_range(W):
        us = u - s
        take = ok & (us >= 0)
        take = take & (tl.load(seq + us, mask=take, other=-1) == doc)
        xs = tl.load(x + us.to(tl.int64)[:, None] * D + c[None, :], mask=take[:, None] & cmask[None, :], other=0.0)
        ws = tl.load(w + c * W + (W - 1 - s), mask=cmask, other=0.0).to(tl.float32)
        acc += xs.to(tl.float32) * ws[None, :]
    return acc


@triton.jit
def _conv_fwd(x, w, b, seq, y, T, D, W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr,
              BD: tl.constexpr):  # fmt: skip
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BD + tl.arange(0, BD)
    tmask, cmask = t < T, c < D
    doc = tl.load(seq + t, mask=tmask, other=-2)
    acc = _pre(x, w, b, seq, t, doc, tmask, c, cmask, D, W, HAS_BIAS, BT, BD)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    out = y + t.to(tl.int64)[:, None] * D + c[None, :]
    tl.store(out, acc.to(y.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _rows(x, seq, t, o: tl.constexpr, doc, T, c, cmask, D, LOAD: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """x at rows t + o [BT] where that row is in document ``doc`` (else 0), [BT, BD] in x's dtype (half the
    registers of fp32 for bf16; converted where used); zeros unless LOAD."""
    if LOAD:
        v = t + o
        ok = (v >= 0) & (v < T)
        ok = ok & (tl.load(seq + v, mask=ok, other=-1) == doc)
        xo = tl.load(x + v.to(tl.int64)[:, None] * D + c[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
    else:
        xo = tl.zeros((BT, BD), dtype=x.dtype.element_ty)
    return xo


@triton.jit
def _pick(o: tl.constexpr, xm3, xm2, xm1, x0, xp1, xp2, xp3):
    """The tile of offset o in -3..3, in fp32."""
    if o == -3:
        r = xm3
    elif o == -2:
        r = xm2
    elif o == -1:
        r = xm1
    elif o == 0:
        r = x0
    elif o == 1:
        r = xp1
    elif o == 2:
        r = xp2
    else:
        r = xp3
    return r.to(tl.float32)


@triton.jit
def _conv_bwd(x, w, b, seq, dy, dx, dw_part, db_part, T, D, TILES: tl.constexpr, W: tl.constexpr,
              HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    pid_t = tl.program_id(0)
    c = tl.program_id(1) * BD + tl.arange(0, BD)
    cmask = c < D
    # dweight[:, W-1-j] partials for j = 0..3 (those with j >= W stay unused) and dbias, kept per row of the tile
    # and summed over the rows once at the end (a cross-warp reduction per tile would cost more)
    dw0 = tl.zeros((BT, BD), dtype=tl.float32)
    dw1 = tl.zeros((BT, BD), dtype=tl.float32)
    dw2 = tl.zeros((BT, BD), dtype=tl.float32)
    dw3 = tl.zeros((BT, BD), dtype=tl.float32)
    db = tl.zeros((BT, BD), dtype=tl.float32)
    for i in range(0, TILES):
        t = (pid_t * TILES + i) * BT + tl.arange(0, BT)
        tmask = t < T
        doc = tl.load(seq + t, mask=tmask, other=-2)
        # each row of x this tile reads, once: offsets -(W-1)..W-1 (the positive ones only to recompute the
        # pre-activation under SiLU), zero outside t's document
        xm3 = _rows(x, seq, t, -3, doc, T, c, cmask, D, W > 3, BT, BD)
        xm2 = _rows(x, seq, t, -2, doc, T, c, cmask, D, W > 2, BT, BD)
        xm1 = _rows(x, seq, t, -1, doc, T, c, cmask, D, W > 1, BT, BD)
        x0 = _rows(x, seq, t, 0, doc, T, c, cmask, D, True, BT, BD)
        xp1 = _rows(x, seq, t, 1, doc, T, c, cmask, D, SILU and W > 1, BT, BD)
        xp2 = _rows(x, seq, t, 2, doc, T, c, cmask, D, SILU and W > 2, BT, BD)
        xp3 = _rows(x, seq, t, 3, doc, T, c, cmask, D, SILU and W > 3, BT, BD)
        dx_acc = tl.zeros((BT, BD), dtype=tl.float32)
        dz0 = tl.zeros((BT, BD), dtype=tl.float32)
        for s in tl.static_range(W):
            u = t + s  # the output row whose tap s reads row t
            keep = tmask & (u < T)
            keep = keep & (tl.load(seq + u, mask=keep, other=-1) == doc)
            g = tl.load(dy + u.to(tl.int64)[:, None] * D + c[None, :], mask=keep[:, None] & cmask[None, :], other=0.0)
            g = g.to(tl.float32)
            if SILU:  # the pre-activation of row u (in t's document where keep; g is 0 elsewhere)
                pre = tl.zeros((BT, BD), dtype=tl.float32)
                if HAS_BIAS:
                    pre += tl.load(b + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
                for j in tl.static_range(W):
                    wj = tl.load(w + c * W + (W - 1 - j), mask=cmask, other=0.0).to(tl.float32)
                    pre += _pick(s - j, xm3, xm2, xm1, x0, xp1, xp2, xp3) * wj[None, :]
                sig = tl.sigmoid(pre)
                g = g * sig * (1.0 + pre * (1.0 - sig))
            ws = tl.load(w + c * W + (W - 1 - s), mask=cmask, other=0.0).to(tl.float32)
            dx_acc += g * ws[None, :]
            if s == 0:
                dz0 = g
        tl.store(dx + t.to(tl.int64)[:, None] * D + c[None, :], dx_acc.to(dx.dtype.element_ty),
                 mask=tmask[:, None] & cmask[None, :])  # fmt: skip
        if HAS_BIAS:
            db += dz0
        dw0 += dz0 * x0.to(tl.float32)
        if W > 1:
            dw1 += dz0 * xm1.to(tl.float32)
        if W > 2:
            dw2 += dz0 * xm2.to(tl.float32)
        if W > 3:
            dw3 += dz0 * xm3.to(tl.float32)
    row = dw_part + (pid_t * D + c) * W
    tl.store(row + (W - 1), tl.sum(dw0, axis=0), mask=cmask)
    if W > 1:
        tl.store(row + (W - 2), tl.sum(dw1, axis=0), mask=cmask)
    if W > 2:
        tl.store(row + (W - 3), tl.sum(dw2, axis=0), mask=cmask)
    if W > 3:
        tl.store(row + (W - 4), tl.sum(dw3, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.store(db_part + pid_t * D + c, tl.sum(db, axis=0), mask=cmask)


def _reference_grads(ctx, x_TD, weight, bias, dy_TD):  # noqa: ANN001, ANN202
    """(dx, dweight, dbias) of the exact reference: the backward when the kernel cannot run."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (x_TD, weight, bias)]
        y = causal_conv1d_ref(leaves[0][None], leaves[1], leaves[2], ctx.activation, segments=ctx.segments)
        wanted = [t for t in leaves if t is not None]
        grads = list(torch.autograd.grad(y, wanted, dy_TD[None]))
    return grads[0], grads[1], grads[2] if bias is not None else None


class CausalConv1dTriton(torch.autograd.Function):
    """y [T, D] of the document-cut conv (x [T, D] contiguous; weight [D, W] contiguous; bias [D] or None;
    seq_idx [T] int32; activation None / "silu" / "swish"); gradients for x, weight and bias."""

    @staticmethod
    def forward(ctx, x_TD, weight, bias, seq_idx, activation, segments):  # noqa: ANN001, ANN205 - autograd
        ctx.activation, ctx.segments = activation, segments
        ctx.save_for_backward(x_TD, weight, bias, seq_idx)
        total, channels = x_TD.shape
        if FAILURE or total * channels == 0:  # (an empty launch grid would raise and count as a failure)
            return causal_conv1d_ref(x_TD[None], weight, bias, activation, segments=segments)[0]
        y = torch.empty_like(x_TD)
        grid = (triton.cdiv(total, FWD_BT), triton.cdiv(channels, FWD_BD))
        try:
            _conv_fwd[grid](x_TD, weight, bias if bias is not None else weight, seq_idx, y, total, channels,
                            weight.shape[1], bias is not None, activation is not None, FWD_BT, FWD_BD,
                            num_warps=FWD_WARPS)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a kernel that does not build here: the reference is exact
            FAILURE.record(exc, "forward")
            return causal_conv1d_ref(x_TD[None], weight, bias, activation, segments=segments)[0]
        return y

    @staticmethod
    def backward(ctx, dy_TD):  # noqa: ANN001, ANN205
        x_TD, weight, bias, seq_idx = ctx.saved_tensors
        dy_TD = dy_TD.contiguous()
        if FAILURE or dy_TD.numel() == 0:
            return (*_reference_grads(ctx, x_TD, weight, bias, dy_TD), None, None, None)
        total, channels = x_TD.shape
        width = weight.shape[1]
        tiles = min(MAX_TILES, triton.next_power_of_2(triton.cdiv(triton.cdiv(total, BWD_BT), BWD_TOKEN_PROGRAMS)))
        programs = triton.cdiv(total, BWD_BT * tiles)
        dx = torch.empty_like(x_TD)
        dw_part = x_TD.new_empty(programs, channels, width, dtype=torch.float32)
        db_part = x_TD.new_empty(programs, channels, dtype=torch.float32) if bias is not None else dw_part
        try:
            _conv_bwd[(programs, triton.cdiv(channels, BWD_BD))](
                x_TD, weight, bias if bias is not None else weight, seq_idx, dy_TD, dx, dw_part, db_part, total,
                channels, tiles, width, bias is not None, ctx.activation is not None, BWD_BT, BWD_BD,
                num_warps=BWD_WARPS)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a kernel that does not build here: the reference is exact
            FAILURE.record(exc, "backward")
            return (*_reference_grads(ctx, x_TD, weight, bias, dy_TD), None, None, None)
        dweight = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = db_part.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    segments: Segments,
) -> torch.Tensor:
    """:func:`~deltapack.ops.reference.causal_conv1d_ref`'s arguments and result on the Triton kernels.

    x: [1, T, D] (copied when not contiguous); weight: [D, W], W <= :data:`MAX_WIDTH`, x's dtype or fp32; bias: [D]
    or None; activation: None, "silu" or "swish". Returns [1, T, D] in x's dtype (fp32 accumulation).
    """
    seq_idx = segments.seq_idx.reshape(-1)
    if seq_idx.dtype != torch.int32:
        seq_idx = seq_idx.to(torch.int32)
    y_TD = CausalConv1dTriton.apply(
        x[0].contiguous(),
        weight.contiguous(),
        bias.contiguous() if bias is not None else None,
        seq_idx.contiguous(),
        activation,
        segments,
    )
    return y_TD.unsqueeze(0)
