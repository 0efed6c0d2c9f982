"""Tiny random-init configs of the supported architectures, for the audit, the tests and the CPU demo.

The configs are data, in ``tiny.toml`` beside this module (one table per arch, shared field groups named once); each
family module registers its own with :func:`register_tinies` and :func:`table`, and how to give its model long memory.

The GDN decay is set to long memory (as in trained models): random init draws A in [0.01, 16], which forgets within
a few tokens and so hides a recurrent-state leak; here A is small, so state carried across a boundary shows.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import resources
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TABLE = "tiny.toml"  # the configs, one table per arch (see the file's header)


def _table() -> dict[str, Any]:
    return tomllib.loads(resources.files("deltapack").joinpath(TABLE).read_text())


def _fields(entry: dict[str, Any], groups: dict[str, Any]) -> dict[str, Any]:
    """An entry of the table with the groups it names (``with``) merged first, in order."""
    merged: dict[str, Any] = {}
    for group in entry.get("with", ()):
        merged.update(_fields(groups[group], groups))
    merged.update((key, value) for key, value in entry.items() if key != "with")
    return merged


def table(family: str) -> dict[str, dict[str, Any]]:
    """The tiny configs ``family`` registers, from :data:`TABLE`: {arch: fields}, ``model_type`` included."""
    data = _table()
    return {arch: {"model_type": arch, **_fields(entry, data["groups"])} for arch, entry in data[family].items()}


TINY: dict[str, dict[str, Any]] = table("qwen3")


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
