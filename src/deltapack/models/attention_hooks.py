"""Attention kept inside documents for every attention model, through transformers' own extension points.

transformers builds every attention mask through one registry, ``ALL_MASK_ATTENTION_FUNCTIONS`` (one function per
attention implementation: ``sdpa_mask``, ``eager_mask``, ``flex_attention_mask``, ``flash_attention_mask``), and
runs every attention through another, ``ALL_ATTENTION_FUNCTIONS`` (sdpa, flex, flash; ``eager`` is each model's own
function). The mask builders receive the model's *mask function* (causal, sliding window, chunked, and any overlay
the model adds) as a predicate over (batch, head, query index, key index). :func:`install` wraps both registries'
entries once, process-wide. Outside a packing scope (:mod:`deltapack.models.scope`) every wrapper calls the original
function with the original arguments: unpatched models and unpacked calls are bit-identical.

Inside a packing scope (the decoder runs on the unpadded stream [1, total], no cache):

- the mask builders get ``mask_function AND same_document``, where ``same_document(q, k)`` reads the scope's
  ``seq_idx`` (never positions), and may not skip the mask for ``is_causal`` (a packed stream is not one causal
  sequence). A sliding window, a chunk or an overlay of the model keeps its own definition; the document mask only
  removes the other documents. Chunked attention counts its chunks from each document's start because the stream's
  per-document ``position_ids`` reach transformers' mask builders, which then index the mask function by position.
- on a GPU (see :mod:`deltapack.models.attention_plan`), the mask of an implementation whose attention runs through
  ``ALL_ATTENTION_FUNCTIONS`` is a :class:`PackedMask` (no [T, T] tensor) and the attention wrapper runs a varlen
  kernel with the batch's ``cu_seqlens``, or flex attention where the layer needs a window, a chunk, soft-capping or
  sinks; ``eager`` (each model's own function, which adds the mask to its scores) keeps the exact dense mask.
- the flash-attention wrappers pass the batch's ``cu_seq_lens_q/k`` and ``max_length_q/k`` to the kernel.

Legend: T = tokens of the packed stream.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from deltapack.models.scope import active_boundaries

__all__ = ["install", "installed", "same_document", "uninstall"]

logger = logging.getLogger("deltapack")

_WRAPPED = "__deltapack_wrapped__"  # on a wrapper: the original function
_installed = False


def same_document(seq_idx: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A transformers mask function: True where query and key are tokens of the same document.

    Args:
        seq_idx: [1, T] int, the document of each token of the stream (from the batch's boundaries).
    """
    doc = seq_idx.reshape(-1)

    def inner(batch_idx: Any, head_idx: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return doc[q_idx] == doc[kv_idx]

    return inner


def _check_stream(impl: str, bounds: Any, call: dict[str, Any]) -> None:
    total = bounds.total_tokens
    got = (call.get("batch_size"), call.get("q_length"), call.get("kv_length"))
    offsets = (call.get("q_offset", 0), call.get("kv_offset", 0))
    if got != (1, total, total) or any(isinstance(o, torch.Tensor) or o != 0 for o in offsets):
        raise ValueError(
            f"deltapack: the {impl} attention mask was asked for batch {got[0]}, {got[1]} queries and {got[2]} keys "
            f"(offsets {offsets}) inside a packed call; expected the packed stream: batch 1, {total} queries and "
            "keys, no cache"
        )


def _masked(impl: str, original: Callable[..., Any]) -> Callable[..., Any]:
    """The mask builder ``original`` of implementation ``impl``, kept within documents inside a packing scope."""

    @functools.wraps(original)
    def mask(*args: Any, **kwargs: Any) -> Any:
        bounds = active_boundaries()
        if bounds is None:
            return original(*args, **kwargs)
        from transformers.masking_utils import and_masks, causal_mask_function

        names = ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "mask_function", "attention_mask")
        call = {**dict(zip(names, args)), **kwargs}
        _check_stream(impl, bounds, call)
        if "flash" in impl:
            return None  # the flash wrappers pass cu_seq_lens from the same boundaries
        from deltapack.models import attention_plan

        planned = attention_plan.packed_mask(impl, bounds, call)
        if planned is not None:
            return planned
        base = call.get("mask_function") or causal_mask_function
        call["mask_function"] = and_masks(base, same_document(bounds.seq_idx))
        call["allow_is_causal_skip"] = False
        call["allow_is_bidirectional_skip"] = False
        return original(**call)

    setattr(mask, _WRAPPED, original)
    return mask


def _attention(impl: str, original: Callable[..., Any]) -> Callable[..., Any]:
    """The attention function ``original`` of implementation ``impl``, within documents inside a packing scope."""

    @functools.wraps(original)
    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kw):
        bounds = active_boundaries()
        if bounds is None:
            return original(module, query, key, value, *args, **kw)
        if "flash" in impl:
            kw.update(
                cu_seq_lens_q=bounds.cu_seqlens,
                cu_seq_lens_k=bounds.cu_seqlens,
                max_length_q=bounds.max_seqlen,
                max_length_k=bounds.max_seqlen,
            )
            return original(module, query, key, value, *args, **kw)
        from deltapack.models.attention_plan import PackedMask, run_packed_attention

        mask = args[0] if args else kw.get("attention_mask")
        if isinstance(mask, PackedMask):
            return run_packed_attention(module, query, key, value, mask, **{k: v for k, v in kw.items()})
        return original(module, query, key, value, *args, **kw)

    setattr(attention, _WRAPPED, original)
    return attention


def install() -> None:
    """Wrap the mask builders and attention functions of transformers' registries (once per process).

    Entries registered after this call (a user's own attention function) are wrapped at the next call; an entry
    already wrapped is left alone, so calling it again is harmless.
    """
    global _installed
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for impl, fn in list(AttentionMaskInterface._global_mapping.items()):
        if not hasattr(fn, _WRAPPED):
            AttentionMaskInterface._global_mapping[impl] = _masked(impl, fn)
    for impl, fn in list(AttentionInterface._global_mapping.items()):
        if not hasattr(fn, _WRAPPED) and (impl in ("sdpa", "flex_attention") or "flash" in impl):
            AttentionInterface._global_mapping[impl] = _attention(impl, fn)
    if not _installed:
        _installed = True
        logger.debug("deltapack: attention mask and attention function registries wrapped")


def installed() -> bool:
    return _installed


def uninstall() -> None:
    """Put the original functions back into both registries (tests; patched models keep working unpacked)."""
    global _installed
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for mapping in (AttentionMaskInterface._global_mapping, AttentionInterface._global_mapping):
        for impl, fn in list(mapping.items()):
            if hasattr(fn, _WRAPPED):
                mapping[impl] = getattr(fn, _WRAPPED)
    _installed = False
