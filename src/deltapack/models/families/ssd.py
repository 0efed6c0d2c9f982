"""The Mamba2 (SSD) models: mamba2, nemotron_h, bamba, falcon_h1, granitemoehybrid, zamba2.

Every Mamba2 mixer of these models runs :func:`deltapack.models.mamba.packed_ssd_mixer`; Falcon-H1's differs by
its muP multipliers and an optional gated norm (its :class:`SSDStyle`). Their attention layers are kept apart by the
framework's attention handling.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from deltapack.models.layers import register_layers
from deltapack.models.mamba import SSDStyle, packed_ssd_mixer
from deltapack.tiny import register_tinies, table

_MIXERS = (
    "transformers.models.mamba2.modeling_mamba2.Mamba2Mixer",
    "transformers.models.nemotron_h.modeling_nemotron_h.NemotronHMamba2Mixer",
    "transformers.models.bamba.modeling_bamba.BambaMixer",
    "transformers.models.granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridMambaLayer",
    "transformers.models.zamba2.modeling_zamba2.Zamba2MambaMixer",
)
FALCON_H1 = SSDStyle(
    in_multiplier="ssm_in_multiplier", projection_multiplier="mup_vector", norm_switch="mamba_rms_norm"
)

SSD = register_layers(
    "ssd",
    ("mamba2", "nemotron_h", "bamba", "falcon_h1", "granitemoehybrid", "zamba2"),
    {
        _MIXERS: packed_ssd_mixer,
        "transformers.models.falcon_h1.modeling_falcon_h1.FalconH1Mixer": functools.partial(
            packed_ssd_mixer, style=FALCON_H1
        ),
    },
)


def ssd_long_memory(model: nn.Module, low: float = 1e-3, high: float = 2e-2, seed: int = 0) -> nn.Module:
    """Draw every SSD head's decay rate A from [low, high] (with dt near 1: a state that lasts ~100 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "A_log") and hasattr(module, "dt_bias"):
                module.A_log.copy_(torch.empty(module.A_log.shape).uniform_(low, high, generator=gen).log())
                module.dt_bias.fill_(0.5)
    return model


register_tinies(table("ssd"), long_memory=ssd_long_memory)
