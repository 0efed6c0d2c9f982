"""The Mamba1 (selective scan) models: mamba, falcon_mamba, jamba, zamba.

Mamba, FalconMamba and Jamba mixers run :func:`deltapack.models.mamba.packed_scan_mixer` (FalconMamba and Jamba
normalise dt, B and C: their :class:`ScanStyle`); Zamba's multi-head mixer runs its own short forward on the same
scan op. Jamba's and Zamba's attention layers are kept apart by the framework's attention handling.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from deltapack.models.layers import register_layers
from deltapack.models.mamba import ScanStyle, packed_scan_mixer, packed_zamba_mixer
from deltapack.tiny import register_tinies, table

NORMED = ScanStyle(norms=("dt_layernorm", "b_layernorm", "c_layernorm"))

SELECTIVE_SCAN = register_layers(
    "selective_scan",
    ("mamba", "falcon_mamba", "jamba", "zamba"),
    {
        "transformers.models.mamba.modeling_mamba.MambaMixer": packed_scan_mixer,
        (
            "transformers.models.falcon_mamba.modeling_falcon_mamba.FalconMambaMixer",
            "transformers.models.jamba.modeling_jamba.JambaMambaMixer",
        ): functools.partial(packed_scan_mixer, style=NORMED),
        "transformers.models.zamba.modeling_zamba.ZambaMambaMixer": packed_zamba_mixer,
    },
)


def scan_long_memory(model: nn.Module, low: float = 1e-3, high: float = 2e-2, seed: int = 0) -> nn.Module:
    """Draw every Mamba1 channel's decay rates A[d, n] from [low, high] (init's 1..16 forgets within a few tokens)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "A_log") and not hasattr(module, "dt_bias"):
                module.A_log.copy_(torch.empty(module.A_log.shape).uniform_(low, high, generator=gen).log())
    return model


register_tinies(table("selective_scan"), long_memory=scan_long_memory)
