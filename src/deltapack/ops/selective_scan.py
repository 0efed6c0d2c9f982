"""Mamba1's selective scan over a packed stream, with the state reset at every document start.

Recurrence per channel d (state [N], zero at the first token of every document):
    delta_t = softplus(delta_t + delta_bias)                          (each step optional)
    h_t = exp(delta_t[d] * A[d]) * h_{t-1} + delta_t[d] * B_t[g(d)] * u_t[d]
    y_t[d] = <C_t[g(d)], h_t> + D[d] * u_t[d];   y_t = y_t * silu(z_t)  (when z is given)
B and C come in G groups of channels (channel d reads group d // (Dc / G): one group for Mamba, Jamba and
FalconMamba, one per mamba head for Zamba), as in mamba_ssm's ``selective_scan_fn`` (whose argument names and
order this op keeps, channels last, with ``segments=``).

Legend: T = tokens of the packed stream, Dc = channels, N = state size, G = groups, L = chunk length, c = chunk.

The reference is a two-level parallel scan of the pairs (a_t, b_t) = (exp(delta_t A), delta_t B_t u_t) under
(a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2): inside chunks of L tokens, then across chunks. A document start sets
its a_t to exactly 0, so the state restarts there with no loop over documents and no host sync. It materialises
[T, Dc, N] tensors (as transformers' own torch path does), a block of channels at a time when they are large.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deltapack.ops import opaque
from deltapack.ops.dispatch import Backend, public_function, register_op
from deltapack.ops.fallback import check_fast_backend
from deltapack.ops.parallel_scan import scan_channels
from deltapack.ops.segments import Segments
from deltapack.ops.varlen import acc_dtype, check_stream, starts

__all__ = ["SELECTIVE_SCAN", "selective_scan", "selective_scan_ref"]


def _check(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, segments: Segments
) -> None:
    check_stream("u", u, segments, 3)
    _, total, channels = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must be [Dc, N] with Dc = {channels}, got {tuple(A.shape)}")
    state = A.shape[1]
    if B.dim() != 4 or tuple(B.shape[:2]) != (1, total) or B.shape[3] != state or channels % B.shape[2]:
        raise ValueError(
            f"B must be [1, T, G, N] with T = {total}, N = {state} and G dividing Dc = {channels}, got {tuple(B.shape)}"
        )
    if C.shape != B.shape:
        raise ValueError(f"C must have the shape of B {tuple(B.shape)}, got {tuple(C.shape)}")


def _process_delta(
    delta: Tensor, delta_bias: Tensor | None = None, delta_softplus: bool = False, **_: object
) -> Tensor:
    """Bias and softplus, in fp32 (fp64 for fp64 input); the defaults are :func:`selective_scan_ref`'s, its other
    options are not read here."""
    delta = delta.to(acc_dtype(delta))
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)
    return F.softplus(delta) if delta_softplus else delta


def selective_scan_ref(
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
    chunk_size: int = 64,
    max_elements: int = 2**27,
) -> torch.Tensor:
    """Exact selective scan over a packed stream (pure PyTorch, autograd, any device), in fp32 (fp64 input: fp64).

    Args:
        u: [1, T, Dc] the scan input (the conv output). delta: [1, T, Dc] the raw time step.
        A: [Dc, N] the (negative) decay rates, fp32. B, C: [1, T, G, N], G divides Dc.
        segments: the batch's segments (``seq_idx`` [1, T], the document of each token, is what is read).
        D: [Dc] skip weight or None. z: [1, T, Dc] gate (y * silu(z)) or None.
        delta_bias: [Dc] or None. delta_softplus: apply softplus to delta + delta_bias.
        chunk_size: L, tokens per chunk of the inner scan (the result does not depend on it, up to rounding).
        max_elements: the largest [T, channels, N] block computed at once; wider layers run in blocks of
            channels, each recomputed in the backward pass (activation checkpointing), so memory stays bounded.

    Returns:
        y: [1, T, Dc] in the dtype of u.
    """
    _check(u, delta, A, B, C, segments)
    _, total, channels = u.shape
    delta_TD = _process_delta(delta[0], delta_bias, delta_softplus)
    u_TD = u[0].to(delta_TD.dtype)
    y_TD = scan_channels(
        u_TD, delta_TD, A, B[0], C[0], starts(segments), chunk_size, max_elements, checkpoint=torch.is_grad_enabled()
    )
    if D is not None:
        y_TD = y_TD + D.to(u_TD.dtype) * u_TD
    if z is not None:
        y_TD = y_TD * F.silu(z[0].to(u_TD.dtype))
    return y_TD.unsqueeze(0).to(u.dtype)


def selective_scan_triton(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *, segments: Segments, **options: Any
) -> Tensor:
    """:func:`selective_scan_ref`'s arguments on the Triton kernel (:mod:`deltapack.ops.selective_scan_triton`):
    the scan in fp32 token by token per block of channels, the D skip and the gate in PyTorch."""
    from deltapack.ops.selective_scan_triton import SelectiveScanTriton

    D, z = options.get("D"), options.get("z")
    delta_TD = _process_delta(delta[0], **options).float().contiguous()
    u_TD = u[0].float().contiguous()
    y_TD = SelectiveScanTriton.apply(
        u_TD,
        delta_TD,
        A.float().contiguous(),
        B[0].float().contiguous(),
        C[0].float().contiguous(),
        starts(segments).to(torch.int32),
    )
    if D is not None:
        y_TD = y_TD + D.float() * u_TD
    if z is not None:
        y_TD = y_TD * F.silu(z[0].float())
    return y_TD.unsqueeze(0).to(u.dtype)


def _load_triton() -> Callable[..., torch.Tensor]:
    from deltapack.ops import selective_scan_triton as kernels  # fails here when Triton is missing

    if torch.cuda.is_available():
        _check_on_this_gpu(kernels)
    return selective_scan_triton


def _check_on_this_gpu(kernels: Any) -> None:
    """Once per process: the Triton scan vs the reference (outputs and input gradients, relative L2, fp32) on a
    small packed stream; raises (so the reference runs) when it is off or its kernels failed."""
    gen = torch.Generator().manual_seed(0)
    segments = Segments.from_cu_seqlens([0, 1, 65, 200], device="cuda")
    total, channels, state = 200, 32, 16
    inputs = [torch.randn(1, total, channels, generator=gen), torch.randn(1, total, channels, generator=gen),
              -torch.rand(channels, state, generator=gen) * 0.1, torch.randn(1, total, 1, state, generator=gen),
              torch.randn(1, total, 1, state, generator=gen)]  # fmt: skip
    kw = dict(segments=segments, D=torch.ones(channels, device="cuda"), delta_softplus=True)
    check_fast_backend(
        "the Triton selective scan",
        lambda *xs: selective_scan_triton(*xs, **kw),
        lambda *xs: selective_scan_ref(*xs, **kw),
        [t.cuda() for t in inputs],
        tol=1e-4,
        failure=kernels.FAILURE,
    )


def _verify_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, **_: object) -> tuple[bool, str]:
    if not u.is_cuda:
        return False, f"u is on {u.device.type}; the Triton scan runs on CUDA"
    state = A.shape[1]
    if state & (state - 1) or state > 64:
        return False, f"state size {state} is not a power of two up to 64"
    return True, ""


SELECTIVE_SCAN = register_op(
    "selective_scan",
    selective_scan_ref,
    Backend("triton", load=_load_triton, verify=_verify_triton, package="triton", hint="install triton (CUDA)"),
    meta=opaque.like_first,  # y has the shape and dtype of u
)


selective_scan = public_function(
    SELECTIVE_SCAN,
    """Mamba1's selective scan over a packed stream; the state starts at zero for each document.

    Arguments as in :func:`selective_scan_ref`. Backends: "triton" (CUDA: :mod:`deltapack.ops.selective_scan_triton`,
    a kernel that fails to build is logged once and the reference runs) or "reference" (exact, any device); None
    chooses (see :mod:`deltapack.ops.dispatch`).

    Returns:
        y: [1, T, Dc] in the dtype of u.
    """,
    check=_check,
)
