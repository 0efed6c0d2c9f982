"""Which transformers architectures deltapack attaches to, and how to find their parts."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Architecture:
    """Names of the transformers classes deltapack patches for one architecture family.

    Attributes:
        name: the family's model_type (also accepted: the ``*_text`` model types of its text configs).
        module: the transformers modeling module that defines the classes.
        gdn: the Gated DeltaNet layer class. text_model: the decoder stack (embeddings, layers, norm).
        entries: the classes ``patch()`` accepts as the model it is given.
    """

    name: str
    module: str
    gdn: str
    text_model: str
    entries: tuple[str, ...]

    def cls(self, name: str) -> type[nn.Module]:
        return getattr(importlib.import_module(self.module), name)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "qwen3_5",
            "transformers.models.qwen3_5.modeling_qwen3_5",
            "Qwen3_5GatedDeltaNet",
            "Qwen3_5TextModel",
            ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration", "Qwen3_5Model", "Qwen3_5TextModel"),
        ),
        Architecture(
            "qwen3_5_moe",
            "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
            "Qwen3_5MoeGatedDeltaNet",
            "Qwen3_5MoeTextModel",
            (
                "Qwen3_5MoeForCausalLM",
                "Qwen3_5MoeForConditionalGeneration",
                "Qwen3_5MoeModel",
                "Qwen3_5MoeTextModel",
            ),
        ),
        Architecture(
            "qwen3_next",
            "transformers.models.qwen3_next.modeling_qwen3_next",
            "Qwen3NextGatedDeltaNet",
            "Qwen3NextModel",
            ("Qwen3NextForCausalLM", "Qwen3NextModel"),
        ),
    )
}

SUPPORTED = tuple(ARCHITECTURES)


def architecture_of(model: nn.Module) -> Architecture:
    """The registered architecture of ``model``; ValueError naming the supported ones otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type) or ARCHITECTURES.get(str(model_type).removesuffix("_text"))
    if arch is None:
        raise ValueError(
            f"deltapack does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported architectures: {', '.join(SUPPORTED)}"
        )
    if type(model).__name__ not in arch.entries:
        raise ValueError(f"deltapack patches {', '.join(arch.entries)} for {arch.name}, not {type(model).__name__}")
    return arch
