"""The element-wise linear recurrence of RecurrentGemma's RG-LRU, state reset at every document start.

Per channel d, document-local positions:

    h_t = exp(log_a_t) * h_{t-1} + x_t,      h_{-1} = 0 (so h_0 = x_0 at every document start)

The RG-LRU layer computes ``log_a = -8 * r_t * softplus(recurrent_param)`` and the normalised input
``x_t = sqrt(1 - a_t^2) * i_t * u_t`` (multiplier 1 at a document start, where transformers also resets); this op is
the scan that follows (``RecurrentGemmaRglru._rnn_scan``). It is the HGRN recurrence of FLA
(``fused_recurrent_hgrn(x, g=log_a, cu_seqlens=...)``), which is the CUDA fast path.

The reference is a log-depth (Hillis-Steele) scan: ceil(log2(longest document)) vectorised steps over the whole
stream, no loop per token or per document. The decay at each document start is set to 0, which cuts every
document off from the one before, exactly.

Legend: T = tokens of the packed stream, D = channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deltapack.ops import opaque
from deltapack.ops.dispatch import fla_backend, public_function, register_op
from deltapack.ops.fallback import check_fast_backend
from deltapack.ops.segments import Segments
from deltapack.ops.varlen import acc_dtype, check_stream, log_steps, starts

__all__ = ["rg_lru_scan", "rg_lru_scan_ref"]

_FAST_DTYPES = (torch.bfloat16, torch.float16)


def _check(x: torch.Tensor, log_a: torch.Tensor, segments: Segments) -> None:
    check_stream("x", x, segments, 3)
    if log_a.shape != x.shape:
        raise ValueError(f"deltapack: log_a must have the shape of x {tuple(x.shape)}, got {tuple(log_a.shape)}")


def rg_lru_scan_ref(x: torch.Tensor, log_a: torch.Tensor, *, segments: Segments) -> torch.Tensor:
    """Exact varlen linear recurrence h_t = exp(log_a_t) h_{t-1} + x_t, h = 0 before every document.

    Args:
        x: [1, T, D] input. log_a: [1, T, D] log decay (<= 0; its value at a document start is not used).
        segments: the stream's documents (``cu_seqlens``, ``seq_idx``, ``max_seqlen``).

    Returns:
        h: [1, T, D] in the dtype of x, accumulated in fp32 (as the layer's scan does; fp64 for fp64 inputs).
    """
    _check(x, log_a, segments)
    dtype = acc_dtype(x)
    a = torch.exp(log_a.to(dtype)).masked_fill(starts(segments)[None, :, None], 0.0)
    h = x.to(dtype)
    for d in log_steps(segments):
        # element t holds the map h -> a * h + h_t over the window (t - d, t]; compose it with the window before
        h = torch.cat([h[:, :d], torch.addcmul(h[:, d:], a[:, d:], h[:, :-d])], dim=1)
        a = torch.cat([a[:, :d], a[:, d:] * a[:, :-d]], dim=1)
    return h.to(x.dtype)


def _load_fla() -> Callable[..., torch.Tensor]:
    from fla.ops.hgrn import fused_recurrent_hgrn

    def run(x: torch.Tensor, log_a: torch.Tensor, *, segments: Segments) -> torch.Tensor:
        h, _ = fused_recurrent_hgrn(x, log_a.to(x.dtype), cu_seqlens=segments.cu_seqlens)
        return h

    probe = Segments.from_cu_seqlens([0, 1, 6, 76], "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 76, 64, device="cuda", generator=gen).bfloat16()
    log_a = (-torch.rand(1, 76, 64, device="cuda", generator=gen) * 0.1).bfloat16()
    check_fast_backend(
        "FLA's fused_recurrent_hgrn",
        lambda x, log_a: run(x, log_a, segments=probe),
        lambda x, log_a: rg_lru_scan_ref(x, log_a, segments=probe),
        [x, log_a],
    )
    return run


def _verify_fla(x: torch.Tensor, log_a: torch.Tensor, *, segments: Segments) -> tuple[bool, str]:
    if not x.is_cuda:
        return False, f"x is on {x.device.type}; FLA runs on CUDA"
    if x.dtype not in _FAST_DTYPES:
        return False, f"x is {x.dtype}; the reference runs fp32 / fp64 (FLA's HGRN is used for bf16 / fp16)"
    return True, ""


# h has the shape and dtype of x
RG_LRU_SCAN = register_op("rg_lru_scan", rg_lru_scan_ref, fla_backend(_load_fla, _verify_fla), meta=opaque.like_first)


rg_lru_scan = public_function(
    RG_LRU_SCAN,
    """The RG-LRU scan over a packed stream (arguments as :func:`rg_lru_scan_ref`).

    Backends: "fla" (CUDA, bf16 / fp16: FLA's ``fused_recurrent_hgrn(x, g=log_a, cu_seqlens=...)``, fp32 state;
    checked forward and backward against the reference once per process on first use, refused with a warning if it
    fails) or "reference"; None chooses (see :mod:`deltapack.ops.dispatch`).
    """,
    check=_check,
)
