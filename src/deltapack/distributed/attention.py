"""Full attention across context-parallel ranks: every rank's queries see their document's keys on all ranks.

Each rank all-gathers the keys and values of all ranks (one collective for both, differentiable), then runs varlen
attention of its own queries against exactly the keys they need: every local piece of a document (see
:mod:`deltapack.distributed.sharding`) against that document's keys from its first token up to the piece's last one,
causal aligned bottom-right (flash-attn's convention for a query segment shorter than its key segment). The key
segments are gathered once per layer with one index built per batch; nothing is masked densely on the GPU. The
result equals the single-device attention on this rank's queries, and the gradient of every key and value flows
back to the rank that computed it.

The same code runs on every backend of :func:`deltapack.ops.attention.varlen_attention`: the flash kernels on GPUs
(bf16 / fp16), its exact reference elsewhere (the CPU tests, fp32).

All-gather rather than ring: a rank needs the keys of every earlier part of its documents, which for the long
documents context parallelism is for is most of the stream anyway. The gather is one collective per layer; the
``exchange`` mode of ``benchmarks/bench_cp.py`` times it against the whole layer, which bounds what a ring (the
exchange hidden behind compute) could save.

It plugs into transformers as an attention implementation (``AttentionInterface``): the transformers attention module
computes q, k, v, q/k norms and rope as it always does, then calls :func:`context_parallel_attention` with this
rank's tensors. :func:`deltapack.distributed.enable_context_parallel` selects it on a patched model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltapack.distributed.collectives import all_gather
from deltapack.distributed.sharding import ContextShard, ShardSegments, chain_parts_of_rank
from deltapack.models.attention import CONTEXT_PARALLEL as ATTENTION_NAME
from deltapack.models.scope import active_boundaries
from deltapack.ops.attention import varlen_attention
from deltapack.ops.segments import Segments

__all__ = ["ATTENTION_NAME", "KeyPlan", "context_parallel_attention", "key_plan", "register_attention"]


@dataclass(frozen=True)
class KeyPlan:
    """Which gathered keys each local query piece reads (built once per batch, the plan of the rank's segments).

    Attributes:
        index: [Tk] int64 rows of the gathered [P * 2 * T_local] key/value buffer (rank-major, keys then values per
            rank) holding the keys of every piece, piece after piece; index + T_local gives the values.
        segments_k: the key segments, one per local piece (offsets into the Tk selected keys).
    """

    index: torch.Tensor
    segments_k: Segments


def key_plan(shard: ContextShard) -> KeyPlan:
    """This rank's :class:`KeyPlan`: each local piece reads its document from its first token to the piece's end."""
    segments = shard.local.segments
    return segments.plan(_build_key_plan)


def _build_key_plan(segments: ShardSegments) -> KeyPlan:
    shard, device = segments.shard, segments.device
    local = shard.num_local_tokens
    # where each global token sits in the gathered buffer: rank r's local token i is row r * 2 * local + i
    row_of = torch.empty(shard.total, dtype=torch.long)
    for rank in range(shard.world_size):
        base = rank * 2 * local
        for chain in chain_parts_of_rank(rank, shard.world_size, shard.layout):
            part = shard.chain[chain]
            row_of[part.start : part.end] = torch.arange(base, base + part.length)
            base += part.length
    cu = shard.global_bounds.cu_seqlens_host
    ranges, offsets = [], [0]
    for part in shard.parts:
        for j, doc in enumerate(part.docs):
            first, end = cu[doc], part.start + part.pieces[j + 1]
            ranges.append(row_of[first:end])
            offsets.append(offsets[-1] + end - first)
    return KeyPlan(index=torch.cat(ranges).to(device), segments_k=Segments.from_cu_seqlens(offsets, device))


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
        kwargs: ``boundaries`` (else the packing scope's) whose segments are this rank's :class:`ShardSegments`;
            a ``sliding_window``, ``softcap``, ``s_aux`` or ``sinks`` other than None raises (none of them here).

    Returns:
        ([1, T_local, Hq, D] in the dtype of query, None).
    """
    # the GDN families receive the boundaries as a keyword; the others run inside the packing scope that holds them
    segments = getattr(kwargs.get("boundaries") or active_boundaries(), "segments", None)
    if not isinstance(segments, ShardSegments):
        raise ValueError(
            f"deltapack: the {ATTENTION_NAME!r} attention ran without a context-parallel shard; expected a patched "
            "model called with boundaries=ContextShard.local (or call disable_context_parallel(model) to run it on "
            "one device)"
        )
    if attention_mask is not None:
        raise ValueError("deltapack: context-parallel attention got a mask; expected None (the shard holds the mask)")
    if dropout:
        raise ValueError(f"deltapack: context-parallel attention got dropout {dropout}; expected 0 (attention_dropout)")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"deltapack: context-parallel attention got sliding_window={kwargs['sliding_window']}; expected a full "
            "attention layer (the context-parallel attention has no window: run a windowed model on one device)"
        )
    for name in ("softcap", "s_aux", "sinks"):  # soft-capping, attention sinks: not in this attention either
        if kwargs.get(name) is not None:
            raise ValueError(
                f"deltapack: context-parallel attention got {name}; expected plain causal softmax attention (run "
                "this model on one device)"
            )
    shard = segments.shard
    if query.shape[0] != 1 or query.shape[2] != shard.num_local_tokens:
        raise ValueError(
            f"deltapack: context-parallel attention got queries of shape {tuple(query.shape)}; expected "
            f"[1, heads, {shard.num_local_tokens}, head_dim]"
        )
    local = shard.num_local_tokens
    # [2, T_local, Hkv, D]: tokens first, as varlen kernels take them; gathered [P, 2, T_local, Hkv, D]
    kv = torch.stack([key[0].transpose(0, 1), value[0].transpose(0, 1)])
    gathered = all_gather(kv, shard.group, shard.world_size)
    plan = key_plan(shard)
    rows = gathered.reshape(-1, *gathered.shape[-2:]).index_select(0, torch.cat([plan.index, plan.index + local]))
    keys, values = rows.chunk(2)  # [Tk, Hkv, D] each
    out = varlen_attention(
        query[0].transpose(0, 1).contiguous(),
        keys,
        values,
        segments=segments.pieces,
        scale=scaling,
        segments_k=plan.segments_k,
    )
    return out.unsqueeze(0), None


def register_attention() -> str:
    """Register :func:`context_parallel_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, context_parallel_attention)
    return ATTENTION_NAME
