"""Gated short-conv layers (lfm2, lfm2_moe, lfm3): y = out_proj(C * conv(B * x)), [B | C | x] = in_proj(h).

The conv is depthwise and causal with the model's width (``conv_L_cache``: 3 for LFM2, 7 for LFM3), no activation;
under packing it must not read the last tokens of the previous document. The packed forward runs the layer's own
projections and the varlen conv cut at every document start.

Legend: T = real tokens of the batch (one packed stream), D = hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

from deltapack.boundaries import Boundaries
from deltapack.models.layers import check_packed_stream, packed_conv, register_layers
from deltapack.tiny import register_tinies, table


def packed_short_conv_forward(layer: nn.Module, hidden_states: torch.Tensor, bounds: Boundaries) -> torch.Tensor:
    """One gated short-conv layer over a packed stream.

    Args:
        layer: a transformers ``Lfm2ShortConv`` / ``Lfm2MoeShortConv`` / ``Lfm3ShortConv``.
        hidden_states: [1, T, D] the unpadded stream ``bounds`` describes.
        bounds: the batch's boundaries.

    Returns:
        [1, T, D], each document's rows equal to what the layer gives for that document alone.
    """
    check_packed_stream(layer, hidden_states, bounds)
    b_1TD, c_1TD, x_1TD = layer.in_proj(hidden_states).chunk(3, dim=-1)
    y_1TD = packed_conv(layer.conv, b_1TD * x_1TD, None, bounds)
    return layer.out_proj(c_1TD * y_1TD)


SHORT_CONV_LAYERS = (
    "transformers.models.lfm2.modeling_lfm2.Lfm2ShortConv",
    "transformers.models.lfm2_moe.modeling_lfm2_moe.Lfm2MoeShortConv",
    "transformers.models.lfm3.modeling_lfm3.Lfm3ShortConv",
)

TINY = table("short_conv")

# the inkling types' short convs are another layer (a residual conv without the B / C gates): families/inkling.py
SHORT_CONV_FAMILY = register_layers(
    "short_conv",
    tuple(TINY),
    {SHORT_CONV_LAYERS: packed_short_conv_forward},
    cache_kwargs=("cache", "past_key_values"),
)
register_tinies(TINY)
