"""The selective scan's pure-PyTorch core: a two-level parallel scan of h_t = a_t h_{t-1} + b_t per channel and
state, (a_t, b_t) = (exp(delta_t A), delta_t B_t u_t), inside chunks of L tokens and then across chunks; a document
start has a_t = 0 exactly, so the state restarts there with no loop over documents. Shared by the reference
(:func:`deltapack.ops.selective_scan.selective_scan_ref`) and the Triton backend's fallback.

Legend: T = tokens of the packed stream, Dc = channels, N = state size, G = groups, L = chunk length, c = chunk.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

__all__ = ["linear_scan", "scan_block", "scan_channels"]


def linear_scan(a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of h_t = a_t h_{t-1} + b_t (h before the first = 0) along ``dim``, in log2 steps.

    Returns (product of a up to t, h_t), both shaped like a and b.
    """
    n = a.shape[dim]
    step = 1
    while step < n:
        head_a, head_b = a.narrow(dim, 0, step), b.narrow(dim, 0, step)
        prev_a, prev_b = a.narrow(dim, 0, n - step), b.narrow(dim, 0, n - step)
        cur_a, cur_b = a.narrow(dim, step, n - step), b.narrow(dim, step, n - step)
        a = torch.cat([head_a, cur_a * prev_a], dim)
        b = torch.cat([head_b, cur_a * prev_b + cur_b], dim)
        step *= 2
    return a, b


def scan_block(
    u_TD: torch.Tensor,
    delta_TD: torch.Tensor,
    A_DN: torch.Tensor,
    B_TGN: torch.Tensor,
    C_TGN: torch.Tensor,
    group_D: torch.Tensor,
    starts_T: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """sum_n C h over a block of channels (D and the gate are applied by the caller): [T, Dc_block]."""
    total, channels = u_TD.shape
    state = A_DN.shape[1]
    pad = (-total) % chunk_size
    B_TDN = B_TGN.to(u_TD.dtype).index_select(1, group_D)
    C_TDN = C_TGN.to(u_TD.dtype).index_select(1, group_D)
    a_TDN = torch.exp(delta_TD[:, :, None] * A_DN.to(u_TD.dtype)).masked_fill(starts_T[:, None, None], 0.0)
    b_TDN = (delta_TD * u_TD)[:, :, None] * B_TDN
    if pad:  # padded tail: a = 1, b = 0 (carries the state on, adds nothing; cut off below)
        a_TDN = torch.cat([a_TDN, a_TDN.new_ones(pad, channels, state)])
        b_TDN = torch.cat([b_TDN, b_TDN.new_zeros(pad, channels, state)])
    a_cLDN = a_TDN.reshape(-1, chunk_size, channels, state)
    b_cLDN = b_TDN.reshape(-1, chunk_size, channels, state)

    # 1. inside each chunk, from a zero state
    decay_cLDN, h_cLDN = linear_scan(a_cLDN, b_cLDN, dim=1)
    # 2. across chunks: the state at the end of each chunk
    _, end_cDN = linear_scan(decay_cLDN[:, -1], h_cLDN[:, -1], dim=0)
    start_cDN = torch.cat([torch.zeros_like(end_cDN[:1]), end_cDN[:-1]])
    # 3. each token adds the incoming state, decayed (a zero at a document start cuts it off)
    h_cLDN = h_cLDN + decay_cLDN * start_cDN[:, None]
    h_TDN = h_cLDN.reshape(-1, channels, state)[:total]
    return (h_TDN * C_TDN).sum(-1)


def scan_channels(
    u_TD: torch.Tensor,
    delta_TD: torch.Tensor,
    A_DN: torch.Tensor,
    B_TGN: torch.Tensor,
    C_TGN: torch.Tensor,
    starts_T: torch.Tensor,
    chunk_size: int,
    max_elements: int,
    *,
    checkpoint: bool = False,
) -> torch.Tensor:
    """sum_n C h over every channel, a block of channels at a time so that no [T, block, N] tensor holds more than
    ``max_elements`` (each block recomputed in the backward when ``checkpoint``): [T, Dc].

    u, delta: [T, Dc] (delta processed). A: [Dc, N]. B, C: [T, G, N], channel d reads group d // (Dc / G).
    starts: [T] bool, True at the first token of every document.
    """
    total, channels = u_TD.shape
    group_D = torch.arange(channels, device=u_TD.device) // (channels // B_TGN.shape[1])
    block = max(1, max_elements // (total * A_DN.shape[1]))
    pieces = []
    for first in range(0, channels, block):
        part = slice(first, first + block)
        args = (u_TD[:, part], delta_TD[:, part], A_DN[part], B_TGN, C_TGN, group_D[part], starts_T, chunk_size)
        if checkpoint and block < channels:  # keep one block's [T, block, N] tensors alive at a time
            pieces.append(activation_checkpoint(scan_block, *args, use_reentrant=False))
        else:
            pieces.append(scan_block(*args))
    return torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0]
