"""A Triton selective scan with document resets (the CUDA backend of :mod:`deltapack.ops.selective_scan`).

Each program owns a block of BD channels with all N states in registers and walks the stream token by token:
    h = a_t * h + delta_t * u_t * B_t,   a_t = exp(delta_t * A) (0 at a document start),   y_t = <C_t, h>
(the D skip and the z gate are applied by the caller in PyTorch). The forward stores the state at the start of every
K-token chunk; the backward walks the chunks in reverse, recomputes a chunk's states into a small scratch buffer
and runs the reverse recurrence dh_{t-1} = a_t dh_t + C_{t-1} dy_{t-1}. dB and dC are reduced per program (a block
never spans two groups of B / C) and summed in PyTorch. Everything in fp32; no host sync (T and the sizes are host
ints, the document starts a device tensor).

Legend: T = tokens, Dc = channels, N = state size, G = groups, BD = channels per program, K = checkpoint interval.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltapack.ops.fallback import KernelFailure
from deltapack.ops.parallel_scan import scan_channels

K_CHUNK = 64
FAILURE = KernelFailure("the Triton selective scan", "selective_scan")
_REF_BLOCK = 2**27  # the fallback's [T, channels, N] block


def _reference_core(u, delta, A, B, C, starts) -> torch.Tensor:  # noqa: ANN001
    """The same y = <C, h> by the PyTorch reference, a block of channels at a time."""
    return scan_channels(u, delta, A, B, C, starts.bool(), K_CHUNK, _REF_BLOCK)


def _reference_grads(u, delta, A, B, C, starts, dy) -> tuple:  # noqa: ANN001
    """Input gradients of :func:`_reference_core` for ``dy`` (the backward when the kernel cannot run)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (u, delta, A, B, C)]
        y = _reference_core(*leaves, starts)
        grads = torch.autograd.grad(y, leaves, dy)
    return (*grads, None)


@triton.jit
def _scan_fwd(u, delta, A, B, C, starts, y, ckpt, T, Dc: tl.constexpr, G: tl.constexpr, N: tl.constexpr,
              BD: tl.constexpr, K: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    d = pid * BD + tl.arange(0, BD)  # [BD]
    n = tl.arange(0, N)  # [N]
    g = d // (Dc // G)
    a_log = tl.load(A + d[:, None] * N + n[None, :])  # [BD, N]
    h = tl.zeros((BD, N), dtype=tl.float32)
    for t in range(0, T):
        first = (t % K) == 0  # the state entering each K-token chunk, for the backward
        tl.store(ckpt + ((t // K) * Dc + d[:, None]) * N + n[None, :], h, mask=first & (d[:, None] >= 0))
        keep = 1.0 - tl.load(starts + t).to(tl.float32)
        dl = tl.load(delta + t * Dc + d)
        uu = tl.load(u + t * Dc + d)
        bt = tl.load(B + (t * G + g[:, None]) * N + n[None, :])
        ct = tl.load(C + (t * G + g[:, None]) * N + n[None, :])
        a = tl.exp(dl[:, None] * a_log) * keep
        h = a * h + (dl * uu)[:, None] * bt
        tl.store(y + t * Dc + d, tl.sum(h * ct, axis=1))


@triton.jit
def _scan_bwd(u, delta, A, B, C, starts, ckpt, dy, du, ddelta, dA, dB_part, dC_part, scratch, T,
              Dc: tl.constexpr, G: tl.constexpr, N: tl.constexpr, BD: tl.constexpr, K: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    d = pid * BD + tl.arange(0, BD)
    n = tl.arange(0, N)
    g = d // (Dc // G)
    a_log = tl.load(A + d[:, None] * N + n[None, :])
    cell = d[:, None] * N + n[None, :]  # [BD, N] offsets of this block inside one [Dc, N] state
    mine = scratch + pid * (K + 1) * BD * N + (tl.arange(0, BD)[:, None] * N + n[None, :])
    dh = tl.zeros((BD, N), dtype=tl.float32)
    da_acc = tl.zeros((BD, N), dtype=tl.float32)
    num_chunks = (T + K - 1) // K
    for ci in range(0, num_chunks):
        c = num_chunks - 1 - ci
        t0 = c * K
        t1 = tl.minimum(t0 + K, T)
        h = tl.load(ckpt + c * Dc * N + cell)
        tl.store(mine, h)  # slot 0: the state before t0
        for t in range(t0, t1):  # recompute the chunk's states into slots 1..
            keep = 1.0 - tl.load(starts + t).to(tl.float32)
            dl = tl.load(delta + t * Dc + d)
            uu = tl.load(u + t * Dc + d)
            bt = tl.load(B + (t * G + g[:, None]) * N + n[None, :])
            h = tl.exp(dl[:, None] * a_log) * keep * h + (dl * uu)[:, None] * bt
            tl.store(mine + (t - t0 + 1) * BD * N, h)
        for tt in range(t0, t1):
            t = t1 - 1 - (tt - t0)
            keep = 1.0 - tl.load(starts + t).to(tl.float32)
            dl = tl.load(delta + t * Dc + d)
            uu = tl.load(u + t * Dc + d)
            bt = tl.load(B + (t * G + g[:, None]) * N + n[None, :])
            ct = tl.load(C + (t * G + g[:, None]) * N + n[None, :])
            dyt = tl.load(dy + t * Dc + d)
            h_t = tl.load(mine + (t - t0 + 1) * BD * N)
            h_prev = tl.load(mine + (t - t0) * BD * N)
            a = tl.exp(dl[:, None] * a_log) * keep
            dh = dh + ct * dyt[:, None]
            tl.store(dC_part + (pid * T + t) * N + n, tl.sum(h_t * dyt[:, None], axis=0))
            tl.store(dB_part + (pid * T + t) * N + n, tl.sum(dh * (dl * uu)[:, None], axis=0))
            tl.store(du + t * Dc + d, tl.sum(dh * bt, axis=1) * dl)
            da = dh * h_prev * a
            tl.store(ddelta + t * Dc + d, tl.sum(dh * bt, axis=1) * uu + tl.sum(da * a_log, axis=1))
            da_acc += da * dl[:, None]
            dh = dh * a
    tl.store(dA + cell, da_acc)


def _block(channels: int, groups: int) -> int:
    """Channels per program: a power of two that divides the group width (a block never spans two groups)."""
    width = channels // groups
    block = 1
    while block < 16 and width % (block * 2) == 0:
        block *= 2
    return block


class SelectiveScanTriton(torch.autograd.Function):
    """y [T, Dc] = <C_t, h_t> of the selective scan with resets; inputs fp32, contiguous.

    u, delta: [T, Dc]; A: [Dc, N]; B, C: [T, G, N]; starts: [T] int32 (1 at a document start).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, starts):  # noqa: ANN001, ANN205 - autograd signature
        total, channels = u.shape
        groups, state = B.shape[1], B.shape[2]
        block = _block(channels, groups)
        y = torch.empty_like(u)
        ckpt = u.new_empty(triton.cdiv(total, K_CHUNK), channels, state)
        if FAILURE:
            y = _reference_core(u, delta, A, B, C, starts)
        else:
            try:
                _scan_fwd[(channels // block,)](u, delta, A, B, C, starts, y, ckpt, total, channels, groups, state,
                                                block, K_CHUNK, num_warps=1)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a kernel that does not build here: the reference is exact
                FAILURE.record(exc)
                y = _reference_core(u, delta, A, B, C, starts)
        ctx.save_for_backward(u, delta, A, B, C, starts, ckpt)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        u, delta, A, B, C, starts, ckpt = ctx.saved_tensors
        total, channels = u.shape
        groups, state = B.shape[1], B.shape[2]
        block = _block(channels, groups)
        programs = channels // block
        du, ddelta, dA = torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A)
        dB_part = u.new_empty(programs, total, state)
        dC_part = u.new_empty(programs, total, state)
        scratch = u.new_empty(programs, K_CHUNK + 1, block, state)
        if FAILURE:
            return _reference_grads(u, delta, A, B, C, starts, dy)
        try:
            _scan_bwd[(programs,)](u, delta, A, B, C, starts, ckpt, dy.float().contiguous(), du, ddelta, dA, dB_part,
                               dC_part, scratch, total, channels, groups, state, block, K_CHUNK,
                               num_warps=1)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a kernel that does not build here: the reference is exact
            FAILURE.record(exc)
            return _reference_grads(u, delta, A, B, C, starts, dy)
        # programs in channel order: the first programs / G belong to group 0, and so on
        dB = dB_part.reshape(groups, programs // groups, total, state).sum(1).transpose(0, 1)
        dC = dC_part.reshape(groups, programs // groups, total, state).sum(1).transpose(0, 1)
        return du, ddelta, dA, dB.contiguous(), dC.contiguous(), None
