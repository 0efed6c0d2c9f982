"""Shared fixtures: tiny random-init models (cached per configuration) and packed-batch builders."""

from __future__ import annotations

import functools
import logging
import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

from deltapack.tiny import tiny_model

# transformers logs a fallback notice on every CPU run of its GDN reference; keep test output readable
logging.getLogger("transformers").setLevel(logging.ERROR)

ARCHS = ("qwen3_5", "qwen3_5_moe", "qwen3_next")

# CI draws the same examples every run (a red build always means a real failure); locally, set
# HYPOTHESIS_PROFILE=deep for a long randomized search.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", max_examples=40, **_common)
settings.register_profile("ci", max_examples=40, derandomize=True, **_common)
settings.register_profile("deep", max_examples=400, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default"))


# transformers renamed gradient checkpointing to activation checkpointing; CI also runs the oldest supported
# transformers (see .ci/run), so the tests use whichever name the installed version has
def enable_checkpointing(model: nn.Module, **kwargs) -> None:
    """Activation (gradient) checkpointing on, under either transformers name; ``kwargs`` for torch's checkpoint."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing_arg() -> str:
    """The TrainingArguments field that turns checkpointing on, in the installed transformers."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


@functools.lru_cache(maxsize=64)
def cached_model(
    arch: str = "qwen3_5", attn: str = "sdpa", conv_width: int = 4, value_head_ratio: int = 2, seed: int = 0
) -> nn.Module:
    """A tiny fp32 model; each test must leave it as it found it (unpatched, eval mode, no grads)."""
    return tiny_model(
        arch,
        seed=seed,
        attn_implementation=attn,
        linear_conv_kernel_dim=conv_width,
        linear_num_value_heads=2 * value_head_ratio,
    )


@pytest.fixture(autouse=True)
def _fresh_state():
    torch.manual_seed(0)
    yield
