"""The varlen depthwise causal conv1d: the short conv in front of GDN, KDA, Mamba and the gated short convs.

Backends, in the automatic order: ``fla`` (FLA's varlen Triton conv, CUDA, :mod:`deltapack.ops.fla`), ``triton``
(deltapack's own Triton conv, CUDA, :mod:`deltapack.ops.conv_triton`: forward and backward in one pass each, the
document cut read from ``segments.seq_idx``) and ``reference`` (:func:`deltapack.ops.reference.causal_conv1d_ref`,
exact, any device); chosen by :mod:`deltapack.ops.dispatch`. The op reads the shared ``DELTAPACK_BACKEND``
(``DELTAPACK_BACKEND=triton`` also picks the Triton selective scan; ops without a "triton" backend then choose
automatically); ``backend="triton"`` picks it for one call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from deltapack.ops import fla, opaque
from deltapack.ops.dispatch import Backend, public_function, register_op
from deltapack.ops.fallback import check_fast_backend
from deltapack.ops.reference import causal_conv1d_ref
from deltapack.ops.segments import Segments

__all__ = ["CAUSAL_CONV1D", "causal_conv1d", "causal_conv1d_ref", "verify_causal_conv1d_triton"]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_WIDTH = 4  # conv_triton.MAX_WIDTH, without importing Triton to read it


def verify_causal_conv1d_triton(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None, *, segments: Segments
) -> tuple[bool, str]:
    """Whether deltapack's Triton conv keeps these inputs exact (arguments of :func:`causal_conv1d`); reads shapes,
    dtypes and devices only."""
    if not x.is_cuda:
        return False, f"x is on {x.device.type}; the Triton conv runs on CUDA"
    if x.dtype not in TRITON_DTYPES:
        return False, f"x is {x.dtype}; the Triton conv takes fp16, bf16 or fp32"
    if x.dim() != 3 or x.shape[0] != 1 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        return False, f"x {tuple(x.shape)}, weight {tuple(weight.shape)}; the Triton conv takes [1, T, D] and [D, W]"
    if not 1 <= weight.shape[1] <= TRITON_MAX_WIDTH:
        return False, f"width {weight.shape[1]}; the Triton conv takes 1 to {TRITON_MAX_WIDTH} taps"
    if weight.dtype not in (x.dtype, torch.float32):
        # the reference rounds x to the weight's dtype first; the kernel reads x as it is
        return False, f"weight is {weight.dtype}, x {x.dtype}; the Triton conv takes a weight in x's dtype or fp32"
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != x.shape[-1]):
        return False, f"bias {tuple(bias.shape)}; the Triton conv takes [D]"
    if activation not in fla.ACTIVATIONS:
        return False, f"activation {activation!r}; the Triton conv fuses silu or none"
    return True, ""


def _load_triton() -> Callable[..., Any]:
    from deltapack.ops import conv_triton  # fails here when Triton is missing

    if torch.cuda.is_available():
        _check_on_this_gpu(conv_triton)
    return conv_triton.causal_conv1d_triton


def _check_on_this_gpu(kernels: Any) -> None:
    """Once per process: the Triton conv vs the reference (output and every gradient, relative L2, fp32) on a small
    packed stream with 1- and 2-token documents; raises (so the next backend runs) when it is off or failed."""
    gen = torch.Generator().manual_seed(0)
    segments = Segments.from_cu_seqlens([0, 1, 3, 70, 71, 200], device="cuda")
    total, channels, width = 200, 160, 4
    inputs = [torch.randn(1, total, channels, generator=gen), torch.randn(channels, width, generator=gen),
              torch.randn(channels, generator=gen)]  # fmt: skip
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the reference's fp32 conv in fp32, not TF32 (cuDNN's default)
    try:
        check_fast_backend(
            "the Triton causal conv1d",
            lambda x, w, b: kernels.causal_conv1d_triton(x, w, b, "silu", segments=segments),
            lambda x, w, b: causal_conv1d_ref(x, w, b, "silu", segments=segments),
            [t.cuda() for t in inputs],
            tol=1e-4,
            failure=kernels.FAILURE,
        )
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


TRITON_BACKEND = Backend(
    "triton", load=_load_triton, verify=verify_causal_conv1d_triton, package="triton", hint="install triton (CUDA)"
)

# y has the shape and dtype of x
CAUSAL_CONV1D = register_op(
    "causal_conv1d", causal_conv1d_ref, fla.CONV_BACKEND, TRITON_BACKEND, meta=opaque.like_first
)

causal_conv1d = public_function(
    CAUSAL_CONV1D,
    """Depthwise causal conv1d over a packed stream, cut at every document boundary (arguments and result as
    :func:`~deltapack.ops.reference.causal_conv1d_ref`; channels last, weight [D, W]).

    Under context parallelism ``segments`` is this rank's shard: the conv then reads the earlier tokens of a cut
    document from the previous rank. ``backend``: "fla", "triton", "reference" or None (automatic; see
    :mod:`deltapack.ops.dispatch`).
    """,
)
