"""The Gated DeltaNet hybrids: qwen3_5, qwen3_5_moe, qwen3_next (GDN layers beside full attention)."""

from __future__ import annotations

from deltapack.models.gated_deltanet import packed_gdn_forward
from deltapack.models.layers import Family, PackedLayer, register_family

GATED_DELTANET = register_family(
    Family(
        name="gated_deltanet",
        model_types=("qwen3_5", "qwen3_5_moe", "qwen3_next"),
        layers=(
            PackedLayer(
                classes=(
                    "transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5GatedDeltaNet",
                    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeGatedDeltaNet",
                    "transformers.models.qwen3_next.modeling_qwen3_next.Qwen3NextGatedDeltaNet",
                ),
                forward=packed_gdn_forward,
                cache_kwargs=("cache_params", "cache"),
            ),
        ),
    )
)
