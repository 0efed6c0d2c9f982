"""MiniMax: lightning attention layers (linear attention, fixed decay per head) beside full attention."""

from __future__ import annotations

import torch
from torch import nn

from deltapack.boundaries import Boundaries
from deltapack.models.layers import register_layers
from deltapack.ops.lightning import lightning_attention
from deltapack.tiny import register_tinies, table


def packed_lightning_attention(
    layer: nn.Module, hidden_states: torch.Tensor, bounds: Boundaries
) -> tuple[torch.Tensor, None]:
    """``MiniMaxLightningAttention`` on the packed stream ``hidden_states`` [1, T, D]: (output [1, T, D], None).

    The layer's projections, norm and output gate; the block recurrence becomes :func:`lightning_attention` with
    the layer's ``slope_rate``, whose state starts at zero for every document. (The unpatched layer returns its
    final [B, H, K, V] state second; a packed stream has one per document, and the decoder layer drops it.)
    """
    heads, head_dim = layer.num_attention_heads, layer.head_dim
    qkv_1THE = layer.act_fn(layer.qkv_proj(hidden_states)).reshape(1, -1, heads, 3 * head_dim)
    q_1THK, k_1THK, v_1THK = torch.split(qkv_1THE, head_dim, dim=3)
    o_1THK = lightning_attention(q_1THK, k_1THK, v_1THK, layer.slope_rate.reshape(-1), segments=bounds.segments)
    o_1TD = layer.norm(o_1THK.reshape(1, -1, heads * head_dim))
    o_1TD = torch.sigmoid(layer.output_gate(hidden_states)) * o_1TD
    return layer.out_proj(o_1TD), None


register_layers(
    "lightning_attention",
    ("minimax",),
    {"transformers.models.minimax.modeling_minimax.MiniMaxLightningAttention": packed_lightning_attention},
)

# the decay rates are fixed by the layer index (the last layer's is ~1e-5 per token): long memory without any change
register_tinies(table("minimax"), long_memory=lambda model: None)
