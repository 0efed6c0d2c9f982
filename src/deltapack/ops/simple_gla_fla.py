"""FLA's simple-GLA kernels (``fla.ops.common``), launched with a per-batch plan of the segments: no host sync.

Simple GLA with scale 1, per document (state reset at every document start):
    S_t = exp(g_t) S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t
with q, k: [1, T, G, K] shared by the H / G value heads of a group (head h reads group h // (H / G)), v: [1, T, H, V],
g: [1, T, H] log decays. This is the SSD scan's core (q = C, k = B, v = dt x, g = dt A).

Why not ``chunk_simple_gla`` itself: its wrapper rebuilds the chunk indices from the host offsets and copies them to
the GPU, and its state kernels read the number of chunks back from the GPU (``.item()``): host syncs in every layer.
Here the same kernels run with the indices of :class:`SimpleGLAPlan`, built once per batch on the device from the
host offsets (``Segments.plan``), and the state kernels (``chunk_fwd_kernel_h``, ``chunk_bwd_kernel_dh``) are
launched with the plan's chunk offsets and host chunk count. The grouped q / k stay at G heads wherever FLA's
kernels take grouped value heads (the output, dq / dk / dg, dv); only the two state kernels read them per head.

Everything runs in fp32 (TF32 dots): FLA 0.6 refuses the gated backward with bf16 inputs on Hopper with Triton
3.4 - 3.7.0, and takes it in fp32 through its TileLang kernel (``chunk_bwd_dqkwg``'s dispatch).

Legend: T = tokens, G = q / k heads (groups), H = value heads, K = q / k head dim, V = value head dim, N = documents,
NT = chunks of :data:`CHUNK` tokens (every document starts a new chunk).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from deltapack.ops.fallback import Fallback
from deltapack.ops.segments import Segments

__all__ = ["CHUNK", "SimpleGLAPlan", "plan_of", "simple_gla", "simple_gla_forward"]

CHUNK = 64  # FLA's chunk length


@dataclass(frozen=True)
class SimpleGLAPlan:
    """FLA's index tensors for one batch (device tensors built without a host sync; host ints).

    cu_seqlens: [N + 1] int32 offsets. chunk_indices: [NT, 2] int32 (document, chunk within it).
    chunk_offsets: [N + 1] int32, the first chunk of each document (FLA's ``split_offsets`` for chunks of 64).
    num_docs: N. num_chunks: NT.
    """

    cu_seqlens: Tensor
    chunk_indices: Tensor
    chunk_offsets: Tensor
    num_docs: int
    num_chunks: int


def build_plan(segments: Segments) -> SimpleGLAPlan:
    lens = (segments.cu_seqlens[1:] - segments.cu_seqlens[:-1]).long()
    counts = (lens + CHUNK - 1) // CHUNK
    offsets = F.pad(counts.cumsum(0), (1, 0)).to(segments.cu_seqlens.dtype)
    return SimpleGLAPlan(
        cu_seqlens=segments.cu_seqlens,
        chunk_indices=segments.chunk_indices(CHUNK),
        chunk_offsets=offsets,
        num_docs=segments.num_docs,
        num_chunks=sum(-(-n // CHUNK) for n in segments.doc_lengths),
    )


def plan_of(segments: Segments) -> SimpleGLAPlan:
    """The plan of these segments, built once per batch and kept on them."""
    return segments.plan(build_plan)


@functools.cache
def _fla() -> SimpleNamespace:
    from fla.ops.common.chunk_h import chunk_bwd_kernel_dh, chunk_fwd_kernel_h
    from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv, chunk_fwd_o
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2

    return SimpleNamespace(
        chunk_bwd_kernel_dh=chunk_bwd_kernel_dh,
        chunk_fwd_kernel_h=chunk_fwd_kernel_h,
        chunk_bwd_dqkwg=chunk_bwd_dqkwg,
        chunk_bwd_dv=chunk_bwd_dv,
        chunk_fwd_o=chunk_fwd_o,
        chunk_local_cumsum=chunk_local_cumsum,
        RCP_LN2=RCP_LN2,
    )


def _per_head(t_1TGK: Tensor, heads: int) -> Tensor:
    """[1, T, G, K] -> [1, T, H, K], each group repeated for its H / G heads (what the state kernels read)."""
    groups = t_1TGK.shape[2]
    if groups == heads:
        return t_1TGK
    return t_1TGK.repeat_interleave(heads // groups, dim=2, output_size=heads)


def _local_cumsum(g_1TH: Tensor, plan: SimpleGLAPlan, reverse: bool = False, scale: float | None = None) -> Tensor:
    return _fla().chunk_local_cumsum(
        g_1TH,
        chunk_size=CHUNK,
        reverse=reverse,
        scale=scale,
        cu_seqlens=plan.cu_seqlens,
        chunk_indices=plan.chunk_indices,
    )


# the state kernels' switches for simple GLA: one log-decay per head (g), none per key or value channel, no fixed
# per-head decay (gamma); the state laid out [K, V]
_SIMPLE_GLA_SWITCHES = dict(
    g_gamma=None, gk=None, gv=None, USE_G=True, USE_G_GAMMA=False, USE_GK=False, USE_GV=False, STATE_V_FIRST=False
)


def _state_kernel(kernel: str, out: str, x_1THK: Tensor, y_1THV: Tensor, plan: SimpleGLAPlan, **args: object) -> Tensor:
    """FLA's state kernel ``kernel`` launched with the plan's chunk offsets and host chunk count (no host sync): fills
    and returns its fp32 [1, NT, H, K, V] argument ``out``; x and y give the shapes, ``args`` the kernel's tensors."""
    _, total, heads, dk = x_1THK.shape
    dv = y_1THV.shape[-1]
    buffer = x_1THK.new_empty(1, plan.num_chunks, heads, dk, dv, dtype=torch.float32)

    def grid(meta: dict) -> tuple[int]:
        return (-(-dk // meta["BK"]) * -(-dv // meta["BV"]) * plan.num_docs * heads,)

    sizes = dict(T=total, H=heads, K=dk, V=dv, BT=CHUNK, BS=CHUNK)
    offsets = dict(cu_seqlens=plan.cu_seqlens, split_offsets=plan.chunk_offsets)
    getattr(_fla(), kernel)[grid](**{out: buffer}, **args, **sizes, **offsets, **_SIMPLE_GLA_SWITCHES)
    return buffer


def _states(k_1THK: Tensor, v_1THV: Tensor, gc_1TH: Tensor, plan: SimpleGLAPlan) -> Tensor:
    """FLA's ``chunk_fwd_h`` without its host sync: the state entering every chunk, [1, NT, H, K, V] fp32."""
    return _state_kernel(
        "chunk_fwd_kernel_h", "h", k_1THK, v_1THV, plan, k=k_1THK, v=v_1THV, g=gc_1TH, h0=None, ht=None
    )


def _state_grads(q_1THK: Tensor, do_1THV: Tensor, gc_1TH: Tensor, plan: SimpleGLAPlan) -> Tensor:
    """FLA's ``chunk_bwd_dh`` without its host sync: the gradient of the state leaving every chunk,
    [1, NT, H, K, V] fp32."""
    grads = dict(q=q_1THK, do=do_1THV, g=gc_1TH, dht=None, dh0=None, scale=1.0, HQ=q_1THK.shape[2], NG=1)
    return _state_kernel("chunk_bwd_kernel_dh", "dh", q_1THK, do_1THV, plan, **grads)


def _on_device_of(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' (as FLA's own wrappers do)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, plan: SimpleGLAPlan) -> tuple[Tensor, Tensor]:
    """(o [1, T, H, V], the gates' chunk-local cumsum in log2 [1, T, H]); fp32 contiguous inputs."""
    fla = _fla()
    with _on_device_of(v):
        gc = _local_cumsum(g, plan, scale=fla.RCP_LN2)  # FLA's kernels take exp2 of chunk-local cumsums
        h = _states(_per_head(k, v.shape[2]), v, gc, plan)
        index = dict(cu_seqlens=plan.cu_seqlens, chunk_size=CHUNK, chunk_indices=plan.chunk_indices)
        return fla.chunk_fwd_o(q=q, k=k, v=v, h=h, g=gc, scale=1.0, **index), gc


def _fp32(*tensors: Tensor) -> list[Tensor]:
    return [t.float().contiguous() for t in tensors]


def simple_gla_forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, segments: Segments) -> Tensor:
    """The simple-GLA forward alone (no autograd), fp32: o [1, T, H, V] in the dtype of v (shapes as the module
    legend; q and k may also have H heads)."""
    o, _ = _forward(*_fp32(q, k, v, g), plan_of(segments))
    return o.to(v.dtype)


class _SimpleGLA(torch.autograd.Function):
    """FLA's forward and its own backward (recomputed states, ``chunk_bwd_dh``, ``chunk_bwd_dqkwg`` - TileLang on
    Hopper - and ``chunk_bwd_dv``), every kernel with the batch's plan.

    With a ``fallback`` given, a backward kernel that raises is recorded in its ``failure`` (logged once) and this
    backward is computed by autograd through its ``reference``; without one, the exception propagates (first-use
    checks)."""

    @staticmethod
    def forward(ctx, q, k, v, g, segments, fallback):  # noqa: ANN001, ANN205 - autograd signature
        o, gc = _forward(q, k, v, g, plan_of(segments))
        ctx.save_for_backward(q, k, v, g, gc)
        ctx.segments, ctx.fallback = segments, fallback
        return o

    @staticmethod
    def backward(ctx, do):  # noqa: ANN001, ANN205
        q, k, v, g, gc = ctx.saved_tensors
        do = do.float().contiguous()
        fallback = ctx.fallback
        if fallback is None:
            return (*_backward(q, k, v, gc, do, plan_of(ctx.segments)), None, None)
        if not fallback.failure:
            try:
                return (*_backward(q, k, v, gc, do, plan_of(ctx.segments)), None, None)
            except Exception as exc:  # noqa: BLE001 - any kernel failure: the reference is exact
                fallback.failure.record(exc, "backward")
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v, g)]
            o = fallback.reference(*leaves, ctx.segments)
            grads = torch.autograd.grad(o, leaves, do)
        return (*grads, None, None)


def _backward(q: Tensor, k: Tensor, v: Tensor, gc: Tensor, do: Tensor, plan: SimpleGLAPlan) -> tuple[Tensor, ...]:
    fla = _fla()
    heads = v.shape[2]
    with _on_device_of(v):
        h = _states(_per_head(k, heads), v, gc, plan)
        dh = _state_grads(_per_head(q, heads), do, gc, plan)
        index = dict(cu_seqlens=plan.cu_seqlens, chunk_size=CHUNK, chunk_indices=plan.chunk_indices)
        dq, dk, _, dg = fla.chunk_bwd_dqkwg(q=q, k=k, v=v, do=do, h=h, dh=dh, g=gc, scale=1.0, **index)
        del h
        dv = fla.chunk_bwd_dv(q=q, k=k, g=gc, do=do, dh=dh, scale=1.0, **index)
        dg = _local_cumsum(dg, plan, reverse=True)
    return dq, dk, dv, dg


def simple_gla(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, segments: Segments, fallback: Fallback | None = None
) -> Tensor:
    """Simple GLA (scale 1) per document with FLA's kernels, forward and backward, no host sync; computed in fp32.

    Args:
        q, k: [1, T, G, K] (G divides H). v: [1, T, H, V]. g: [1, T, H] log decays. segments: the batch's segments.
        fallback: where a backward kernel failure is recorded, and the exact function (the same arguments) whose
            autograd then computes the gradients; None: a failure raises.

    Returns:
        o: [1, T, H, V] fp32.
    """
    return _SimpleGLA.apply(*_fp32(q, k, v, g), segments, fallback)
