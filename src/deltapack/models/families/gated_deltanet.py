"""The Gated DeltaNet hybrids: qwen3_5, qwen3_5_moe, qwen3_next, olmo_hybrid, lara_mini, qwen4_exp (GDN layers beside
full, sliding-window or indexed sparse attention). One packed forward serves every GDN layer below (olmo_hybrid's
has separate projections and beta in [0, 2]; lara_mini's and qwen4_exp's are the Qwen3.5 layer).

qwen4_exp's hyper-connections are token-wise and its indexed attention selects keys from the attention mask, which
keeps documents apart under packing; its optional per-layer n-gram embeddings (``ple_layer_ids``, empty by default)
hash the tokens before each position and run a dilated conv, across documents: a packed call that reaches one
raises instead of leaking."""

from __future__ import annotations

import torch
from torch import nn

from deltapack.boundaries import Boundaries
from deltapack.models.gated_deltanet import packed_gdn_forward
from deltapack.models.layers import Family, PackedLayer, register_family
from deltapack.tiny import GDN_LAYER, IDS, register_tinies

_GDN = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, **GDN_LAYER)
TINY = {
    "olmo_hybrid": dict(
        model_type="olmo_hybrid",
        **IDS,
        **_GDN,
        intermediate_size=96,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
    ),
    "lara_mini": dict(
        model_type="lara_mini",
        **IDS,
        **_GDN,
        head_dim=16,
        layer_types=["linear_attention", "sliding_attention", "linear_attention", "full_attention"],
        sliding_window=6,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen4_exp": dict(
        model_type="qwen4_exp_text",
        **IDS,
        **_GDN,
        head_dim=16,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],  # 5.24: indexed
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        hc_count=2,
        hc_lowrank=8,
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=16,
        indexer_budget=4,
        indexer_compress_ratio=2,
    ),
}


def refuse_ngram_layer(layer: nn.Module, hidden_states: torch.Tensor, bounds: Boundaries) -> torch.Tensor:
    """qwen4_exp's n-gram (PLE) layer under packing: not supported, so it raises rather than mix documents."""
    raise ValueError(
        f"deltapack: {type(layer).__name__} (qwen4_exp's per-layer n-gram embeddings, ple_layer_ids) reads the tokens "
        "before each position and runs a dilated conv across document boundaries, which deltapack does not cut yet; "
        "expected a qwen4_exp config with ple_layer_ids=[] for packed inputs (unpacked inputs run as before)"
    )


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
            PackedLayer(
                classes=("transformers.models.qwen4_exp.modeling_qwen4_exp.Qwen4ExpTextPLELayer",),
                forward=refuse_ngram_layer,
            ),
        ),
    )
)
register_tinies(TINY)
