"""ZAYA: attention whose q/k/v projection (Compressed Convolutional Attention, ``ZayaCCAProjection``) mixes tokens.

The projection runs q and k through two stacked causal convs over the sequence: a depthwise conv of width
``cca_time0``, then a conv of width ``cca_time1`` grouped by head (``num_attention_heads + num_key_value_heads``
groups), both with a bias, over input left-padded with ``(cca_time0 - 1) + (cca_time1 - 1)`` zeros. Half of each
value head comes from the previous token (``v_proj_delayed``; ``v_proj_delayed(0)`` at the first token). Run alone, a
document therefore sees at its start: zeros as the first conv's input, the first conv's bias (its output on zeros) as
the second conv's input, and ``v_proj_delayed(0)`` as the delayed value. The packed forward gives every document
exactly that; the attention around the projection is kept within documents by the attention hooks, and the MoE
router is per token. On a context-parallel shard the convs and the delayed value read the previous rank's tokens
(:mod:`deltapack.distributed.ops`).

Legend: T = real tokens of the batch (one packed stream), D = hidden size, C = q + k channels, W = the grouped
conv's width, H = heads, K = head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltapack.boundaries import Boundaries
from deltapack.models.layers import check_packed_stream, packed_conv, register_layers
from deltapack.ops.segments import Segments
from deltapack.ops.token_shift import token_shift
from deltapack.ops.varlen import positions
from deltapack.tiny import register_tinies, table


def _grouped_conv_within_documents(
    conv: nn.Module, x_1TC: torch.Tensor, fill_C: torch.Tensor, pos_T: torch.Tensor, before_PWC: torch.Tensor | None
) -> torch.Tensor:
    """``conv`` (causal, weight [C, C / groups, W], bias [C] or None) over x [1, T, C], each tap that reads before
    its token's document start reading ``fill_C`` instead: [1, T, C].

    Every output's W input taps are gathered into one window (tap j of token t reads token t - (W - 1) + j, in the
    same document iff its in-document position ``pos_T`` >= W - 1 - j), and the conv runs once over the windows laid
    end to end with stride W. ``before_PWC`` [P, W - 1, C]: on a context-parallel shard, the tokens before each of
    its P equal parts (``pos_T`` then counts from the whole document's start); None: nothing precedes the stream.
    """
    width = conv.kernel_size[0]
    x_TC = x_1TC[0]
    if before_PWC is None:
        padded_TC = torch.cat([fill_C.to(x_TC.dtype).expand(width - 1, -1), x_TC])
        window_TCW = padded_TC.unfold(0, width, 1)
    else:
        padded_PLC = torch.cat([before_PWC, x_TC.unflatten(0, (before_PWC.shape[0], -1))], dim=1)
        window_TCW = padded_PLC.unfold(1, width, 1).flatten(0, 1)
    inside_T1W = (pos_T[:, None, None] >= torch.arange(width - 1, -1, -1, device=pos_T.device)).expand_as(window_TCW)
    window_TCW = torch.where(inside_T1W, window_TCW, fill_C.to(x_TC.dtype)[None, :, None])
    stream_1CX = window_TCW.permute(1, 0, 2).reshape(1, x_TC.shape[1], -1)
    return F.conv1d(stream_1CX, conv.weight, conv.bias, stride=width, groups=conv.groups).transpose(1, 2)


def _shard_context(y_1TC: torch.Tensor, width: int, segments: Segments) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(in-document positions [T], the W - 1 tokens of ``y_1TC`` before each part or None) for these segments: on a
    context-parallel shard the rows come from the ranks that hold them (a collective) and positions count from the
    whole document's start."""
    if not segments.is_shard:
        return positions(segments), None
    # the shard's own exchanges (deltapack.distributed.ops), reached through its segments' hook
    return segments.run_op("in_document_positions"), segments.run_op("tokens_before_parts", y_1TC, width - 1)


def packed_cca_projection(
    proj: nn.Module, hidden_states: torch.Tensor, bounds: Boundaries
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ZayaCCAProjection`` over a packed stream.

    Args:
        proj: a transformers ``ZayaCCAProjection``.
        hidden_states: [1, T, D] the unpadded stream ``bounds`` describes.
        bounds: the batch's boundaries.

    Returns:
        (query [1, T, Hq, K], key [1, T, Hkv, K], value [1, T, Hkv, K]), each document's rows equal to what the
        projection gives for that document alone (no cache, no padding mask: the stream holds real tokens only).

    On a context-parallel shard (``deltapack.distributed``) a document cut by a rank boundary reads the previous
    rank's tokens: the depthwise conv and the delayed value through their ops' exchanges, the grouped conv through
    one halo exchange of the depthwise conv's last W - 1 outputs.
    """
    check_packed_stream(proj, hidden_states, bounds)
    segments = bounds.segments
    head_dim, groups = proj.head_dim, proj.num_key_value_groups
    q_1TQ, k_1TV = proj.q_proj(hidden_states), proj.k_proj(hidden_states)
    # the per-token residual paths, as the layer builds them
    k_1THK = k_1TV.unflatten(-1, (-1, head_dim)).repeat_interleave(groups, dim=2)
    q_res_1THK = (q_1TQ.unflatten(-1, (-1, head_dim)) + k_1THK) * 0.5
    k_res_1TGK = q_res_1THK.unflatten(2, (-1, groups)).mean(dim=3)

    depthwise, grouped = proj.conv_qk_depthwise, proj.conv_qk_grouped
    y_1TC = packed_conv(depthwise, torch.cat([q_1TQ, k_1TV], dim=-1), None, bounds)
    # before a document start the grouped conv reads the depthwise conv's output on zeros: its bias
    fill_C = depthwise.bias if depthwise.bias is not None else y_1TC.new_zeros(y_1TC.shape[-1])
    pos_T, before_PWC = _shard_context(y_1TC, grouped.kernel_size[0], segments)
    y_1TC = _grouped_conv_within_documents(grouped, y_1TC, fill_C, pos_T, before_PWC)
    query = y_1TC[..., : q_1TQ.shape[-1]].unflatten(-1, (-1, head_dim)) + q_res_1THK
    key = y_1TC[..., q_1TQ.shape[-1] :].unflatten(-1, (-1, head_dim)) + k_res_1TGK

    # the delayed half: the previous token's projection, v_proj_delayed(0) at a document start (token_shift's zeros)
    delayed_1TV = proj.v_proj_delayed(token_shift(hidden_states, segments=segments))
    value = torch.cat([proj.v_proj_current(hidden_states), delayed_1TV], dim=-1).unflatten(-1, (-1, head_dim))
    return query, key, value


register_layers(
    "zaya_cca",
    ("zaya",),
    {"transformers.models.zaya.modeling_zaya.ZayaCCAProjection": packed_cca_projection},
)

register_tinies(table("zaya"))
