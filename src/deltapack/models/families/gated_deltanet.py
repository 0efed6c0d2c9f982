"""The Gated DeltaNet hybrids: qwen3_5, qwen3_5_moe, qwen3_next, olmo_hybrid, lara_mini (GDN layers beside full or
sliding-window attention). One packed forward serves every layer below (olmo_hybrid's has separate projections and
beta in [0, 2]; lara_mini's and qwen4_exp's are the Qwen3.5 layer).

qwen4_exp's layer is registered, its model type is not: the rest of that model (hyper-connections, an indexed
sparse attention, hashed n-gram embeddings over the previous tokens) needs packing work of its own."""

from __future__ import annotations

from deltapack.models.gated_deltanet import packed_gdn_forward
from deltapack.models.layers import Family, PackedLayer, register_family
from deltapack.tiny import register_tiny

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

GATED_DELTANET = register_family(
    Family(
        name="gated_deltanet",
        model_types=("qwen3_5", "qwen3_5_moe", "qwen3_next", *TINY),
        layers=(
            PackedLayer(
                classes=(
                    "transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5GatedDeltaNet",
                    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeGatedDeltaNet",
                    "transformers.models.qwen3_next.modeling_qwen3_next.Qwen3NextGatedDeltaNet",
                    "transformers.models.olmo_hybrid.modeling_olmo_hybrid.OlmoHybridGatedDeltaNet",
                    "transformers.models.lara_mini.modeling_lara_mini.LaraMiniGatedDeltaNet",
                    "transformers.models.qwen4_exp.modeling_qwen4_exp.Qwen4ExpTextGatedDeltaNet",
                ),
                forward=packed_gdn_forward,
                cache_kwargs=("cache_params", "cache"),
            ),
        ),
    )
)
for _arch, _fields in TINY.items():
    register_tiny(_arch, _fields)
