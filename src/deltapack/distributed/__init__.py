"""Scale-out: context parallelism for packed rows, and FSDP2 for patched models.

- :class:`ContextShard` splits one packed stream across the ranks of a process group (contiguous or zigzag) and
  keeps the bookkeeping of which documents each rank boundary cuts.
- :mod:`deltapack.distributed.ops`: exact context-parallel causal conv1d and gated delta rule (conv tokens and
  recurrent states handed over between ranks), reached through ``deltapack.ops`` when the segments are a shard.
- :mod:`deltapack.distributed.attention`: full attention across ranks (keys and values all-gathered).
- :func:`enable_context_parallel` and :func:`token_mean_loss`: a patched model on its shard, the loss of one device;
  :func:`load_balancing_loss_share`: the MoE load-balancing loss of all ranks' tokens, shared out.
- :func:`apply_fsdp`: FSDP2 per decoder layer with bf16 compute, fp32 reductions and the GDN's fp32 parameters kept
  fp32; :func:`load_from_rank0` fills the shards from rank 0's weights (the other ranks build on the meta device).
"""

from deltapack.distributed.context_parallel import (
    CONTEXT_PARALLEL_MODEL_TYPES,
    disable_context_parallel,
    enable_context_parallel,
    load_balancing_loss_share,
    num_targets,
    token_mean_loss,
)
from deltapack.distributed.fsdp import apply_fsdp, load_from_rank0, plan_fsdp_groups
from deltapack.distributed.sharding import LAYOUTS, ContextShard, ShardSegments, StreamPart, padded_total

__all__ = [
    "CONTEXT_PARALLEL_MODEL_TYPES",
    "LAYOUTS",
    "ContextShard",
    "ShardSegments",
    "StreamPart",
    "apply_fsdp",
    "disable_context_parallel",
    "enable_context_parallel",
    "load_balancing_loss_share",
    "load_from_rank0",
    "num_targets",
    "padded_total",
    "plan_fsdp_groups",
    "token_mean_loss",
]
