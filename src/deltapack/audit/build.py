"""Building the model an audit runs on: an embedded tiny config, a local config.json, or any causal LM
``model_type`` registered in the installed transformers, shrunk to a tiny random-init instance."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltapack import tiny

__all__ = ["Built", "build_model", "causal_lm_types"]


@dataclass
class Built:
    """A model ready to audit (fp32, CPU, eval mode) and what was done to build it."""

    model: nn.Module
    arch: str
    notes: list[str] = field(default_factory=list)


def causal_lm_types() -> list[str]:
    """Every model_type with a causal-LM class in the installed transformers, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def build_model(
    arch: str | None = None,
    config_path: str | None = None,
    seed: int = 0,
    shrink: bool | None = None,
    attn_implementation: str = "sdpa",
) -> Built:
    """The model to audit.

    - ``config_path``: a local config.json (or a folder holding one), built as it is (``shrink=True`` shrinks it);
    - ``arch`` with an embedded tiny config (qwen3_5, qwen3_5_moe, qwen3_next): that config;
    - any other causal-LM ``arch``: its default config, shrunk (see :mod:`deltapack.audit.shrink`).

    Random init; decay / forget parameters set to long memory where random init forgets within a few tokens
    (the notes say so). Raises on failure (the CLI reports it with exit status 2).
    """
    from transformers import AutoConfig

    from deltapack.audit import shrink as shrinking

    notes: list[str] = []
    if config_path is not None:
        path = Path(config_path)
        if path.is_dir():
            path = path / "config.json"
        fields = json.loads(path.read_text())
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"{path.name} has no model_type; expected a transformers config.json")
        config = AutoConfig.for_model(model_type, **fields)
        arch = arch or model_type
        if shrink:
            config, more = shrinking.shrink_config(config, model_type, {**fields, "model_type": model_type})
            notes += more
        else:
            notes.append("built from the given config at full size (random init)")
    elif arch in tiny.available() and not shrink:
        config = tiny.tiny_config(arch)
        notes.append(f"embedded tiny {arch} config (random init)")
    else:
        if arch is None:
            raise ValueError("give --arch NAME or --config PATH")
        known = causal_lm_types()
        if arch not in known:
            raise ValueError(f"{arch!r} is not a causal-LM model_type of the installed transformers")
        config, more = shrinking.shrink_config(AutoConfig.for_model(arch), arch)
        notes += more
    if any("shrunk" in n for n in notes):
        _check_size(config, attn_implementation)
    model = _instantiate(config, seed, attn_implementation)
    notes += shrinking.set_long_memory(model, seed)
    if arch in FLOAT64_TYPES:
        notes.append(f"built in float64: {FLOAT64_TYPES[arch]}")
        return Built(model.double().eval(), arch, notes)
    return Built(model.float().eval(), arch, notes)


_GEMMA4_ROUNDING = (
    "its hidden states grow to ~15 in the tiny config, where fp32 rounding alone (a document's rows in a product of "
    "another row count) gives 2e-5 to 4e-5, above the 1e-5 bound; in float64 packed and alone are bit-identical"
)
# model types whose fp32 rounding at their activation scale exceeds the audit's bound with no leak at all (checked:
# 0 difference in float64 with restarting position_ids); audited in float64, a stricter test of the same contract
FLOAT64_TYPES: dict[str, str] = {
    "gemma4": _GEMMA4_ROUNDING,
    "gemma4_text": _GEMMA4_ROUNDING,
    "gemma4_unified": _GEMMA4_ROUNDING,
    "gemma4_unified_text": _GEMMA4_ROUNDING,
}


MAX_SHRUNK_PARAMETERS = 50_000_000


def _check_size(config: Any, attn_implementation: str) -> None:
    """Refuse a shrunk config that is still large (some size field the generic shrink does not know), counting
    parameters on the meta device so that nothing is allocated."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    except Exception:
        return  # building for real will tell
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_SHRUNK_PARAMETERS:
        raise ValueError(f"the shrunk config still has {count / 1e6:.0f}M parameters (a size field the shrink misses)")


def _instantiate(config: Any, seed: int, attn_implementation: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    except (ValueError, ImportError) as exc:
        if "attn_implementation" not in str(exc) and "sdpa" not in str(exc).lower():
            raise
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager")
