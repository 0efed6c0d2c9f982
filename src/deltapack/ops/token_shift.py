"""Varlen token shift (RWKV's ``time_shift``): each token reads the previous token of its own document.

``token_shift_ref(x, segments=...)[:, t] = x[:, t - 1]``, and zeros at every document start (what the layer reads at
the start of a sequence run alone, ``nn.ZeroPad2d((0, 0, 1, -1))``), never the previous document's last token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltapack.ops import opaque
from deltapack.ops.dispatch import register_op
from deltapack.ops.segments import Segments
from deltapack.ops.varlen import check_stream

__all__ = ["token_shift", "token_shift_ref"]


def token_shift_ref(x: torch.Tensor, *, segments: Segments) -> torch.Tensor:
    """x: [1, T, D] packed stream -> [1, T, D] (same dtype): x shifted one token right, zeros at document starts."""
    check_stream("x", x, segments, 3)
    shifted = F.pad(x[:, :-1], (0, 0, 1, 0))
    return shifted.index_fill(1, segments.cu_seqlens[:-1].long(), 0)


TOKEN_SHIFT = register_op("token_shift", token_shift_ref, meta=opaque.like_first)


def token_shift(x: torch.Tensor, *, segments: Segments, backend: str | None = None) -> torch.Tensor:
    """Public op (arguments as :func:`token_shift_ref`): one gather, the reference on every device."""
    return TOKEN_SHIFT(x, segments=segments, backend=backend)
