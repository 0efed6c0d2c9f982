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
from deltapack.tiny import register_tinies, table

TINY = table("gated_deltanet")


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
