"""Generic shrinking of a transformers config to a tiny one, and long memory for decay / forget parameters.

Shrinking rebuilds the config from its class with small values for the common size fields it has (hidden size
and the fields that alias it, heads, experts, vocabulary, ...), so fields derived in ``__init__`` follow, and keeps
only as many layers as it takes to cover every layer type of the architecture's default config (up to the last
first occurrence of a type, in the architecture's own order). Sub-configs (text, vision) are shrunk the same way.
A few architectures whose default config lacks their characteristic layers get explicit layer types (HYBRIDS).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from deltapack import tiny

__all__ = ["HYBRIDS", "set_long_memory", "shrink_config"]

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 128, 4, 2, 16, 128
MAX_LAYERS = 12

# field -> small value; only fields the config already has are set
SMALL: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "d_model": HIDDEN,
    "n_embd": HIDDEN,
    "embedding_dim": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "ffn_dim": INTERMEDIATE,
    "n_inner": INTERMEDIATE,
    "d_ff": INTERMEDIATE,
    "num_attention_heads": HEADS,
    "n_head": HEADS,
    "num_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "attention_head_dim": HEAD_DIM,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "n_group": 1,
    "topk_group": 1,
    "moe_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_head_dim": 16,
    "mamba_d_state": 16,
    "ssm_state_size": 16,
    "state_size": 16,
    "n_mamba_heads": 8,
    "mamba_headdim": 16,
    "time_step_rank": 8,
    "encoder_attention_heads": HEADS,
    "decoder_attention_heads": HEADS,
    "encoder_ffn_dim": INTERMEDIATE,
    "decoder_ffn_dim": INTERMEDIATE,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "sliding_window": 64,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 16,
}

# architectures whose default config has none of their characteristic layers: the layer types to audit
HYBRIDS: dict[str, dict[str, Any]] = {
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
}

# size fields that must agree in ways the generic values miss (SSM heads x head dim = expand x hidden)
CONSISTENT: dict[str, dict[str, Any]] = {
    "mamba2": {"num_heads": 8, "head_dim": 16},
    "falcon_h1": {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_ssm": 128, "mamba_expand": 2},
    # the per-layer pattern is stored as [[types, repeats]] and must multiply out to the layer count
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "num_layers": 2, "window_size": 4},
    # its attention reads attn_config.rope_theta and clamps by clip_qkv, which released checkpoints set and the
    # default config lacks
    "dbrx": {
        "n_heads": HEADS,
        "attn_config": {"kv_n_heads": KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": INTERMEDIATE},
    },
    "zaya": {"num_experts_per_tok": 1},  # its config validator allows top-1 routing only
    # the default config leaves its experts unset
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},
    # the default config leaves rope_parameters empty where the model reads one entry per layer type (5.17 splits
    # the rotary frequencies into sections: 8 = 2 + 2 + 4 for head_dim 16)
    "cohere_compass_text": {
        "rope_parameters": {
            t: {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]}
            for t in ("full_attention", "sliding_attention")
        }
    },
    "longcat_flash": {"ffn_hidden_size": INTERMEDIATE, "expert_ffn_hidden_size": 32, "zero_expert_num": 2},
}

_ALWAYS = ("head_dim", "num_key_value_heads", "num_experts_per_tok")
_TYPE_FIELDS = ("layer_types", "layers_block_type", "block_types", "hybrid_override_pattern", "layer_block_types")


def _layer_types(config: Any) -> tuple[str, Any] | None:
    """(field name, per-layer types) of the first layer-type field a config has, with one entry per layer."""
    layers = getattr(config, "num_hidden_layers", None)
    for name in _TYPE_FIELDS:
        try:
            value = getattr(config, name, None)
        except Exception:
            continue
        if isinstance(value, (list, tuple, str)) and value and (layers is None or len(value) == layers):
            return name, value
    return None


def _needed_layers(types: Any) -> int:
    first: dict[Any, int] = {}
    for i, t in enumerate(types):
        first.setdefault(str(t), i)
    return max(first.values()) + 1


def _overrides(config: Any, arch: str | None) -> dict[str, Any]:
    """Small values for the size fields ``config`` has, plus the layer count (and types) that cover its layers."""
    fields = config.to_dict()
    # head_dim / num_key_value_heads are set even where the default leaves them None (some models read them as is)
    out: dict[str, Any] = {
        k: v for k, v in SMALL.items() if fields.get(k) is not None or (k in _ALWAYS and k in fields)
    }
    # fields that alias the hidden or intermediate size under another name
    for size_field, small in (("hidden_size", HIDDEN), ("intermediate_size", INTERMEDIATE)):
        size = fields.get(size_field)
        if isinstance(size, int) and not isinstance(size, bool):
            for k, v in fields.items():
                if k not in out and type(v) is int and v == size and "position" not in k and "vocab" not in k:
                    out[k] = small
    for special in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = fields.get(special)
        if isinstance(value, int) and value >= VOCAB:
            out[special] = {"pad_token_id": 0, "bos_token_id": 1}.get(special, 2)
        elif isinstance(value, list):
            out[special] = [x if x < VOCAB else 2 for x in value]
    types = _layer_types(config)
    if arch in HYBRIDS:
        out.update(HYBRIDS[arch])
        out["num_hidden_layers"] = len(HYBRIDS[arch]["layer_types"])
    elif types is not None:
        name, value = types
        keep = min(_needed_layers(value), MAX_LAYERS)
        out["num_hidden_layers"] = keep
        # every stored per-layer field (not a property derived from others) is cut to the kept layers too
        for k, v in fields.items():
            if isinstance(v, (list, tuple, str)) and len(v) == len(value) and k not in out and not isinstance(v, str):
                out[k] = list(v[:keep])
            elif k == name and isinstance(v, str):
                out[k] = v[:keep]
    elif isinstance(fields.get("num_hidden_layers"), int):
        out["num_hidden_layers"] = min(fields["num_hidden_layers"], 2)
    keep_layers = out.get("num_hidden_layers")
    for k, v in fields.items():  # per-layer settings keyed by layer index: keep those of the kept layers
        if isinstance(v, dict) and v and keep_layers and all(str(i).isdigit() for i in v):
            out[k] = {i: _scaled(x, fields, out) for i, x in v.items() if int(i) < keep_layers}
    if "is_decoder" in fields:  # encoder architectures used as causal LMs (bert, roberta, ...) must be causal
        out["is_decoder"] = True
    if "qk_rope_head_dim" in out:  # MLA: head_dim is the rotary part; as in real MLA configs, kv heads = heads
        if "head_dim" in out:
            out["head_dim"] = out["qk_rope_head_dim"]
        if "num_key_value_heads" in out:
            out["num_key_value_heads"] = HEADS
    if isinstance(fields.get("rotary_dim"), int):
        out["rotary_dim"] = min(fields["rotary_dim"], HEAD_DIM // 2)
    out.update(CONSISTENT.get(arch or "", {}))
    for name in ("num_layers", "n_layer", "n_layers", "decoder_layers", "encoder_layers"):
        if isinstance(fields.get(name), int) and name not in out:
            out[name] = min(fields[name], out.get("num_hidden_layers", 2))
    return out


def _scaled(layer: Any, fields: dict[str, Any], out: dict[str, Any]) -> Any:
    """One layer's own settings with its sizes shrunk as the global ones were (head_dim 512 where the global is 256
    and is shrunk to 16 becomes 32)."""
    if not isinstance(layer, dict):
        return layer
    scaled = dict(layer)
    for k, v in layer.items():
        big, small = fields.get(k), out.get(k)
        if type(v) is int and type(big) is int and type(small) is int and big > 0:
            scaled[k] = max(1, v * small // big)
    return scaled


def shrink_config(config: Any, arch: str | None = None, fields: dict[str, Any] | None = None) -> tuple[Any, list[str]]:
    """A tiny config of the same class as ``config``; the notes say what was done.

    ``fields``: the fields ``config`` was built from (a config.json), kept where not shrunk; None for a default
    config of ``arch``.
    """
    cls = type(config)
    overrides = _overrides(config, arch)
    for name in getattr(cls, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            # defaults some sub-config classes refuse to take back as arguments (dbrx's, transformers 5.17) dropped
            kept = {k: v for k, v in sub.to_dict().items() if k not in ("_name_or_path", "output_attentions")}
            overrides[name] = {**kept, **_overrides(sub, None), **overrides.get(name, {})}
    # a default config is rebuilt from the overrides alone (its __init__ derives the rest); a config read from a
    # file keeps its own fields
    base = {k: v for k, v in (fields or {}).items() if k in _constructor_fields(config)}
    small = cls(**{**base, **overrides})
    text = small.get_text_config() if hasattr(small, "get_text_config") else small
    # fields derived inside __init__ from sizes we did not pass (mamba's time_step_rank = ceil(hidden / 16))
    if getattr(text, "time_step_rank", None) is not None and isinstance(text.time_step_rank, int):
        text.time_step_rank = min(text.time_step_rank, math.ceil(getattr(text, "hidden_size", HIDDEN) / 16))
    types = _layer_types(text)
    kinds = sorted({str(t) for t in types[1]}) if types else []
    layers, hidden = getattr(text, "num_hidden_layers", "?"), getattr(text, "hidden_size", "?")
    note = f"config shrunk: {layers} layers, hidden size {hidden}"
    if kinds:
        note += f", layer types {', '.join(kinds)}"
    return small, [note]


def _constructor_fields(config: Any) -> set[str]:
    """Fields worth passing back to the config class: those the default config stores, minus derived ones."""
    import inspect

    names = set()
    for klass in type(config).__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= {p for p in inspect.signature(init).parameters if p not in ("self", "kwargs")}
    return names


def set_long_memory(model: nn.Module, seed: int = 0) -> list[str]:
    """Set decay parameters to long memory where random init forgets within a few tokens; notes say where.

    Gated DeltaNet layers (``A_log`` and ``dt_bias``, class name with DeltaNet): A drawn from [1e-3, 2e-2], as
    :func:`deltapack.tiny.set_long_memory` does. Other recurrent layers keep their init (their defaults already
    remember across a few tokens: mamba's A in 1..16 with a small dt, rwkv's time decay).
    """
    notes = []
    custom = tiny.LONG_MEMORY.get(str(getattr(getattr(model, "config", None), "model_type", "")))
    if custom is not None:
        custom(model)
        return [f"long-memory decay as deltapack.tiny sets it for {model.config.model_type}"]
    if any(hasattr(m, "A_log") and hasattr(m, "dt_bias") and "DeltaNet" in type(m).__name__ for m in model.modules()):
        tiny.set_long_memory(model, seed=seed)
        notes.append("long-memory GDN decay: A drawn from [1e-3, 2e-2] (random init forgets within a few tokens)")
    return notes
