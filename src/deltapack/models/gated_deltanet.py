"""The packing-aware forward of the Gated DeltaNet layers of qwen3_5, qwen3_5_moe and qwen3_next, and of the layers
of the same shape in lara_mini, qwen4_exp (as qwen3_5) and olmo_hybrid (separate projections, beta in [0, 2]).

It computes what the transformers layer computes (same projections, conv, gate, decay, gated RMSNorm), on the
unpadded stream, with the conv cut and the recurrence restarted at every document boundary. It reads the batch's
:class:`~deltapack.boundaries.Boundaries` and never looks at masks or positions.

Legend: T = real tokens of the batch (one packed stream), Hk / Hv = key / value heads, K / V = head dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltapack import ops
from deltapack.boundaries import Boundaries
from deltapack.models.layers import check_packed_stream, packed_conv


def _project(layer: nn.Module, x_1TD: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Input projections: (conv input [1, T, 2*Hk*K + Hv*V], z [1, T, Hv, V], b [1, T, Hv], a [1, T, Hv])."""
    tokens = x_1TD.shape[1]
    if hasattr(layer, "q_proj"):  # olmo_hybrid: separate q, k, v, a, b projections; the output gate is g_proj
        mixed = torch.cat([layer.q_proj(x_1TD), layer.k_proj(x_1TD), layer.v_proj(x_1TD)], dim=-1)
        z = layer.g_proj(x_1TD).reshape(1, tokens, -1, layer.head_v_dim)
        return mixed, z, layer.b_proj(x_1TD), layer.a_proj(x_1TD)
    if hasattr(layer, "in_proj_qkvz"):  # qwen3_next: fused projections, grouped per key head
        q, k, v, z, b, a = layer.fix_query_key_value_ordering(layer.in_proj_qkvz(x_1TD), layer.in_proj_ba(x_1TD))
        mixed = torch.cat([t.reshape(t.shape[0], t.shape[1], -1) for t in (q, k, v)], dim=-1)
        return mixed, z, b, a
    z = layer.in_proj_z(x_1TD).reshape(1, tokens, -1, layer.head_v_dim)
    return layer.in_proj_qkv(x_1TD), z, layer.in_proj_b(x_1TD), layer.in_proj_a(x_1TD)


def packed_gdn_forward(layer: nn.Module, hidden_states: torch.Tensor, bounds: Boundaries) -> torch.Tensor:
    """One GDN layer over a packed stream.

    Args:
        layer: a transformers ``*GatedDeltaNet`` module (its parameters are used as they are).
        hidden_states: [1, T, hidden] the unpadded stream described by ``bounds``.
        bounds: the batch's boundaries.

    Returns:
        [1, T, hidden], each document's rows equal to what the layer gives for that document alone.
    """
    check_packed_stream(layer, hidden_states, bounds)
    tokens = hidden_states.shape[1]
    mixed, z, b, a = _project(layer, hidden_states)
    mixed = packed_conv(layer.conv1d, mixed, layer.activation, bounds)
    q, k, v = torch.split(mixed, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
    q = q.reshape(1, tokens, -1, layer.head_k_dim)
    k = k.reshape(1, tokens, -1, layer.head_k_dim)
    v = v.reshape(1, tokens, -1, layer.head_v_dim)
    beta = b.sigmoid() * 2.0 if getattr(layer, "allow_neg_eigval", False) else b.sigmoid()
    # as the model does: the decay in fp32 so that A does not overflow in half precision
    g = -layer.A_log.float().exp() * F.softplus(a.float() + layer.dt_bias)
    core, _ = ops.gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        segments=bounds.segments,
        use_qk_l2norm=True,
    )
    norm, out_proj = (layer.o_norm, layer.o_proj) if hasattr(layer, "o_proj") else (layer.norm, layer.out_proj)
    core = norm(core.reshape(-1, layer.head_v_dim), z.reshape(-1, layer.head_v_dim))
    return out_proj(core.reshape(1, tokens, -1))
