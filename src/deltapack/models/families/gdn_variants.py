"""Gated DeltaNet layers beyond the Qwen3.5 family: olmo_hybrid (separate projections, beta in [0, 2]), lara_mini
and qwen4_exp (the Qwen3.5 layer). One packed forward serves them all: :func:`deltapack.models.gated_deltanet.
packed_gdn_forward`.
"""

from __future__ import annotations

from deltapack.models.gated_deltanet import packed_gdn_forward

GDN_LAYERS = (
    "transformers.models.olmo_hybrid.modeling_olmo_hybrid.OlmoHybridGatedDeltaNet",
    "transformers.models.lara_mini.modeling_lara_mini.LaraMiniGatedDeltaNet",
    "transformers.models.qwen4_exp.modeling_qwen4_exp.Qwen4ExpTextGatedDeltaNet",
)

_IDS = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GDN = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
)
TINY = {
    "olmo_hybrid": dict(
        model_type="olmo_hybrid",
        **_IDS,
        **_GDN,
        intermediate_size=96,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
    ),
    "lara_mini": dict(
        model_type="lara_mini",
        **_IDS,
        **_GDN,
        head_dim=16,
        layer_types=["linear_attention", "sliding_attention", "linear_attention", "full_attention"],
        sliding_window=6,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
    ),
}

__all__ = ["GDN_LAYERS", "TINY", "packed_gdn_forward"]
