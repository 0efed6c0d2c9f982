"""Generic shrinking of a transformers config to a tiny one, and long memory for decay / forget parameters.

Shrinking sets the common size fields that a config has (hidden size, heads, experts, vocabulary, ...) to small
values and keeps only as many layers as it takes to cover every layer type the architecture has (the first
occurrence of each type, in the architecture's own order).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deltapack import tiny

__all__ = ["shrink_config", "set_long_memory"]

# field -> small value; only fields the config already has are set
SMALL: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "d_model": 64,
    "n_embd": 64,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "n_inner": 128,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "max_position_embeddings": 256,
}


def shrink_config(config: Any) -> tuple[Any, list[str]]:
    """A tiny copy of ``config`` (a transformers config); the notes say what was done."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    changed = {k: v for k, v in SMALL.items() if hasattr(text, k) and getattr(text, k) is not None}
    for k, v in changed.items():
        setattr(text, k, v)
    layers = getattr(text, "num_hidden_layers", None)
    types = getattr(text, "layer_types", None)
    if isinstance(types, (list, tuple)) and types:
        firsts = sorted({t: i for i, t in reversed(list(enumerate(types)))}.values())
        keep = max(firsts) + 1
        text.layer_types = list(types[:keep])
        text.num_hidden_layers = keep
    elif isinstance(layers, int):
        text.num_hidden_layers = min(layers, 2)
    return config, [
        f"config shrunk to {text.num_hidden_layers} layers, hidden size {getattr(text, 'hidden_size', '?')}"
    ]


def set_long_memory(model: nn.Module, seed: int = 0) -> list[str]:
    """Set decay parameters to long memory where random init forgets within a few tokens; notes say where."""
    notes = []
    gdn = [
        m for m in model.modules() if hasattr(m, "A_log") and hasattr(m, "dt_bias") and "DeltaNet" in type(m).__name__
    ]
    if gdn:
        tiny.set_long_memory(model, seed=seed)
        notes.append("long-memory GDN decay: A drawn from [1e-3, 2e-2] (random init forgets within a few tokens)")
    return notes
