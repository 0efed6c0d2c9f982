"""Attention kept inside documents for every attention model, through transformers' own extension points.

transformers builds every attention mask through one registry, ``ALL_MASK_ATTENTION_FUNCTIONS`` (one function per
attention implementation: ``sdpa_mask``, ``eager_mask``, ``flex_attention_mask``, ``flash_attention_mask``), and
runs every attention through another, ``ALL_ATTENTION_FUNCTIONS`` (sdpa, flex, flash; ``eager`` is each model's own
function). The mask builders receive the model's *mask function* (causal, sliding window, chunked, and any overlay
the model adds) as a predicate over (batch, head, query index, key index). :func:`install` wraps both registries'
entries once, process-wide. Outside a packing scope (:mod:`deltapack.models.scope`) every wrapper calls the original
function with the original arguments: unpatched models and unpacked calls are bit-identical.

Inside a packing scope (the decoder runs on the unpadded stream [1, total], no cache):

- the mask builders get ``per_document(mask_function) AND same_document``: the model's mask function evaluated at
  each token's position inside its document (so a window or a chunk counts from the document's start, exactly as
  for the document alone) and ``same_document(q, k)`` read from the scope's ``seq_idx``; the mask may not be skipped
  for ``is_causal`` (a packed stream is not one causal sequence). transformers' own guess of documents from
  ``position_ids`` (``find_packed_sequence_indices``) is off inside the scope: nothing re-derives the documents.
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
from torch import nn

from deltapack.models.scope import active_boundaries

__all__ = ["attach", "detach", "install", "installed", "same_document", "uninstall"]

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

        base = call.get("mask_function") or causal_mask_function
        masked = and_masks(per_document(base, bounds.position_ids), same_document(bounds.seq_idx))
        call.update(mask_function=masked, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        planned = attention_plan.packed_mask(
            impl, bounds, {**call, "base_mask_function": base}, masked, lambda: original(**call)
        )
        return planned if planned is not None else original(**call)

    setattr(mask, _WRAPPED, original)
    return mask


def per_document(mask_function: Callable[..., Any], position_ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``mask_function`` evaluated at the in-document positions of query and key (so a chunk or a window is
    counted from each document's start, as for the document alone).

    Args:
        position_ids: [1, T] int64, each token's position inside its document (from the batch's boundaries).
    """
    pos = position_ids.reshape(-1)

    def inner(batch_idx: Any, head_idx: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return mask_function(batch_idx, head_idx, pos[q_idx], pos[kv_idx])

    return inner


def _no_packed_detection(original: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' ``find_packed_sequence_indices`` (documents guessed from position_ids), off in a packing
    scope: the scope's boundaries say where documents are, and the mask builders apply them."""

    @functools.wraps(original)
    def find(*args: Any, **kwargs: Any) -> Any:
        if active_boundaries() is not None:
            return None
        return original(*args, **kwargs)

    setattr(find, _WRAPPED, original)
    return find


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
        if mask is None and _causal_over_stream(module, query, key, bounds, kw):
            mask = _causal_packed_mask(impl, bounds, query.dtype)  # a model that built no mask: causal per document
        if isinstance(mask, PackedMask):
            kw.pop("attention_mask", None)
            return run_packed_attention(original, module, query, key, value, mask, **kw)
        return original(module, query, key, value, *args, **kw)

    setattr(attention, _WRAPPED, original)
    return attention


def _causal_over_stream(module: nn.Module, query: torch.Tensor, key: torch.Tensor, bounds: Any, kw: dict) -> bool:
    """True for a causal self-attention call over the whole packed stream (the case no mask must never mean)."""
    causal = kw.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    total = bounds.total_tokens
    return bool(causal) and query.shape[-2] == total and key.shape[-2] == total


def _causal_packed_mask(impl: str, bounds: Any, dtype: torch.dtype) -> Any:
    """Causal attention within documents as a PackedMask, for an attention call that got no mask in a scope."""
    from transformers.masking_utils import and_masks, causal_mask_function

    from deltapack.models.attention_plan import PackedMask

    def materialize() -> torch.Tensor:
        doc = bounds.seq_idx.reshape(-1)
        idx = torch.arange(doc.numel(), device=doc.device)
        allowed = ((doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None]))[None, None]
        if impl == "sdpa":
            return allowed
        zero = torch.zeros((), dtype=dtype, device=doc.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    fn = and_masks(per_document(causal_mask_function, bounds.position_ids), same_document(bounds.seq_idx))
    return PackedMask(bounds, fn, "causal", None, materialize)


def install() -> None:
    """Wrap the mask builders and attention functions of transformers' registries (once per process).

    Entries registered after this call (a user's own attention function) are wrapped at the next call; an entry
    already wrapped is left alone, so calling it again is harmless.
    """
    global _installed
    from transformers import masking_utils
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if not hasattr(masking_utils.find_packed_sequence_indices, _WRAPPED):
        masking_utils.find_packed_sequence_indices = _no_packed_detection(masking_utils.find_packed_sequence_indices)
    for impl, fn in list(AttentionMaskInterface._global_mapping.items()):
        if not hasattr(fn, _WRAPPED):
            AttentionMaskInterface._global_mapping[impl] = _masked(impl, fn)
    for impl, fn in list(AttentionInterface._global_mapping.items()):
        if not hasattr(fn, _WRAPPED) and (impl in ("sdpa", "flex_attention") or "flash" in impl):
            AttentionInterface._global_mapping[impl] = _attention(impl, fn)
    if not _installed:
        _installed = True
        logger.debug("deltapack: attention mask and attention function registries wrapped")


def attach(model: nn.Module) -> None:
    """What :func:`deltapack.patch` adds for attention, on any model it patches: the registry hooks (process-wide,
    once), the GPU plan for ``model``'s attention (:mod:`deltapack.models.attention_plan`) and its per-document
    positional biases where a model computes them its own way (:mod:`deltapack.models.positions`)."""
    from deltapack.models import attention_plan, positions

    install()
    attention_plan.register_model(model)
    positions.attach(model)


def detach(model: nn.Module) -> None:
    """Undo :func:`attach` for ``model`` (the process-wide hooks stay: they delegate outside packing scopes)."""
    from deltapack.models import attention_plan, positions

    attention_plan.unregister_model(model)
    positions.detach(model)


def installed() -> bool:
    return _installed


def uninstall() -> None:
    """Put the original functions back into both registries (tests; patched models keep working unpacked)."""
    global _installed
    from transformers import masking_utils
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    find = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = getattr(find, _WRAPPED, find)
    for mapping in (AttentionMaskInterface._global_mapping, AttentionInterface._global_mapping):
        for impl, fn in list(mapping.items()):
            if hasattr(fn, _WRAPPED):
                mapping[impl] = getattr(fn, _WRAPPED)
    _installed = False
