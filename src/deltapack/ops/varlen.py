"""Per-token and per-chunk views of a packed stream's documents, shared by the recurrence ops.

Every function takes ``segments``, a :class:`deltapack.ops.Segments` (``cu_seqlens`` [N + 1] int32,
``cu_seqlens_host``, ``seq_idx`` [1, T] int32, ``max_seqlen``). Nothing here reads a device value on the host.

Legend: T = tokens of the packed stream, N = documents, L = chunk length, C = chunks of the chunk-aligned layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltapack.ops.segments import Segments


def check_stream(name: str, x: torch.Tensor, segments: Segments, ndim: int) -> None:
    """Raise ValueError unless ``x`` is one packed stream [1, T, ...] of ``ndim`` dims with T = the segments' end."""
    total = segments.cu_seqlens_host[-1]
    if x.dim() != ndim or x.shape[0] != 1 or x.shape[1] != total:
        raise ValueError(
            f"deltapack: {name} must be one packed stream of {ndim} dims [1, T, ...] with T = {total} "
            f"(the segments' last offset), got shape {tuple(x.shape)}"
        )


def positions(segments: Segments) -> torch.Tensor:
    """[T] int64 position of every token inside its document (0 at each document start)."""
    seq = segments.seq_idx.reshape(-1).long()
    return torch.arange(seq.numel(), device=seq.device) - segments.cu_seqlens.long()[seq]


def starts(segments: Segments) -> torch.Tensor:
    """[T] bool, True at the first token of every document."""
    seq = segments.seq_idx.reshape(-1)
    out = torch.zeros(seq.numel(), dtype=torch.bool, device=seq.device)
    return out.index_fill(0, segments.cu_seqlens[:-1].long(), True)


@dataclass(frozen=True)
class ChunkLayout:
    """Every document padded on its own to whole chunks of ``chunk`` tokens, documents one after another.

    dest: [T] int64 where each token of the stream sits in the padded layout; padded: length of the layout
    (host int, C * chunk); first: [C] bool, True for the first chunk of each document.
    """

    dest: torch.Tensor
    padded: int
    first: torch.Tensor
    chunk: int

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """[1, T, H, *] -> [H, C, L, *] (zeros at padding)."""
        buf = x.new_zeros((self.padded, *x.shape[2:])).index_copy(0, self.dest, x[0])
        return buf.reshape(self.padded // self.chunk, self.chunk, *x.shape[2:]).movedim(2, 0)

    def from_chunks(self, y: torch.Tensor) -> torch.Tensor:
        """[H, C, L, *] -> [1, T, H, *]."""
        flat = y.reshape(y.shape[0], self.padded, *y.shape[3:]).movedim(0, 1)
        return flat.index_select(0, self.dest).unsqueeze(0)


def chunk_layout(segments: Segments, chunk: int) -> ChunkLayout:
    """The chunk-aligned layout of ``segments`` (each document's chunks line up as when it runs alone)."""
    host = segments.cu_seqlens_host
    num_chunks = sum(-(-(b - a) // chunk) for a, b in zip(host[:-1], host[1:]))  # host ints only
    cu = segments.cu_seqlens.long()
    counts = (cu[1:] - cu[:-1] + chunk - 1) // chunk
    first_chunk = counts.cumsum(0) - counts  # [N] on the device
    seq = segments.seq_idx.reshape(-1).long()
    dest = torch.arange(seq.numel(), device=cu.device) - cu[seq] + first_chunk[seq] * chunk
    first = torch.zeros(num_chunks, dtype=torch.bool, device=cu.device).index_fill(0, first_chunk, True)
    return ChunkLayout(dest=dest, padded=num_chunks * chunk, first=first, chunk=chunk)


def log_steps(segments: Segments) -> list[int]:
    """Strides 1, 2, 4, ... below the longest document: the steps of a log-depth (Hillis-Steele) scan."""
    out, d = [], 1
    while d < segments.max_seqlen:
        out.append(d)
        d *= 2
    return out


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a reference computes in: fp64 for fp64 inputs (the tests' oracles), fp32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
