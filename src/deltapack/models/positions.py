"""Positions per document for the models that compute a positional bias their own way (a small per-family table).

Every other scheme needs nothing here: the patched entry hands the decoder per-document ``position_ids``, which
rotary embeddings (partial, scaled, multimodal-text) and learned absolute embeddings read as they are. The
decoders of encoder-decoder families (bart, marian, whisper, ...) take no ``position_ids`` and index their position
table by the sequence length: :data:`TABLE_POSITIONS` reads the table at the in-document positions instead. The
roberta family numbers positions from the token ids (padding_idx + 1 + non-padding tokens so far):
:data:`TOKEN_POSITIONS` restarts that count at every document.

ALiBi adds ``slope_h * key_position`` to the scores (a per-key bias: within one query's row, a constant shift of
all key positions changes nothing after the softmax). Over the packed stream bloom and mpt count key positions
along the whole stream, so the bias of a document far into the stream is a large number plus the document's own
bias: equal in exact arithmetic, but not in fp32 / bf16, where the large offset eats the mantissa (bf16 rounds a
position of 30000 to a multiple of 128). The rules below give each decoder layer the bias the document alone
gets, from the boundaries' in-document positions, through a forward pre-hook on the layer (active only inside a
packing scope; gradient-checkpointing replays run inside the scope too).

Legend: H = heads, T = tokens of the packed stream.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltapack.models.scope import active_boundaries

__all__ = ["RULES", "PositionRule", "attach", "detach"]

_HANDLES = "_deltapack_position_hooks"  # on a patched model: the pre-hook handles to remove in detach


@dataclass(frozen=True)
class PositionRule:
    """A decoder layer whose positional bias arrives as a keyword argument, and how to build it per document.

    Attributes:
        layer: the decoder layer's class name. kwarg: the keyword that carries the bias.
        build: (layer, bounds, given bias) -> the bias each document alone would get, same shape rules and dtype.
    """

    layer: str
    kwarg: str
    build: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]


def _bloom_alibi(layer: nn.Module, bounds: Any, given: torch.Tensor) -> torch.Tensor:
    """bloom: [H, 1, T] = slope_h * in-document position (alone: slope_h * arange(L), row-position based)."""
    build = sys.modules[type(layer).__module__].build_alibi_tensor
    # the slopes exactly as the model makes them: its tensor for two real tokens is (0, slope) per head
    slopes = build(torch.ones(1, 2, dtype=torch.long, device=given.device), layer.num_heads, torch.float32)[:, 0, 1]
    pos = bounds.position_ids.reshape(-1).to(given.device)
    return (slopes[:, None, None] * pos[None, None, :]).to(given.dtype)


def _mpt_alibi(layer: nn.Module, bounds: Any, given: torch.Tensor) -> torch.Tensor:
    """mpt: [H, 1, T] = slope_h * (position - document length + 1) (alone: slope_h * (k - L + 1))."""
    module = sys.modules[type(layer).__module__]
    # the slopes exactly as the model makes them (its default alibi_bias_max): over two positions, (-slope, 0)
    slopes = -module.build_mpt_alibi_tensor(layer.num_heads, 2, device=given.device)[:, 0, 0]
    cu = bounds.cu_seqlens.long().to(given.device)
    doc = bounds.seq_idx.reshape(-1).long().to(given.device)
    pos = bounds.position_ids.reshape(-1).to(given.device)
    offset = (pos - (cu[doc + 1] - cu[doc]) + 1).to(torch.int32)
    return (offset.view(1, 1, -1) * slopes.view(-1, 1, 1)).to(given.dtype)


RULES: dict[str, PositionRule] = {
    "bloom": PositionRule("BloomBlock", "alibi", _bloom_alibi),
    "mpt": PositionRule("MptBlock", "position_bias", _mpt_alibi),
}


# the decoders of encoder-decoder families run as causal LMs: their learned or sinusoidal position table is indexed
# by positions counted from the sequence length (their entry takes no position_ids); inside a packing scope the
# table is read at the in-document positions instead (plus the table's own offset, 2 for the bart family)
TABLE_POSITIONS = (
    "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus", "plbart",
    "trocr", "whisper",
)  # fmt: skip


def _table_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
    bounds = active_boundaries()
    if bounds is None or not isinstance(output, torch.Tensor) or bounds.total_tokens not in output.shape[-2:-1]:
        return None
    pos = bounds.position_ids.to(module.weight.device) + getattr(module, "offset", 0)
    return nn.Embedding.forward(module, pos).reshape(output.shape).to(output.dtype)


# encoder architectures run as causal LMs whose embeddings number positions from the token ids: padding_idx + 1 +
# the count of non-padding tokens so far (tokens equal to the padding id keep position padding_idx); inside a
# packing scope the count restarts at every document
TOKEN_POSITIONS = (
    "camembert", "data2vec-text", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl",
)  # fmt: skip


def _token_positions_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    bounds = active_boundaries()
    if bounds is None:
        return None
    pad = module.padding_idx
    ids = kwargs.get("input_ids", args[0] if args else None)
    pos = bounds.position_ids.to(module.position_ids.device)
    if ids is None:  # from embeddings: sequential, as transformers does for inputs_embeds
        return args, {**kwargs, "position_ids": pos + pad + 1}
    real = (ids != pad).reshape(-1).long()
    count = real.cumsum(0)
    start = bounds.cu_seqlens.long().to(count.device)[bounds.seq_idx.reshape(-1).long().to(count.device)]
    before = count[start] - real[start]  # non-padding tokens of the stream before the document starts
    return args, {**kwargs, "position_ids": ((count - before) * real + pad).reshape(pos.shape)}


def _pre_hook(rule: PositionRule) -> Callable[..., Any]:
    def hook(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bounds = active_boundaries()
        given = kwargs.get(rule.kwarg)
        if bounds is None or given is None:
            return None
        return args, {**kwargs, rule.kwarg: rule.build(layer, bounds, given)}

    return hook


def attach(model: nn.Module) -> None:
    """Register the per-document bias pre-hooks on ``model``'s decoder layers (a no-op for other models)."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", None))
    if model_type in TABLE_POSITIONS:
        model.__dict__[_HANDLES] = [
            m.register_forward_hook(_table_hook)
            for m in model.modules()
            if isinstance(m, nn.Embedding) and "PositionalEmbedding" in type(m).__name__
        ]
        return
    if model_type in TOKEN_POSITIONS:
        model.__dict__[_HANDLES] = [
            m.register_forward_pre_hook(_token_positions_hook, with_kwargs=True)
            for m in model.modules()
            if type(m).__name__.endswith("Embeddings") and hasattr(m, "create_position_ids_from_input_ids")
        ]
        return
    rule = RULES.get(model_type)
    if rule is None:
        return
    handles = [
        m.register_forward_pre_hook(_pre_hook(rule), with_kwargs=True)
        for m in model.modules()
        if type(m).__name__ == rule.layer
    ]
    model.__dict__[_HANDLES] = handles


def detach(model: nn.Module) -> None:
    for handle in model.__dict__.pop(_HANDLES, ()):
        handle.remove()
