"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for patched models: bf16 compute, fp32 master weights and
reductions, and the GDN parameters the model computes in fp32 kept fp32 in compute.

FSDP2 casts parameters per group (one ``fully_shard`` call), never per parameter, and a group takes every parameter
of its module's subtree that no earlier (deeper) call took. So each decoder layer is sharded bottom-up:

1. inside every Gated DeltaNet module: each ``nn.Linear`` and norm child is a bf16 group of its own (their forward
   runs, so FSDP gathers them when they are called);
2. the GDN module itself is an fp32 group with what is left: ``A_log`` and ``dt_bias`` (the decay, which the model
   computes in fp32: ``-A_log.float().exp() * softplus(a.float() + dt_bias)``) and the conv weight, which the layer
   reads directly instead of calling ``conv1d`` (D x W values; the conv then runs with fp32 weights). This group does
   not cast its inputs: the layer's activations stay bf16;
3. with ``fp32_norms``, every RMSNorm that upcasts its weight itself (``1 + weight.float()``) is an fp32 group too;
4. the decoder layer is a bf16 group with the rest (attention, MLP or experts, layer norms);
5. the root module is a bf16 group: embeddings, final norm, LM head.

All groups keep fp32 sharded master weights and reduce gradients in fp32. The price of the GDN split is more,
smaller all-gathers per GDN layer (one per projection instead of one per layer): measure it on the GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from deltapack.models.registry import architecture_of
from deltapack.models.unwrap import base_model

__all__ = ["FP32_PARAMETERS", "FsdpGroup", "apply_fsdp", "load_from_rank0", "plan_fsdp_groups", "set_gradient_divisor"]

ModelT = TypeVar("ModelT", bound=nn.Module)

# parameters of the GDN layers that the model computes in fp32 (whatever their storage dtype)
FP32_PARAMETERS = ("A_log", "dt_bias")


@dataclass(frozen=True)
class FsdpGroup:
    """One ``fully_shard`` call: ``module`` (named ``name`` in the model) and whether it computes in fp32."""

    name: str
    module: nn.Module
    fp32: bool

    def parameter_names(self, taken: set[nn.Parameter]) -> list[str]:
        """Names (relative to the module) of the parameters this group will hold, given those already taken."""
        return [n for n, p in self.module.named_parameters() if p not in taken]


def _has_own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _upcasting_norm(module: nn.Module) -> bool:
    """An RMSNorm whose forward upcasts its weight (Qwen3.5's ``1 + weight.float()``), not the gated GDN norm."""
    return type(module).__name__.endswith("RMSNorm") and _has_own_parameters(module)


def plan_fsdp_groups(model: nn.Module, fp32_norms: bool = False) -> list[FsdpGroup]:
    """The ``fully_shard`` calls :func:`apply_fsdp` makes, in order (deepest first, the root last).

    Args:
        model: a supported transformers model (patched or not; a PEFT wrapper is looked through).
        fp32_norms: also keep the RMSNorms that upcast their weight in fp32 groups.
    """
    base = base_model(model)
    arch = architecture_of(base)
    gdn_cls = arch.cls(arch.gdn)
    names = {m: n for n, m in base.named_modules()}
    layers = [m for m in base.modules() if isinstance(m, nn.ModuleList) and names[m].endswith("layers")]
    if not layers:
        raise ValueError(f"deltapack: found no decoder layers in {type(base).__name__}; expected a '*.layers' list")
    groups: list[FsdpGroup] = []
    for layer in (layer for stack in layers for layer in stack):
        for module in layer.modules():
            if isinstance(module, gdn_cls):
                for child in module.children():
                    if _has_own_parameters(child) and (isinstance(child, nn.Linear) or "Norm" in type(child).__name__):
                        groups.append(FsdpGroup(names[child], child, fp32=False))
                groups.append(FsdpGroup(names[module], module, fp32=True))
            elif fp32_norms and _upcasting_norm(module):
                groups.append(FsdpGroup(names[module], module, fp32=True))
        groups.append(FsdpGroup(names[layer], layer, fp32=False))
    if fp32_norms:  # the final norm, outside the layers
        inside = {m for stack in layers for m in stack.modules()}
        groups += [
            FsdpGroup(n, m, fp32=True) for n, m in base.named_modules() if _upcasting_norm(m) and m not in inside
        ]
    groups.append(FsdpGroup("", base, fp32=False))
    return groups


def apply_fsdp(
    model: ModelT,
    mesh: Any = None,
    *,
    param_dtype: torch.dtype = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    fp32_norms: bool = False,
    context_parallel_size: int = 1,
) -> ModelT:
    """Shard ``model`` with FSDP2 per decoder layer, the GDN's fp32 parameters kept fp32 in compute; returns it.

    Call it after :func:`deltapack.patch` (and :func:`enable_context_parallel`, if used) and before building the
    optimizer. The model's parameters should be fp32 (they become the sharded master weights).

    Args:
        model: a patched (or plain) qwen3_5 / qwen3_5_moe / qwen3_next model, parameters in fp32.
        mesh: the data-parallel ``DeviceMesh`` (None: the default group, as ``fully_shard`` does).
        param_dtype: compute dtype of every group except the fp32 ones. reduce_dtype: gradient reduction dtype.
        reshard_after_forward: passed to ``fully_shard`` for the layer groups (the root keeps its default).
        fp32_norms: also keep the RMSNorms that upcast their weight (``1 + weight.float()``) in fp32.
        context_parallel_size: how many consecutive ranks of the mesh split one batch by context parallelism. Their
            gradients are summed (each holds its share of one loss, see :func:`token_mean_loss`); gradients of
            different batches are averaged, as FSDP does: the reduction divides by mesh size / this.

    Raises:
        ValueError: a model deltapack does not support, parameters that are not fp32, or a mesh size that is not a
            multiple of ``context_parallel_size``.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    not_fp32 = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if not_fp32:
        raise ValueError(
            f"deltapack: apply_fsdp got parameters in {', '.join(not_fp32)}; expected fp32 parameters "
            "(FSDP keeps them as the sharded master weights and casts to param_dtype for compute)"
        )
    world = mesh.size() if mesh is not None else dist.get_world_size()
    if context_parallel_size < 1 or world % context_parallel_size:
        raise ValueError(
            f"deltapack: context_parallel_size {context_parallel_size} with {world} ranks; "
            f"expected a divisor of {world}"
        )
    low = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # fp32 groups compute in fp32 but leave the activations they receive in the compute dtype
    high = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for group in plan_fsdp_groups(model, fp32_norms=fp32_norms):
        is_root = group.module is base_model(model)
        fully_shard(
            group.module,
            mesh=mesh,
            mp_policy=high if group.fp32 else low,
            reshard_after_forward=None if is_root else reshard_after_forward,
        )
    if context_parallel_size > 1:
        set_gradient_divisor(model, float(world // context_parallel_size))
    return model


def set_gradient_divisor(model: nn.Module, divisor: float) -> None:
    """Make every FSDP group of ``model`` reduce gradients as a sum over ranks divided by ``divisor`` (FSDP's default
    divides by the number of ranks: ranks that hold shares of one loss are summed instead)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(divisor)
            # a plain sum, then the division: gloo has no pre-multiplied sum, and NCCL's zero-copy wants sums
            module.set_force_sum_reduction_for_comms(True)


def load_from_rank0(model: nn.Module, full_state: dict[str, torch.Tensor], device: torch.device | str) -> None:
    """Rank 0's full weights into every rank's FSDP shards, for a model too large to load on every rank.

    Rank 0 builds the model with its weights and takes ``full_state = model.state_dict()`` before
    :func:`apply_fsdp`; every other rank builds the same model on the meta device (``with torch.device("meta")``) and
    passes ``{}``. After :func:`apply_fsdp` on all ranks, call this on all ranks: the meta ranks allocate their shards
    on ``device``, rank 0 broadcasts each tensor and every rank keeps its shard; the buffers (not sharded, some not
    saved, such as rotary frequencies) are broadcast as they are. A collective.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dist.get_rank() != 0:
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
