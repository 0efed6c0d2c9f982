"""Kimi delta attention layers (kimi_linear, bailing_hybrid; glm5_next's text layer has the same shape).

The packed forward computes what the transformers layer computes (q/k/v projections, one depthwise conv over
[q | k | v] with silu, the per-channel forget gate, beta, KDA, the sigmoid-gated RMSNorm, the output projection) on
the unpadded stream, with the conv cut and the state restarted at every document start. The layer's own
projection, gate and norm modules run as they are; only the conv and the recurrence read the boundaries.

Legend: T = real tokens of the batch (one packed stream), H = KDA heads, K = head dim, D = hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

from deltapack.boundaries import Boundaries
from deltapack.models.layers import check_packed_stream, packed_conv, register_layers
from deltapack.ops.kda import kda
from deltapack.tiny import register_tinies, table


def packed_kda_forward(layer: nn.Module, hidden_states: torch.Tensor, bounds: Boundaries) -> torch.Tensor:
    """One KDA layer over a packed stream.

    Args:
        layer: a transformers ``KimiLinearDeltaAttention``, ``BailingHybridDeltaAttention`` or
            ``Glm5NextTextLinearAttention``.
        hidden_states: [1, T, D] the unpadded stream ``bounds`` describes.
        bounds: the batch's boundaries.

    Returns:
        [1, T, D], each document's rows equal to what the layer gives for that document alone.
    """
    x_1TD = hidden_states
    check_packed_stream(layer, x_1TD, bounds)
    tokens = x_1TD.shape[1]
    heads_1THK = (1, tokens, -1, layer.head_dim)
    qkv_1TC = torch.cat([layer.q_proj(x_1TD), layer.k_proj(x_1TD), layer.v_proj(x_1TD)], dim=-1)
    qkv_1TC = packed_conv(layer.conv1d, qkv_1TC, layer.activation, bounds)
    q_1THK, k_1THK, v_1THK = (t.reshape(heads_1THK) for t in torch.split(qkv_1TC, [layer.qkv_dim] * 3, dim=-1))
    g_1THK = layer.forget_gate(x_1TD)  # per-channel log decay, as the layer forms it (fp32 or its own dtype)
    beta_1TH = torch.sigmoid(layer.b_proj(x_1TD))
    o_1THK, _ = kda(q_1THK, k_1THK, v_1THK, g_1THK, beta_1TH, segments=bounds.segments, use_qk_l2norm=True)
    # the output gate: one projection (bailing_hybrid) or a low-rank pair (kimi_linear, glm5_next)
    gate = layer.g_proj(x_1TD) if hasattr(layer, "g_proj") else layer.g_b_proj(layer.g_a_proj(x_1TD))
    out_1THK = layer.o_norm(o_1THK, gate.reshape(heads_1THK))
    return layer.o_proj(out_1THK.reshape(1, tokens, -1))


def set_long_memory(model: nn.Module, seed: int = 0) -> None:
    """Forget gates with long memory (as in trained models), in place: random init forgets within a few tokens.

    softplus gates (-exp(A_log) * softplus(x + dt_bias)): A drawn from [1e-3, 2e-2]. Bounded "safe" gates
    (lower_bound * sigmoid(exp(A_log) * (x + dt_bias)), bailing_hybrid): A = 1 and dt_bias in [-9, -6], so the
    per-step log decay is about lower_bound * 1e-3.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not (hasattr(module, "A_log") and hasattr(module, "dt_bias")):
                continue
            if getattr(module, "safe_gate", False) or getattr(module, "safe_gate_lower_bound", None) is not None:
                module.A_log.zero_()
                module.dt_bias.copy_(torch.empty(module.dt_bias.shape).uniform_(-9.0, -6.0, generator=gen))
            else:
                module.A_log.copy_(torch.empty(module.A_log.shape).uniform_(1e-3, 2e-2, generator=gen).log())


# hand-made: transformers' default configs of these two are too big to shrink field by field (MLA, grouped MoE)
TINY = table("kda")

KDA_LAYERS = (
    "transformers.models.kimi_linear.modeling_kimi_linear.KimiLinearDeltaAttention",
    "transformers.models.bailing_hybrid.modeling_bailing_hybrid.BailingHybridDeltaAttention",
    "transformers.models.glm5_next.modeling_glm5_next.Glm5NextTextLinearAttention",
)

# glm5_next's layer is registered, its model type is not: transformers 5.24 has no causal LM for it (multimodal
# Glm5NextForConditionalGeneration only, with hyper-connections and a sparse-attention indexer of its own)
KDA_FAMILY = register_layers(
    "kda", ("kimi_linear", "bailing_hybrid"), {KDA_LAYERS: packed_kda_forward}, cache_kwargs=("cache", "cache_params")
)
register_tinies(TINY, long_memory=set_long_memory)
