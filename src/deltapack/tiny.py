"""Tiny random-init configs of the supported architectures, for the audit, the tests and the CPU demo.

The GDN decay is set to long memory (as in trained models): random init draws A in [0.01, 16], which forgets within
a few tokens and so hides a recurrent-state leak; here A is small, so state carried across a boundary shows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

# what most tiny configs share: a 128-token vocabulary, 64 wide; attention layers of 4 query heads of 16, 2 key / value
SMALL = dict(vocab_size=128, hidden_size=64)
SMALL_ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
# the special tokens of the families whose tiny configs are hand-made field by field
IDS = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# the GDN layer of every tiny GDN hybrid: 2 key / 4 value heads of 16, a 4-tap conv
GDN_LAYER = dict(
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
)
# what the three families share: 4 layers (3 GDN, 1 full attention)
_HYBRID = dict(
    **SMALL,
    num_hidden_layers=4,
    layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
    **SMALL_ATTENTION,
    **GDN_LAYER,
)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)

TINY: dict[str, dict[str, Any]] = {
    "qwen3_5": dict(model_type="qwen3_5_text", intermediate_size=128, **_HYBRID),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe_text", **_HYBRID, **_MOE),
    "qwen3_next": dict(model_type="qwen3_next", intermediate_size=128, decoder_sparse_step=1, **_HYBRID, **_MOE),
}


# per arch: how to set its decays to long memory, where set_long_memory's rule (A_log / dt_bias) does not fit
LONG_MEMORY: dict[str, Callable[[nn.Module], Any]] = {}


def register_tiny(arch: str, fields: dict[str, Any], long_memory: Callable[[nn.Module], Any] | None = None) -> None:
    """Add the tiny config of ``arch`` (``fields`` holds ``model_type`` and the config's fields).

    ``long_memory``: called on a freshly built model to set its decays to long memory in place (default:
    :func:`set_long_memory`). Families register theirs from :mod:`deltapack.models.families`.
    """
    if "model_type" not in fields:
        raise ValueError(f"the tiny config of {arch!r} has no model_type")
    TINY[arch] = dict(fields)
    if long_memory is not None:
        LONG_MEMORY[arch] = long_memory


def register_tinies(
    configs: dict[str, dict[str, Any]], long_memory: Callable[[nn.Module], Any] | None = None, **common: Any
) -> None:
    """:func:`register_tiny` for every arch of ``configs``, each with the ``common`` fields first and ``model_type``
    the arch unless its fields name another."""
    for arch, fields in configs.items():
        register_tiny(arch, {"model_type": arch, **common, **fields}, long_memory)


def available() -> tuple[str, ...]:
    """Every arch with a tiny config (the families' included), sorted."""
    from deltapack.models.layers import supported_model_types

    supported_model_types()  # imports the families, which register their tiny configs
    return tuple(sorted(TINY))


def tiny_config(arch: str = "qwen3_5", **overrides: Any) -> PretrainedConfig:
    """A tiny config of ``arch`` (see :func:`available`), with ``overrides`` applied."""
    if arch not in available():
        raise ValueError(f"no tiny config for {arch!r}; expected one of {sorted(TINY)}")
    fields = {**TINY[arch], **overrides}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def set_long_memory(model: nn.Module, low: float = 1e-3, high: float = 2e-2, seed: int = 0) -> nn.Module:
    """Draw every GDN layer's decay rate A from [low, high] (long memory), in place; returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "A_log") and hasattr(module, "dt_bias"):
                a = torch.empty(module.A_log.shape).uniform_(low, high, generator=gen)
                module.A_log.copy_(a.log())
    return model


def tiny_model(arch: str = "qwen3_5", seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any) -> nn.Module:
    """A tiny random-init *ForCausalLM of ``arch`` in fp32 on the CPU, eval mode, long-memory decay."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    except ValueError as exc:  # attention-free models (mamba) accept only "eager"
        if "attention implementation" not in str(exc):
            raise
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float().eval()
    custom = LONG_MEMORY.get(arch)
    if custom is not None:
        custom(model)
        return model
    return set_long_memory(model, seed=seed)
