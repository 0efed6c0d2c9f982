"""Residual short convs of the inkling family (inkling_text, inkling2_text, inkling2_loop_text).

Every decoder layer runs depthwise causal convs (no activation, no gates) in fp32 around its attention and MLP:
keys and values after their projections, the attention output and the MLP output. Each is residual:
``y = (x + conv(x)) * scale``, computed in fp32 and cast back, with ``scale`` 1 for inkling and
``1 / sqrt(width + 1)`` for inkling2. Under packing a conv must not read the last tokens of the previous document;
the packed forward runs the layer's conv cut at every document start.

inkling2's full-attention layers convolve keys and values with per-token taps (``Inkling2DynamicShortConvolution``,
taps projected from the layer input): transformers' own forward of that conv already keeps documents apart when
given ``seq_idx``, so the key / value projection around it runs its own forward, told the documents.

The attention is kept per document by the attention hooks; its relative position bias depends on distances only.
Its full-attention layers scale queries and bias by ``tau(position)`` (``log_scaling_n_floor``): inkling2 reads the
per-document ``position_ids``, inkling counts along the row, so inkling's attention has a packed forward that
reads each token's position in its document. On a GPU a layer with a position bias runs flex or the dense mask.

transformers also maps ``inkling`` / ``inkling2`` / ``inkling2_loop`` (the multimodal wrappers) to
``*ForConditionalGeneration`` only, not to a causal LM: their text decoders are these layers.

Legend: T = real tokens of the batch (one packed stream), C = channels of the conv.
"""

from __future__ import annotations

import functools
import math
import sys

import torch
from torch import nn

from deltapack.boundaries import Boundaries
from deltapack.models.layers import check_packed_stream, packed_conv, register_layers
from deltapack.tiny import register_tinies, table


def packed_residual_conv_forward(
    layer: nn.Module, hidden_states: torch.Tensor, bounds: Boundaries, scaled: bool = False
) -> torch.Tensor:
    """One residual short conv over a packed stream: ``(x + conv(x)) * scale`` in fp32, cast back to x's dtype.

    Args:
        layer: a transformers ``InklingShortConvolution`` / ``Inkling2ShortConvolution`` (its ``conv1d``: weight
            [C, 1, W], no bias).
        hidden_states: [1, T, C] the unpadded stream ``bounds`` describes.
        bounds: the batch's boundaries.
        scaled: divide by ``sqrt(W + 1)`` (inkling2).

    Returns:
        [1, T, C] in the dtype of ``hidden_states``, each document's rows what the layer gives it alone.
    """
    check_packed_stream(layer, hidden_states, bounds)
    x_1TC = hidden_states.float()
    # the conv runs in its weight's dtype (fp32 unless the model was cast), as transformers' causal_conv1d_fn does
    conv_1TC = packed_conv(layer.conv1d, x_1TC.to(layer.conv1d.weight.dtype), None, bounds).float()
    y_1TC = x_1TC + conv_1TC
    if scaled:
        y_1TC = y_1TC / math.sqrt(layer.conv_kernel_size + 1)
    return y_1TC.to(hidden_states.dtype)


def packed_key_value_forward(layer: nn.Module, hidden_states: torch.Tensor, bounds: Boundaries) -> torch.Tensor:
    """inkling2's key / value projection (``Inkling2KeyValueProjection``) over a packed stream: its own forward,
    given the documents as ``seq_idx`` (its dynamic conv masks the taps that reach into another document; its
    static conv is a registered layer and runs :func:`packed_residual_conv_forward`).

    Args:
        hidden_states: [1, T, D] the unpadded stream. Returns: [1, heads, T, head_dim].
    """
    check_packed_stream(layer, hidden_states, bounds)
    return type(layer).forward(layer, hidden_states, seq_idx=bounds.seq_idx)


def packed_attention_forward(
    layer: nn.Module, hidden_states: torch.Tensor, bounds: Boundaries
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """inkling's attention (``InklingAttention``) over a packed stream.

    The layer's own forward with the attention mask of its layer type (built inside the packing scope, so it keeps
    documents apart and counts a window from each document's start). Full-attention layers with log-scaled queries
    (``log_scaling_n_floor``) are re-expressed: transformers scales queries and the relative bias by
    ``tau(row index)``, where a document alone has ``tau(position in the document)``.

    Args:
        hidden_states: [1, T, D] the unpadded stream. Returns: ([1, T, D], attention weights or None).
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    check_packed_stream(layer, hidden_states, bounds)
    config = layer.config
    build = create_sliding_window_causal_mask if layer.is_sliding else create_causal_mask
    mask = build(config, hidden_states, None, None, bounds.position_ids)
    if layer.is_sliding or config.log_scaling_n_floor is None:
        return type(layer).forward(layer, hidden_states, attention_mask=mask)
    heads_1THK = (1, bounds.total_tokens, -1, layer.head_dim)
    q_1HTK = layer.q_norm(layer.q_proj(hidden_states).view(heads_1THK)).transpose(1, 2)
    k_1HTK = layer.k_norm(layer.k_sconv(layer.k_proj(hidden_states)).view(heads_1THK)).transpose(1, 2)
    v_1HTK = layer.v_sconv(layer.v_proj(hidden_states)).view(heads_1THK).transpose(1, 2)
    rel_1THR = layer.r_proj(hidden_states).view(1, bounds.total_tokens, layer.num_heads, -1)
    rows_T = torch.arange(bounds.total_tokens, device=hidden_states.device)
    bias_1HTT = layer.rel_logits_proj(rel_1THR, rows_T, rows_T)  # distances: equal within a document
    pos_T = bounds.position_ids.reshape(-1).to(hidden_states.device)
    tau_T = 1.0 + config.log_scaling_alpha * torch.log(((pos_T + 1).float() / config.log_scaling_n_floor).clamp(min=1))
    tau_11T1 = tau_T.view(1, 1, -1, 1)
    q_1HTK = (q_1HTK.float() * tau_11T1).to(q_1HTK.dtype)
    bias_1HTT = (bias_1HTT.float() * tau_11T1).to(bias_1HTT.dtype)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(layer).__module__].eager_attention_forward
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)
    dropout = layer.attention_dropout if layer.training else 0.0
    out_1THK, weights = attention(
        layer, q_1HTK, k_1HTK, v_1HTK, mask, dropout=dropout, scaling=layer.scaling, position_bias=bias_1HTT
    )
    return layer.o_proj(out_1THK.reshape(1, bounds.total_tokens, -1).contiguous()), weights


_MODULES = ("inkling.modeling_inkling.Inkling", "inkling2.modeling_inkling2.Inkling2")
_MODULES += ("inkling2_loop.modeling_inkling2_loop.Inkling2Loop",)
CONVS = tuple(f"transformers.models.{m}ShortConvolution" for m in _MODULES)
ATTENTION = "transformers.models.inkling.modeling_inkling.InklingAttention"
KEY_VALUE_PROJECTIONS = tuple(f"transformers.models.{m}KeyValueProjection" for m in _MODULES[1:])

TINY = table("inkling")  # in deltapack/tiny.toml

INKLING_FAMILY = register_layers(
    "inkling_short_conv",
    tuple(TINY),
    {
        CONVS[0]: packed_residual_conv_forward,
        CONVS[1:]: functools.partial(packed_residual_conv_forward, scaled=True),
        KEY_VALUE_PROJECTIONS: packed_key_value_forward,
        ATTENTION: packed_attention_forward,
    },
    cache_kwargs=("cache", "past_key_values"),
    pads_exactly=False,  # log-scaled queries read arange positions: transformers shifts left-padded rows
)
register_tinies(TINY)
