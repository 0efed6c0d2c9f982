"""RWKV (RWKV-4): time-mix (token shift + WKV) and channel-mix (token shift) in every block."""

from __future__ import annotations

import torch
from torch import nn

from deltapack.boundaries import Boundaries
from deltapack.models.layers import register_layers
from deltapack.ops.token_shift import token_shift
from deltapack.ops.wkv import wkv
from deltapack.tiny import register_tinies, table


def _mix(x_1TD: torch.Tensor, shifted_1TD: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return x_1TD * ratio + shifted_1TD * (1 - ratio)


def packed_time_mix(layer: nn.Module, hidden_1TD: torch.Tensor, bounds: Boundaries) -> tuple[torch.Tensor, None]:
    """``RwkvSelfAttention`` on the packed stream ``hidden_1TD`` [1, T, D] (no state): (output [1, T, D], None).

    The token shift reads zeros at every document start; the WKV's numerator, denominator and max restart there.
    A is the attention width (``attention_hidden_size``).
    """
    segments = bounds.segments
    shifted_1TD = token_shift(hidden_1TD, segments=segments)
    key_1TA = layer.key(_mix(hidden_1TD, shifted_1TD, layer.time_mix_key))
    value_1TA = layer.value(_mix(hidden_1TD, shifted_1TD, layer.time_mix_value))
    receptance_1TA = torch.sigmoid(layer.receptance(_mix(hidden_1TD, shifted_1TD, layer.time_mix_receptance)))
    wkv_1TA = wkv(layer.time_decay, layer.time_first, key_1TA, value_1TA, segments=segments)
    return layer.output(receptance_1TA * wkv_1TA), None


def packed_channel_mix(layer: nn.Module, hidden_1TD: torch.Tensor, bounds: Boundaries) -> tuple[torch.Tensor, None]:
    """``RwkvFeedForward`` on the packed stream ``hidden_1TD`` [1, T, D] (no state): (output [1, T, D], None);
    I is the intermediate width."""
    shifted_1TD = token_shift(hidden_1TD, segments=bounds.segments)
    key_1TI = torch.square(torch.relu(layer.key(_mix(hidden_1TD, shifted_1TD, layer.time_mix_key))))
    receptance_1TD = torch.sigmoid(layer.receptance(_mix(hidden_1TD, shifted_1TD, layer.time_mix_receptance)))
    return receptance_1TD * layer.value(key_1TI), None


def _long_memory(model: nn.Module) -> None:
    """WKV decay per token e^{-w}, w = exp(time_decay) in [e^-6, e^-3]: long memory in every channel."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "time_decay") and hasattr(module, "time_first"):
                module.time_decay.copy_(torch.empty(module.time_decay.shape).uniform_(-6, -3, generator=gen))


_MODELING = "transformers.models.rwkv.modeling_rwkv"
register_layers(
    "rwkv4",
    ("rwkv",),
    {f"{_MODELING}.RwkvSelfAttention": packed_time_mix, f"{_MODELING}.RwkvFeedForward": packed_channel_mix},
    pads_exactly=False,  # its recurrence reads left padding (it ignores attention_mask)
)

register_tinies(table("rwkv"), long_memory=_long_memory)
