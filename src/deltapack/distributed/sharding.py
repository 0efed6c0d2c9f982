"""Context-parallel sharding of one packed stream: which tokens each rank holds, and where documents are cut.

Legend: P = ranks in the context-parallel group, C = parts of the stream (P contiguous, 2P zigzag), L = tokens per
part (total / C), total = tokens of the whole packed stream, N = its documents.

The packed stream [1, total] (the batch's real tokens, row by row, as :class:`~deltapack.boundaries.Boundaries`
lays them out) is cut into C equal parts, numbered along the stream; that numbering is the *chain* the recurrent
state travels along. Layouts:

- ``contiguous``: rank r holds part r.
- ``zigzag``: rank r holds parts r and 2P - 1 - r, in that order (its local buffer is [front part; back part]).
  Causal attention costs grow along the stream, so pairing an early part with a late one balances the work.

Inside a part, the documents it touches are its *pieces*. A piece is cut when its document started in an earlier part
(it needs the conv's last W - 1 input tokens and the recurrent state from there) or goes on in a later part (it hands
its state on). Local ``cu_seqlens`` list the pieces of a rank's parts in local-buffer order; the two parts of a zigzag
rank are never joined, even when one document covers both.

Everything here is host bookkeeping computed from the global offsets, identically on every rank: that is what lets
the exchanges in :mod:`deltapack.distributed.ops` be collectives every rank calls in the same order.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from deltapack.boundaries import IGNORE_INDEX, Boundaries
from deltapack.ops.segments import Segments

__all__ = ["LAYOUTS", "ContextShard", "ShardSegments", "StreamPart", "padded_total"]

LAYOUTS = ("contiguous", "zigzag")


def _num_parts(world_size: int, layout: str) -> int:
    return world_size if layout == "contiguous" else 2 * world_size


def padded_total(total: int, world_size: int, layout: str = "contiguous") -> int:
    """The smallest stream length >= ``total`` that splits into equal parts for ``world_size`` ranks."""
    if layout not in LAYOUTS:
        raise ValueError(f"deltapack: context-parallel layout {layout!r}; expected one of {LAYOUTS}")
    parts = _num_parts(world_size, layout)
    return -(-total // parts) * parts


def chain_parts_of_rank(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """The chain indices of the parts rank ``rank`` holds, in local-buffer order."""
    return (rank,) if layout == "contiguous" else (rank, 2 * world_size - 1 - rank)


@dataclass(frozen=True)
class StreamPart:
    """One part of the global stream, as every rank sees it (host ints only).

    Attributes:
        chain: index of the part along the stream (0 .. C - 1).
        start: global offset of its first token. length: its tokens (L).
        pieces: offsets of the document pieces inside the part (0, ..., L).
        docs: the global document index of each piece.
        context_before: tokens of the first piece's document that precede the part (0: it starts a document).
        continues: the last piece's document goes on after the part.
        parts_before: earlier parts the first piece's document covers (its state passes through that many).
    """

    chain: int
    start: int
    length: int
    pieces: tuple[int, ...]
    docs: tuple[int, ...]
    context_before: int
    continues: bool
    parts_before: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def num_pieces(self) -> int:
        return len(self.pieces) - 1


def _stream_part(cu: Sequence[int], chain: int, part_len: int) -> StreamPart:
    start, end = chain * part_len, (chain + 1) * part_len
    first = bisect.bisect_right(cu, start) - 1  # document holding token `start`
    last = bisect.bisect_left(cu, end) - 1  # document holding token `end - 1`
    pieces = (0, *(cu[d] - start for d in range(first + 1, last + 1)), part_len)
    return StreamPart(
        chain=chain,
        start=start,
        length=part_len,
        pieces=pieces,
        docs=tuple(range(first, last + 1)),
        context_before=start - cu[first],
        continues=cu[last + 1] > end,
        parts_before=chain - cu[first] // part_len,
    )


@dataclass(frozen=True, eq=False)
class ContextShard:
    """One rank's share of a packed stream split across a context-parallel group.

    Build it with :meth:`build`. Its :attr:`local` boundaries describe the rank's tokens for a patched model: local
    pieces as documents, global in-document positions (RoPE sees the same positions as on one device), and this shard
    as :class:`ShardSegments`, which makes the ops and full attention exchange what crosses ranks.

    Attributes:
        group: the process group (None: bookkeeping only, for a single rank or for tests of the layout).
        rank, world_size: this rank and the group size (P).
        layout: "contiguous" or "zigzag".
        part_len: tokens per part (L). total: tokens of the whole stream.
        chain: every part of the stream, along the stream (C of them); the same on every rank.
        global_bounds: the boundaries of the whole stream (one row; only the offsets and per-token tensors are read).
    """

    group: Any
    rank: int
    world_size: int
    layout: str
    part_len: int
    total: int
    chain: tuple[StreamPart, ...]
    global_bounds: Boundaries

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        bounds: Boundaries,
        group: Any = None,
        *,
        layout: str = "contiguous",
        rank: int | None = None,
        world_size: int | None = None,
    ) -> ContextShard:
        """Split the packed stream of ``bounds`` across the ranks of ``group``.

        Args:
            bounds: the boundaries of the whole batch (its unpadded stream is what gets split).
            group: a torch.distributed process group; None with explicit ``rank`` / ``world_size`` for bookkeeping
                only (no exchange can run then unless ``world_size`` is 1), or None with an initialised default
                group to use that group.
            layout: "contiguous" (rank r holds part r) or "zigzag" (parts r and 2P - 1 - r).
            rank, world_size: override what the group says (both or neither).

        Raises:
            ValueError: unknown layout, a stream that does not split into equal parts, bad rank / world size.
        """
        if layout not in LAYOUTS:
            raise ValueError(f"deltapack: context-parallel layout {layout!r}; expected one of {LAYOUTS}")
        if (rank is None) != (world_size is None):
            raise ValueError("deltapack: give both rank and world_size, or neither (then the group says)")
        if rank is None:
            if group is None and not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "deltapack: no process group; expected a torch.distributed group, an initialised default group, "
                    "or explicit rank and world_size"
                )
            world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"deltapack: rank {rank} of world size {world_size}; expected 0 <= rank < world_size")
        total = bounds.total_tokens
        num_parts = _num_parts(world_size, layout)
        if total % num_parts:
            raise ValueError(
                f"deltapack: a packed stream of {total} tokens does not split into {num_parts} equal parts "
                f"({layout} layout over {world_size} ranks); expected a multiple of {num_parts} "
                f"(pad the stream to {padded_total(total, world_size, layout)} tokens, e.g. with one extra document "
                "whose labels are ignored)"
            )
        part_len = total // num_parts
        cu = bounds.cu_seqlens_host
        chain = tuple(_stream_part(cu, c, part_len) for c in range(num_parts))
        return cls(group, rank, world_size, layout, part_len, total, chain, bounds)

    # ------------------------------------------------------------------ this rank's parts
    @property
    def parts(self) -> tuple[StreamPart, ...]:
        """The parts this rank holds, in local-buffer order."""
        return tuple(self.chain[c] for c in chain_parts_of_rank(self.rank, self.world_size, self.layout))

    @property
    def num_local_tokens(self) -> int:
        return self.part_len * len(self.parts)

    def owner(self, chain: int) -> tuple[int, int]:
        """(rank, slot in that rank's local buffer) of chain part ``chain``."""
        if self.layout == "contiguous":
            return chain, 0
        return (chain, 0) if chain < self.world_size else (2 * self.world_size - 1 - chain, 1)

    @functools.cached_property
    def local_cu_seqlens_host(self) -> tuple[int, ...]:
        """Offsets of the local pieces in the local buffer (0, ..., local tokens)."""
        offsets, base = [0], 0
        for part in self.parts:
            offsets.extend(base + p for p in part.pieces[1:])
            base += part.length
        return tuple(offsets)

    @property
    def crosses_ranks(self) -> bool:
        """Some document is cut by a part boundary (otherwise no rank needs anything from another)."""
        return any(part.context_before > 0 for part in self.chain)

    def global_index(self, rank: int | None = None) -> torch.Tensor:
        """[local tokens] int64 global stream offsets of the tokens of ``rank`` (default: this rank), in its
        local-buffer order, on the device of the boundaries."""
        rank = self.rank if rank is None else rank
        parts = [self.chain[c] for c in chain_parts_of_rank(rank, self.world_size, self.layout)]
        device = self.global_bounds.device
        return torch.cat([torch.arange(p.start, p.end, device=device) for p in parts])

    @functools.cached_property
    def local_index(self) -> torch.Tensor:
        """[local tokens] int64: where this rank's tokens sit in the global stream."""
        return self.global_index()

    @functools.cached_property
    def local(self) -> Boundaries:
        """The boundaries of this rank's tokens, for a patched model run on the local stream [1, local tokens].

        Their segments are a :class:`ShardSegments` over this rank's pieces (so every op exchanges what crosses
        ranks); ``position_ids`` are the global in-document positions.
        """
        pieces = Segments.from_cu_seqlens(self.local_cu_seqlens_host, self.global_bounds.device)
        return Boundaries(
            segments=ShardSegments(
                pieces.cu_seqlens, pieces.cu_seqlens_host, pieces.seq_idx, pieces.max_seqlen, shard=self
            ),
            position_ids=self.global_bounds.position_ids.index_select(1, self.local_index),
            indices=None,
            batch_shape=(1, self.num_local_tokens),
        )

    # ------------------------------------------------------------------ moving tensors between views
    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """[1, total, ...] global stream -> [1, local tokens, ...] this rank's tokens (autograd flows back)."""
        if x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != self.total:
            raise ValueError(
                f"deltapack: tensor of shape {tuple(x.shape)} is not the packed stream; expected [1, {self.total}, ...]"
            )
        return x.index_select(1, self.local_index.to(x.device))

    def unshard(self, x_local: torch.Tensor) -> torch.Tensor:
        """[1, local tokens, ...] on every rank -> [1, total, ...] the global stream on every rank.

        A collective (every rank calls it); the gradient of the result flows back to each rank's own tokens.
        """
        from deltapack.distributed.collectives import all_gather

        if x_local.dim() < 2 or x_local.shape[:2] != (1, self.num_local_tokens):
            raise ValueError(
                f"deltapack: tensor of shape {tuple(x_local.shape)} is not this rank's stream; "
                f"expected [1, {self.num_local_tokens}, ...]"
            )
        gathered = all_gather(x_local[0], self.group, self.world_size)  # [P, local, ...]
        order = torch.cat([self.global_index(r) for r in range(self.world_size)]).to(x_local.device)
        flat = gathered.reshape(self.world_size * self.num_local_tokens, *x_local.shape[2:])
        return flat.index_select(0, torch.argsort(order)).unsqueeze(0)

    def shift_labels(self, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """Next-token targets [1, local tokens] for this rank's ``labels`` [1, local tokens].

        As on one device: ``ignore_index`` at the last token of every document; the last token of a piece whose
        document goes on in the next part takes that part's first label (one small all-gather, no gradient).
        """
        from deltapack.distributed.collectives import all_gather

        if labels.dim() != 2 or tuple(labels.shape) != (1, self.num_local_tokens):
            raise ValueError(
                f"deltapack: labels of shape {tuple(labels.shape)}; expected this rank's [1, {self.num_local_tokens}]"
            )
        starts = torch.stack([labels[0, i * self.part_len] for i in range(len(self.parts))])
        with torch.no_grad():
            first_labels = all_gather(starts, self.group, self.world_size).reshape(-1).tolist()  # [P * slots]
        slots = len(self.parts)
        out = labels.clone()
        for i, part in enumerate(self.parts):
            lo = i * self.part_len
            piece = labels[:, lo + 1 : lo + part.length]
            out[:, lo : lo + part.length - 1] = piece
            nxt = ignore_index
            if part.continues:
                rank, slot = self.owner(part.chain + 1)
                nxt = first_labels[rank * slots + slot]
            out[0, lo + part.length - 1] = nxt
            for end in part.pieces[1:-1]:  # documents that end inside the part
                out[0, lo + end - 1] = ignore_index
        return out

    def __repr__(self) -> str:
        return (
            f"ContextShard(rank={self.rank}/{self.world_size}, layout={self.layout!r}, part_len={self.part_len}, "
            f"local pieces={self.local_cu_seqlens_host})"
        )


@dataclass(frozen=True, eq=False)
class ShardSegments(Segments):
    """The segments of one rank's tokens under context parallelism: the rank's pieces of documents (its offsets,
    as in :class:`~deltapack.ops.Segments`), some of which go on in other ranks' parts.

    Every op called with these segments runs through :meth:`run_op`: the context-parallel version of the op
    (:mod:`deltapack.distributed.ops`), which hands conv tokens and recurrent states across ranks; an op without one
    raises, never runs the pieces as if they were whole documents. Labels shift across rank boundaries too.

    Attributes:
        shard: the :class:`ContextShard` these segments describe this rank of.
    """

    is_shard = True
    shard: ContextShard = field(default=None, repr=False)  # type: ignore[assignment]

    @functools.cached_property
    def pieces(self) -> Segments:
        """The same offsets as plain segments: the pieces as independent documents, for what runs after the exchange
        (the reference on this rank's tokens, varlen attention against gathered keys)."""
        return Segments(self.cu_seqlens, self.cu_seqlens_host, self.seq_idx, self.max_seqlen)

    def run_op(self, op: str, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        from deltapack.distributed import ops as cp_ops

        return cp_ops.run(op, self, *args, backend=backend, **kwargs)

    def shift_labels(self, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """As :meth:`ContextShard.shift_labels`: a document cut at this rank's end takes its next target from the
        next rank (a collective)."""
        return self.shard.shift_labels(labels, ignore_index)
