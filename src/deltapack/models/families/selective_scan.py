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
from deltapack.tiny import SMALL, register_tinies

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


_MAMBA1 = dict(num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4, time_step_rank=8)
# the hybrids: 4 layers, attention (4 heads) every attn_layer_period layers from the second, Mamba1 of state 8 elsewhere
_HYBRID = dict(
    num_hidden_layers=4,
    attn_layer_offset=1,
    intermediate_size=128,
    num_attention_heads=4,
    mamba_d_state=8,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_dt_rank=8,
    max_position_embeddings=256,
)
_TINY = {
    "mamba": _MAMBA1,
    "falcon_mamba": _MAMBA1,
    "jamba": dict(
        **_HYBRID,
        attn_layer_period=4,
        num_key_value_heads=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    # hand-made: the audit's generic shrink cannot build zamba (its attention width is 2 * hidden, heads tied to it)
    "zamba": dict(
        **_HYBRID,
        attn_layer_period=2,
        num_key_value_heads=4,
        n_mamba_heads=2,
        attention_hidden_size=128,
        attention_head_dim=32,
    ),
}
register_tinies(_TINY, long_memory=scan_long_memory, **SMALL, tie_word_embeddings=False)
