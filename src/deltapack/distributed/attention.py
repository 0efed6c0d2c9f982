"""Full attention across context-parallel ranks: every rank's queries see their document's keys on all ranks.

Each rank all-gathers the keys and values of all ranks (one collective for both, differentiable), then applies the
per-document causal mask in global stream positions: query i may read key j when both belong to the same document
and j <= i in the stream. The result equals the single-device attention on this rank's queries, and the gradient of
every key and value flows back to the rank that computed it.

It plugs into transformers as an attention implementation (``AttentionInterface``): the transformers attention module
computes q, k, v, q/k norms and rope as it always does, then calls :func:`context_parallel_attention` with this
rank's tensors. :func:`deltapack.distributed.enable_context_parallel` selects it on a patched model.

The mask here is dense [T_local, total]: exact on any device and what the CPU tests use. On GPUs the same gather
feeds a varlen kernel instead (each local piece's queries against its document's keys up to the piece's end, causal
aligned bottom-right), with no mask.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltapack.distributed.collectives import all_gather
from deltapack.distributed.sharding import ContextShard
from deltapack.models.attention import CONTEXT_PARALLEL as ATTENTION_NAME

__all__ = ["ATTENTION_NAME", "context_parallel_attention", "register_attention"]


def context_parallel_mask(shard: ContextShard, device: torch.device) -> torch.Tensor:
    """[T_local, total] bool: True where a local query may read a key, keys in rank-major gather order."""
    doc = shard.global_bounds.seq_idx[0].to(device)
    key_pos = torch.cat([shard.global_index(r) for r in range(shard.world_size)]).to(device)
    query_pos = shard.local_index.to(device)
    return (doc[query_pos][:, None] == doc[key_pos][None, :]) & (key_pos[None, :] <= query_pos[:, None])


def context_parallel_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any = None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention of this rank's queries over the keys and values of all ranks (a transformers attention function).

    Args:
        module: the transformers attention module (unused; part of the interface).
        query: [1, Hq, T_local, D]. key, value: [1, Hkv, T_local, D], Hq a multiple of Hkv (GQA).
        attention_mask: must be None (the mask comes from the shard).
        dropout, scaling: as transformers passes them.
        kwargs: must hold ``boundaries`` whose ``context_parallel`` is this rank's :class:`ContextShard`.

    Returns:
        ([1, T_local, Hq, D] in the dtype of query, None).
    """
    bounds = kwargs.get("boundaries")
    shard = getattr(bounds, "context_parallel", None)
    if shard is None:
        raise ValueError(
            f"deltapack: the {ATTENTION_NAME!r} attention ran without a context-parallel shard; expected a patched "
            "model called with boundaries=ContextShard.local (or call disable_context_parallel(model) to run it on "
            "one device)"
        )
    if attention_mask is not None:
        raise ValueError("deltapack: context-parallel attention got a mask; expected None (the shard holds the mask)")
    if query.shape[0] != 1 or query.shape[2] != shard.num_local_tokens:
        raise ValueError(
            f"deltapack: context-parallel attention got queries of shape {tuple(query.shape)}; expected "
            f"[1, heads, {shard.num_local_tokens}, head_dim]"
        )
    gathered = all_gather(torch.stack([key[0], value[0]]), shard.group, shard.world_size)  # [P, 2, Hkv, T, D]
    keys, values = (
        gathered[:, i].permute(1, 0, 2, 3).reshape(1, key.shape[1], -1, key.shape[-1]) for i in range(2)
    )  # [1, Hkv, total, D], rank-major
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    mask = context_parallel_mask(shard, query.device)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register :func:`context_parallel_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, context_parallel_attention)
    return ATTENTION_NAME
