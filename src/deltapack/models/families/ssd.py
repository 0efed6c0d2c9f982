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
from deltapack.tiny import SMALL, register_tinies

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


# 64 wide, 8 heads of 16, 2 groups, state 16; chunks of 8 tokens so one document alone crosses chunk borders
_MAMBA = dict(
    mamba_n_heads=8,
    mamba_d_head=16,
    mamba_n_groups=2,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_chunk_size=8,
)
_ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# the same mixer in the configs that name its fields without the mamba_ prefix (mamba2, nemotron_h)
_MIXER = dict(n_groups=2, conv_kernel=4, expand=2, chunk_size=8)

_TINY = {
    "mamba2": dict(num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16, **_MIXER),
    "nemotron_h": dict(
        layers_block_type=["mamba", "attention", "mamba", "moe"],
        mamba_num_heads=8,
        mamba_head_dim=16,
        ssm_state_size=16,
        **_MIXER,
        intermediate_size=128,
        head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32,
        n_group=1,
        topk_group=1,
        **_ATTENTION,
    ),
    "bamba": dict(num_hidden_layers=3, attn_layer_indices=[1], intermediate_size=128, **_MAMBA, **_ATTENTION),
    "falcon_h1": dict(
        num_hidden_layers=2,
        intermediate_size=128,
        mamba_d_ssm=128,
        mamba_rms_norm=True,
        mamba_norm_before_gate=False,
        ssm_multipliers=[1.5, 0.5, 2.0, 0.7, 1.2],
        ssm_in_multiplier=1.3,
        ssm_out_multiplier=0.8,
        **_MAMBA,
        **_ATTENTION,
    ),
    "granitemoehybrid": dict(
        num_hidden_layers=3,
        layer_types=["mamba", "attention", "mamba"],
        intermediate_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=64,
        **_MAMBA,
        **_ATTENTION,
    ),
    "zamba2": dict(
        num_hidden_layers=4,
        layers_block_type=["mamba", "hybrid", "mamba", "mamba"],
        n_mamba_heads=8,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_ngroups=2,
        chunk_size=8,
        intermediate_size=128,
        num_mem_blocks=1,
        **_ATTENTION,
    ),
}
register_tinies(_TINY, long_memory=ssd_long_memory, **SMALL, tie_word_embeddings=False)
