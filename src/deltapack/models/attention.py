"""Full-attention layers under packing: each query sees only the earlier tokens of its own document.

The decoder runs on the unpadded stream [1, total]; what the transformers attention layers need to keep documents
apart is built here from the batch's boundaries, once per forward:

- ``eager`` / ``sdpa``: an exact block-diagonal causal mask [1, 1, total, total] (bool for sdpa, additive for
  eager). It is quadratic in memory: fine on the CPU and for tests, and the reason the GPU path uses varlen.
- flash-attention implementations: no mask, and the varlen kwargs ``cu_seq_lens_q/k``, ``max_length_q/k`` taken
  from the boundaries (transformers passes them straight to the varlen kernel).
"""

from __future__ import annotations

from typing import Any

import torch

from deltapack.boundaries import Boundaries

MASKED = ("eager", "sdpa")


def block_causal_mask(bounds: Boundaries) -> torch.Tensor:
    """[1, 1, total, total] bool, True where query i may attend key j (same document, j <= i)."""
    doc = bounds.seq_idx[0]
    pos = torch.arange(doc.numel(), device=doc.device)
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    return allowed[None, None]


def attention_inputs(bounds: Boundaries, implementation: str, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    """(the mask for the full-attention layers, extra kwargs for the attention function).

    Raises ValueError for an attention implementation deltapack cannot keep exact.
    """
    if implementation == "sdpa":
        return block_causal_mask(bounds), {}
    if implementation == "eager":
        allowed = block_causal_mask(bounds)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min), {}
    if "flash" in implementation:
        return None, {
            "cu_seq_lens_q": bounds.cu_seqlens,
            "cu_seq_lens_k": bounds.cu_seqlens,
            "max_length_q": bounds.max_seqlen,
            "max_length_k": bounds.max_seqlen,
        }
    raise ValueError(
        f"deltapack: attention implementation {implementation!r} is not supported with packed inputs; "
        f"expected one of {MASKED} or a flash-attention implementation"
    )
