"""The transformers model inside a wrapper such as PEFT's ``PeftModel`` (its ``get_base_model()``)."""

from __future__ import annotations

from torch import nn

__all__ = ["base_model"]


def base_model(model: nn.Module) -> nn.Module:
    """The model a PEFT wrapper holds (``get_base_model()``), or ``model`` itself when it is not wrapped."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
