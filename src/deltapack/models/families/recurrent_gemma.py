"""RecurrentGemma (Griffin): recurrent blocks (depthwise conv + RG-LRU) beside local attention."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.recurrent_gemma.modeling_recurrent_gemma import SqrtBoundDerivative

from deltapack.boundaries import Boundaries
from deltapack.models.layers import Family, PackedLayer, register_family
from deltapack.ops import causal_conv1d
from deltapack.ops.rg_lru import rg_lru_scan
from deltapack.ops.varlen import starts
from deltapack.tiny import register_tinies, table


def _gate(x_1TD: torch.Tensor, weight_HWW: torch.Tensor, bias_HW: torch.Tensor) -> torch.Tensor:
    """sigmoid of the RG-LRU's block-diagonal gate projection, as the layer computes it (one baddbmm per head)."""
    heads, width = bias_HW.shape
    x_HTW = x_1TD.reshape(-1, heads, width).transpose(0, 1)
    return torch.sigmoid(torch.baddbmm(bias_HW[:, None, :], x_HTW, weight_HWW).transpose(0, 1).reshape(x_1TD.shape))


def packed_recurrent_block(
    block: nn.Module,
    hidden_states: torch.Tensor,
    bounds: Boundaries,
    *args: Any,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``RecurrentGemmaRecurrentBlock`` on the packed stream ``hidden_states`` [1, T, D]: (output [1, T, D], None).

    The conv never reads across a document start; the RG-LRU state starts at zero in every document, and its input
    multiplier is 1 instead of sqrt(1 - a^2) where the layer resets: at position 0 (``position_ids`` [1, T] of the
    stream; without them, at every document start). A document numbered from 1 (``position_ids_start=1``) is not
    reset alone either. The block's other call arguments (mask, cache position, use_cache) are not read; its
    decoding caches are cleared, as in its ``use_cache=False`` path.
    """
    segments, rg_lru = bounds.segments, block.rg_lru
    block.conv1d_state = rg_lru.recurrent_states = None
    y_1TL = block.act_fn(block.linear_y(hidden_states))
    x_1TL = block.linear_x(hidden_states)
    x_1TL = causal_conv1d(x_1TL, block.conv_1d.weight[:, 0], block.conv_1d.bias, segments=segments)
    input_gate = _gate(x_1TL, rg_lru.input_gate_weight, rg_lru.input_gate_bias)
    recurrent_gate = _gate(x_1TL, rg_lru.recurrent_gate_weight, rg_lru.recurrent_gate_bias)
    log_a_1TL = -8.0 * recurrent_gate * F.softplus(rg_lru.recurrent_param)
    multiplier = SqrtBoundDerivative.apply(1 - torch.exp(2 * log_a_1TL))
    reset_T = starts(segments) if position_ids is None else position_ids.reshape(-1) == 0
    reset_1T1 = reset_T[None, :, None]
    multiplier = reset_1T1 + ~reset_1T1 * multiplier
    x_1TL = (x_1TL * input_gate) * multiplier.type(x_1TL.dtype)
    h_1TL = rg_lru_scan(x_1TL, log_a_1TL, segments=segments)
    return block.linear_out(h_1TL * y_1TL), None


def _long_memory(model: nn.Module) -> None:
    """RG-LRU decay a = exp(-8 r softplus(p)) close to 1: softplus(p) in [1e-3, 1e-2]."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "recurrent_param"):
                sp = torch.empty(module.recurrent_param.shape).uniform_(1e-3, 1e-2, generator=gen)
                module.recurrent_param.copy_(torch.log(torch.expm1(sp)))


_MODELING = "transformers.models.recurrent_gemma.modeling_recurrent_gemma"
register_family(
    Family(
        name="rg_lru",
        model_types=("recurrent_gemma",),
        # call_args: the block's position_ids decide where its RG-LRU resets
        layers=(PackedLayer((f"{_MODELING}.RecurrentGemmaRecurrentBlock",), packed_recurrent_block, call_args=True),),
        pads_exactly=False,  # its recurrence reads left padding (it ignores attention_mask)
    )
)

register_tinies(table("recurrent_gemma"), long_memory=_long_memory)
