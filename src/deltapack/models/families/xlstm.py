"""xLSTM (xLSTM-7B style): mLSTM layers with matrix memory, normaliser and max-stabiliser state."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.xlstm.modeling_xlstm import soft_cap

from deltapack.boundaries import Boundaries
from deltapack.models.layers import register_layers
from deltapack.ops.mlstm import mlstm
from deltapack.tiny import register_tinies, table


def packed_mlstm_layer(layer: nn.Module, x: torch.Tensor, bounds: Boundaries) -> tuple[torch.Tensor, None]:
    """``xLSTMLayer`` on the packed stream ``x`` [1, T, D] (no state): (output [1, T, D], None).

    The layer's projections, gate soft-caps, multi-head norm and output gate; the mLSTM becomes :func:`mlstm`,
    whose (C, n, m) restart at zero for every document.
    """
    config, heads = layer.config, layer.config.num_heads
    if x.shape[1] != bounds.total_tokens:  # xLSTMModel's chunked inference feeds the stream in pieces
        raise ValueError(
            f"deltapack: the xLSTM layer got {x.shape[1]} of the packed stream's {bounds.total_tokens} tokens (the "
            f"model's chunked inference, max_inference_chunksize={config.max_inference_chunksize}, splits it); "
            "expected the whole stream: set config.max_inference_chunksize to at least the packed tokens, or train mode"
        )
    if config.weight_mode == "single":
        q, k, v, o_preact = layer.q(x), layer.k(x), layer.v(x), layer.ogate_preact(x)
        i_preact = soft_cap(layer.igate_preact(x), cap_value=config.gate_soft_cap)
        f_preact = soft_cap(layer.fgate_preact(x), cap_value=config.gate_soft_cap)
    else:
        splits = (layer.qk_dim, 2 * layer.qk_dim, 2 * layer.qk_dim + layer.v_dim)
        q, k, v, o_preact = torch.tensor_split(layer.qkv_opreact(x), splits, dim=-1)
        if_preact = soft_cap(layer.ifgate_preact(x), cap_value=config.gate_soft_cap)
        i_preact, f_preact = torch.tensor_split(if_preact, (heads,), dim=-1)
    q_1THK, k_1THK, v_1THV = (t.reshape(1, t.shape[1], heads, -1) for t in (q, k, v))
    h_1THV = mlstm(
        q_1THK,
        k_1THK,
        v_1THV,
        i_preact,
        f_preact,
        segments=bounds.segments,
        eps=config.eps,
        chunk_size=config.chunk_size,
    )
    h_1TV = layer.multihead_norm(h_1THV).reshape(1, h_1THV.shape[1], -1)
    return layer.out_proj(layer.ogate_act_fn(o_preact) * h_1TV), None


def _long_memory(model: nn.Module) -> None:
    """Forget gates close to 1 (pre-activation bias in [3, 6]): long memory in every head."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(getattr(module, "fgate_preact", None), "bias", None)
            if bias is not None:
                bias.copy_(torch.empty(bias.shape).uniform_(3, 6, generator=gen))


register_layers(
    "mlstm",
    ("xlstm",),
    {"transformers.models.xlstm.modeling_xlstm.xLSTMLayer": packed_mlstm_layer},
    pads_exactly=False,  # its recurrence reads left padding (it ignores attention_mask)
)

register_tinies(table("xlstm"), long_memory=_long_memory)
