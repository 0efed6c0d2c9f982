"""The packing-aware forwards of the Mamba mixers: Mamba2 (SSD) and Mamba1 (selective scan) layers.

Each computes what the transformers mixer's torch path computes (same projections, conv, dt / B / C processing,
gate and norm), on the unpadded stream, with the conv cut and the scan restarted at every document boundary. They
read the batch's :class:`~deltapack.boundaries.Boundaries` and never look at masks or positions.

One forward serves every class of a shape; what sets a class apart is a small :class:`SSDStyle` /
:class:`ScanStyle` (attribute names), bound with ``functools.partial`` where the family registers it.

Legend: T = real tokens of the batch (one packed stream), H = SSD heads, P = head dim, G = groups, N = state size,
Dc = Mamba1 channels (intermediate size), R = dt rank, M = Zamba's mamba heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltapack.boundaries import Boundaries
from deltapack.models.layers import check_packed_stream, packed_conv
from deltapack.ops.selective_scan import selective_scan
from deltapack.ops.ssd import ssd

__all__ = ["ScanStyle", "SSDStyle", "packed_scan_mixer", "packed_ssd_mixer", "packed_zamba_mixer"]


def _conv(layer: nn.Module, x_1TD: torch.Tensor, bounds: Boundaries) -> torch.Tensor:
    """The layer's depthwise causal conv and activation, cut at every document boundary."""
    if layer.activation not in ("silu", "swish"):
        raise ValueError(
            f"deltapack: {type(layer).__name__} uses the conv activation {layer.activation!r}; expected 'silu'"
        )
    return packed_conv(layer.conv1d, x_1TD, "silu", bounds)


# ---------------------------------------------------------------------------------------------- Mamba2 (SSD)
@dataclass(frozen=True)
class SSDStyle:
    """What sets a Mamba2 mixer apart from ``Mamba2Mixer`` (attribute names on the layer, None where absent).

    in_multiplier: scales the mixer's input (Falcon-H1's ``ssm_in_multiplier``).
    projection_multiplier: scales the input projection per channel (Falcon-H1's ``mup_vector``).
    norm_switch: a boolean attribute; when False the layer has no gated norm and gates with y * silu(z)
        (Falcon-H1's ``mamba_rms_norm``).
    """

    in_multiplier: str | None = None
    projection_multiplier: str | None = None
    norm_switch: str | None = None


def packed_ssd_mixer(
    layer: nn.Module, hidden_states: torch.Tensor, bounds: Boundaries, style: SSDStyle = SSDStyle()
) -> torch.Tensor:
    """One Mamba2 mixer (Mamba2Mixer and its copies in nemotron_h, bamba, granitemoehybrid, zamba2, falcon_h1).

    Args:
        layer: the transformers mixer. hidden_states: [1, T, hidden] the unpadded stream of ``bounds``.
        bounds: the batch's boundaries. style: the class's :class:`SSDStyle`.

    Returns:
        [1, T, hidden] in the dtype of hidden_states.
    """
    check_packed_stream(layer, hidden_states, bounds)
    dtype, tokens = hidden_states.dtype, hidden_states.shape[1]
    x_1TD = hidden_states
    if style.in_multiplier is not None:
        x_1TD = x_1TD * getattr(layer, style.in_multiplier)
    zxbcdt_1TE = layer.in_proj(x_1TD)
    if style.projection_multiplier is not None:
        zxbcdt_1TE = zxbcdt_1TE * getattr(layer, style.projection_multiplier)
    gate_1TI, xBC_1TC, dt_1TH = zxbcdt_1TE.split([layer.intermediate_size, layer.conv_dim, layer.num_heads], dim=-1)
    xBC_1TC = _conv(layer, xBC_1TC, bounds)
    groups_state = layer.n_groups * layer.ssm_state_size
    x_1TI, B_1TS, C_1TS = xBC_1TC.split([layer.intermediate_size, groups_state, groups_state], dim=-1)
    # as the torch path: the scan in fp32, its output fp32 into the norm
    y_1THP = ssd(
        x_1TI.reshape(1, tokens, layer.num_heads, layer.head_dim).float(),
        dt_1TH,
        -torch.exp(layer.A_log.float()),
        B_1TS.reshape(1, tokens, layer.n_groups, layer.ssm_state_size).float(),
        C_1TS.reshape(1, tokens, layer.n_groups, layer.ssm_state_size).float(),
        segments=bounds.segments,
        D=layer.D,
        dt_bias=layer.dt_bias,
        dt_softplus=True,
        dt_limit=tuple(layer.time_step_limit),
    )
    y_1TI = y_1THP.reshape(1, tokens, -1)
    if style.norm_switch is not None and not getattr(layer, style.norm_switch):
        y_1TI = y_1TI * F.silu(gate_1TI)
    else:
        y_1TI = layer.norm(y_1TI, gate_1TI)
    return layer.out_proj(y_1TI.to(dtype))


# ---------------------------------------------------------------------------------------------- Mamba1 (selective scan)
@dataclass(frozen=True)
class ScanStyle:
    """What sets a Mamba1 mixer apart from ``MambaMixer``.

    norms: attribute names of the norms on (dt, B, C) after ``x_proj`` (FalconMamba, Jamba), or None.
    """

    norms: tuple[str, str, str] | None = None


def _dt_projection(layer: nn.Module, dt_1TR: torch.Tensor) -> torch.Tensor:
    """dt_proj without its bias (the scan adds it), as the layer computes it, quantized configs included."""
    if hasattr(getattr(layer, "config", None), "_is_quantized"):
        return layer.dt_proj(dt_1TR) - layer.dt_proj.bias
    return dt_1TR @ layer.dt_proj.weight.t()


def packed_scan_mixer(
    layer: nn.Module, hidden_states: torch.Tensor, bounds: Boundaries, style: ScanStyle = ScanStyle()
) -> torch.Tensor:
    """One Mamba1 mixer (MambaMixer, FalconMambaMixer, JambaMambaMixer): arguments and result as
    :func:`packed_ssd_mixer`, with the class's :class:`ScanStyle`."""
    check_packed_stream(layer, hidden_states, bounds)
    dtype, tokens = hidden_states.dtype, hidden_states.shape[1]
    x_1TDc, gate_1TDc = layer.in_proj(hidden_states).chunk(2, dim=-1)
    x_1TDc = _conv(layer, x_1TDc, bounds)
    dt_1TR, B_1TN, C_1TN = layer.x_proj(x_1TDc).split(
        [layer.time_step_rank, layer.ssm_state_size, layer.ssm_state_size], dim=-1
    )
    if style.norms is not None:
        dt_norm, b_norm, c_norm = (getattr(layer, name) for name in style.norms)
        dt_1TR, B_1TN, C_1TN = dt_norm(dt_1TR), b_norm(B_1TN), c_norm(C_1TN)
    y_1TDc = selective_scan(
        x_1TDc,
        _dt_projection(layer, dt_1TR),
        -torch.exp(layer.A_log.float()),
        B_1TN.reshape(1, tokens, 1, -1),
        C_1TN.reshape(1, tokens, 1, -1),
        segments=bounds.segments,
        D=layer.D,
        z=gate_1TDc,
        delta_bias=layer.dt_proj.bias,
        delta_softplus=True,
    )
    return layer.out_proj(y_1TDc.to(dtype))


def packed_zamba_mixer(layer: nn.Module, hidden_states: torch.Tensor, bounds: Boundaries) -> torch.Tensor:
    """Zamba's multi-head Mamba1 mixer: M heads of Dc / M channels, each with its own x_proj, dt_proj, B and C.

    Args:
        layer: a ``ZambaMambaMixer``. hidden_states: [1, T, hidden] the unpadded stream of ``bounds``.

    Returns:
        [1, T, hidden] in the dtype of hidden_states.
    """
    check_packed_stream(layer, hidden_states, bounds)
    dtype, tokens = hidden_states.dtype, hidden_states.shape[1]
    heads, head_dim = layer.n_mamba_heads, layer.mamba_head_dim
    # Zamba interleaves its projection: channel 2c is the conv input c, channel 2c + 1 the gate c
    xz_1TDc2 = layer.in_proj(hidden_states).reshape(1, tokens, -1, 2)
    x_1TDc, gate_1TDc = xz_1TDc2[..., 0], xz_1TDc2[..., 1]
    x_1TDc = _conv(layer, x_1TDc, bounds)
    x_MTd = x_1TDc[0].reshape(tokens, heads, head_dim).transpose(0, 1)
    params_MTE = x_MTd @ layer.x_proj_weight.transpose(1, 2)  # [M, T, R + 2N]
    dt_MTR, B_MTN, C_MTN = params_MTE.split([layer.time_step_rank, layer.ssm_state_size, layer.ssm_state_size], dim=-1)
    dt_MTd = dt_MTR @ layer.dt_proj_weight.transpose(1, 2)
    y_1TDc = selective_scan(
        x_1TDc,
        dt_MTd.transpose(0, 1).reshape(1, tokens, -1),
        -torch.exp(layer.A_log.float()).reshape(heads * head_dim, -1),
        B_MTN.transpose(0, 1).unsqueeze(0),
        C_MTN.transpose(0, 1).unsqueeze(0),
        segments=bounds.segments,
        D=layer.D.reshape(-1),
        z=gate_1TDc,
        delta_bias=None if layer.dt_proj_bias is None else layer.dt_proj_bias.reshape(-1),
        delta_softplus=True,
    )
    return layer.out_proj(y_1TDc.to(dtype))
