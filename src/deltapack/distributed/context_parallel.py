"""Running a patched model with context parallelism: set it up, shard a batch, and take the same loss as one device.

    import deltapack
    from deltapack.distributed import ContextShard, enable_context_parallel, token_mean_loss

    model = enable_context_parallel(deltapack.patch(model))
    bounds = deltapack.Boundaries.from_inputs(input_ids.shape, attention_mask=doc_ids)   # the whole batch
    shard = ContextShard.build(bounds, group, layout="zigzag")
    ids = shard.shard(bounds.unpad(input_ids))                  # [1, local tokens]
    logits = model(input_ids=ids, boundaries=shard.local).logits
    loss = token_mean_loss(logits, shard.shift_labels(shard.shard(bounds.unpad(labels))), shard)
    loss.backward()      # then sum gradients over the group (FSDP / DDP over the same ranks do it)

Every rank runs the same model on its own tokens. The loss each rank returns is its share of the global token mean
(its summed token losses over the number of targets of the whole stream), so the sum over ranks is the loss of one
device, and the sum over ranks of each rank's gradients is the gradient of one device.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from deltapack.boundaries import IGNORE_INDEX
from deltapack.distributed.attention import register_attention
from deltapack.distributed.collectives import all_reduce_sum
from deltapack.distributed.sharding import ContextShard
from deltapack.models.unwrap import base_model
from deltapack.patch import is_patched

__all__ = [
    "CONTEXT_PARALLEL_MODEL_TYPES",
    "disable_context_parallel",
    "enable_context_parallel",
    "load_balancing_loss_share",
    "num_targets",
    "token_mean_loss",
]

ModelT = TypeVar("ModelT", bound=nn.Module)
_PREVIOUS = "_deltapack_attention_before_context_parallel"

# the model types (of the text config) whose shard is verified exact against one device, forward and gradient: the
# GDN families and zaya across 2 gloo ranks (tests/test_distributed_gloo.py; qwen3_next and olmo_hybrid, the same GDN
# layers, on one rank holding both zigzag parts), the attention-only ones on one rank
# holding both zigzag parts and llama across 2 ranks too (tests/test_context_parallel_attention.py). Others are
# refused: an attention with a bias, sinks, soft-capping, chunks or a local window of its own that the
# context-parallel attention does not see would run and be wrong (bloom, mpt, falcon, gpt_neo, gpt_oss, llama4).
CONTEXT_PARALLEL_MODEL_TYPES = frozenset(
    {"qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "olmo_hybrid", "zaya"}
    | {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3"}
)


def enable_context_parallel(model: ModelT) -> ModelT:
    """Select the context-parallel attention on a patched model (idempotent); returns the model.

    The GDN layers need nothing: they read the shard from the boundaries. Raises ValueError on a model that
    :func:`deltapack.patch` has not patched, or whose model type is not in :data:`CONTEXT_PARALLEL_MODEL_TYPES`.
    """
    base = base_model(model)
    if not is_patched(base):
        raise ValueError(
            "deltapack: enable_context_parallel needs a patched model; expected deltapack.patch(model) first"
        )
    model_type = base.config.get_text_config().model_type
    if model_type not in CONTEXT_PARALLEL_MODEL_TYPES:
        raise ValueError(
            f"deltapack: context parallelism is not verified for model type {model_type!r}; expected one of "
            f"{sorted(CONTEXT_PARALLEL_MODEL_TYPES)} (run other models on one device per packed row)"
        )
    name = register_attention()
    if base.config._attn_implementation != name:
        object.__setattr__(base, _PREVIOUS, base.config._attn_implementation)
        base.set_attn_implementation(name)
    return model


def disable_context_parallel(model: ModelT) -> ModelT:
    """Undo :func:`enable_context_parallel` (restores the attention implementation); returns the model."""
    base = base_model(model)
    previous = base.__dict__.pop(_PREVIOUS, None)
    if previous is not None:
        base.set_attn_implementation(previous)
    return model


def num_targets(shift_labels: torch.Tensor, shard: ContextShard, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The number of targets (labels other than ``ignore_index``) of the whole stream, summed over ranks."""
    return all_reduce_sum((shift_labels != ignore_index).sum(), shard.group, shard.world_size)


def token_mean_loss(
    logits: torch.Tensor, shift_labels: torch.Tensor, shard: ContextShard, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """This rank's share of the token-mean cross entropy of the whole stream (fp32).

    Args:
        logits: [1, T_local, vocab]. shift_labels: [1, T_local] next-token targets (:meth:`ContextShard.shift_labels`).
        shard: this rank's shard.

    Returns:
        A scalar: the sum of this rank's token losses over the targets of all ranks; summed over ranks it is the
        one-device loss. A collective (the target count is summed over the group).
    """
    if logits.shape[:2] != shift_labels.shape:
        raise ValueError(
            f"deltapack: logits {tuple(logits.shape)} and shift_labels {tuple(shift_labels.shape)}; expected "
            "[1, T_local, vocab] and [1, T_local]"
        )
    total = num_targets(shift_labels, shard, ignore_index).clamp(min=1)
    summed = F.cross_entropy(
        logits.flatten(0, 1).float(), shift_labels.flatten(), ignore_index=ignore_index, reduction="sum"
    )
    return summed / total.to(summed.dtype)


def load_balancing_loss_share(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    group: Any = None,
    world_size: int = 1,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's share of the MoE load-balancing loss of all ranks' tokens together (fp32 scalar).

    transformers' loss (Switch Transformer) over the tokens of one device is E * sum_e f_e p_e, with f_e the share
    of top-k assignments that went to expert e and p_e its mean router probability, both over every layer's tokens.
    Here both means are over the tokens of every rank of ``group``: the assignment counts and the token count are
    summed over ranks (one all-reduce, no gradient: they do not depend on the parameters smoothly), and each rank
    contributes its own probabilities, so the sum over ranks of the shares is the loss of one device on all the
    tokens, and so are the summed gradients.

    Args:
        router_logits: per MoE layer, [tokens, E] router logits of this rank's tokens (``output_router_logits``).
        num_experts: E. top_k: experts per token. group, world_size: the ranks whose tokens make one batch.
        token_mask: [tokens] bool, False for tokens that do not count (the padding that makes a stream split into
            equal parts); None: all count.
    """
    device = router_logits[0].device
    counts = torch.zeros(num_experts, device=device, dtype=torch.float32)
    probs = torch.zeros(num_experts, device=device, dtype=torch.float32)
    keep = None if token_mask is None else token_mask.to(device=device, dtype=torch.float32)
    rows = torch.zeros((), device=device)
    for logits in router_logits:
        weights = F.softmax(logits, dim=-1)  # as transformers: softmax and top-k in the logits' dtype
        _, selected = torch.topk(weights, top_k, dim=-1)
        ones = torch.ones(selected.shape, device=device) if keep is None else keep[:, None].expand(selected.shape)
        counts = counts.index_add(0, selected.reshape(-1), ones.reshape(-1))
        probs = probs + (weights.float() if keep is None else weights.float() * keep[:, None]).sum(0)
        rows = rows + (weights.shape[0] if keep is None else keep.sum())
    stats = all_reduce_sum(torch.cat([counts, rows[None]]), group, world_size)
    total = stats[-1].clamp(min=1)
    return num_experts * ((stats[:-1] / total) * (probs / total)).sum()
