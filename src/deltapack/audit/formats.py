"""The documents the audit packs, the input formats it packs them in, and where each document lands.

Legend: B, T = rows and columns of the padded batch; total = real tokens; L = one document's length.

The audit places the documents itself and reads every captured tensor through that placement (:class:`Layout`),
so it never relies on the code under audit to say where documents are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DOC_LENGTHS", "FORMATS", "InputFormat", "Layout", "Placement", "make_documents"]

# lengths of the audit's documents: a length-1 document, lengths around the conv width, longer ones
DOC_LENGTHS = (7, 10, 5, 1, 8, 6)


@dataclass(frozen=True)
class Placement:
    """Where one document sits in a padded batch: ``row``, first column ``start``, ``length`` tokens."""

    doc: int
    row: int
    start: int
    length: int


@dataclass(frozen=True)
class Layout:
    """Where the documents of one call sit, and how to read or write them in any tensor of that call.

    A tensor of the call is read in one of three layouts (checked in this order):
    - padded [B, T, ...] (the batch as given),
    - stream [1, total, ...] (the real tokens row by row, as a patched model runs them),
    - flattened [B * T * k, ...] or [total * k, ...] (a padded or stream tensor reshaped to 2-D, k values a token).
    Channel-first tensors (the input and output of ``nn.Conv1d``: [B, C, T + extra]) are read with ``channels_first``.
    """

    batch_shape: tuple[int, int]
    placements: tuple[Placement, ...]

    @property
    def total(self) -> int:
        return sum(p.length for p in self.placements)

    @property
    def padded(self) -> bool:
        return self.total != self.batch_shape[0] * self.batch_shape[1]

    def stream_offsets(self) -> list[int]:
        """Offset of each placement in the stream (real tokens, row by row, left to right)."""
        order = sorted(range(len(self.placements)), key=lambda i: (self.placements[i].row, self.placements[i].start))
        offsets, running = [0] * len(order), 0
        for i in order:
            offsets[i] = running
            running += self.placements[i].length
        return offsets

    def _view(self, x: torch.Tensor, channels_first: bool) -> tuple[torch.Tensor, str] | None:
        """``x`` seen as [rows, cols, ...] with its layout name, or None when it is not a per-token tensor."""
        batch, seqlen = self.batch_shape
        if channels_first:
            if x.dim() != 3:
                return None
            x = x.movedim(-1, 1)
            if x.shape[0] == batch and x.shape[1] >= seqlen:
                return x, "padded"
            if x.shape[0] == 1 and x.shape[1] >= self.total:
                return x, "stream"
            return None
        if x.dim() >= 2 and x.shape[0] == batch and x.shape[1] == seqlen:
            return x, "padded"
        if x.dim() >= 2 and x.shape[0] == 1 and x.shape[1] == self.total:
            return x, "stream"
        if x.dim() >= 1 and x.shape[0] > 0:
            if x.shape[0] % (batch * seqlen) == 0:
                return x.reshape(batch, seqlen, x.shape[0] // (batch * seqlen), *x.shape[1:]), "padded"
            if x.shape[0] % self.total == 0:
                return x.reshape(1, self.total, x.shape[0] // self.total, *x.shape[1:]), "stream"
        return None

    def split(self, x: torch.Tensor, channels_first: bool = False) -> list[torch.Tensor] | None:
        """Each document's slice of ``x`` as [L, ...], in placement order; None if ``x`` is not per-token."""
        seen = self._view(x, channels_first)
        if seen is None:
            return None
        view, kind = seen
        if kind == "padded":
            return [view[p.row, p.start : p.start + p.length] for p in self.placements]
        return [view[0, o : o + p.length] for p, o in zip(self.placements, self.stream_offsets())]

    def assemble(self, like: torch.Tensor, parts: Sequence[torch.Tensor], channels_first: bool = False) -> torch.Tensor:
        """A copy of ``like`` with each document's slice replaced by ``parts`` ([L, ...] each, placement order).

        Tokens outside the documents (padding) keep the values of ``like``.
        """
        out = like.detach().contiguous().clone()
        seen = self._view(out, channels_first)
        if seen is None:
            raise ValueError(f"a tensor of shape {tuple(like.shape)} is not per-token for batch {self.batch_shape}")
        view, kind = seen
        offsets = self.stream_offsets()
        for i, (p, part) in enumerate(zip(self.placements, parts)):
            if kind == "padded":
                view[p.row, p.start : p.start + p.length] = part.to(view.dtype)
            else:
                view[0, offsets[i] : offsets[i] + p.length] = part.to(view.dtype)
        return out

    @staticmethod
    def alone(doc: int, length: int) -> Layout:
        return Layout((1, length), (Placement(doc, 0, 0, length),))


@dataclass(frozen=True)
class InputFormat:
    """One way of handing packed documents to a model.

    Attributes:
        name: short key (used in --json and --format). title: what it is, in words.
        rows: the documents of each row, in order (indices into the audit's documents).
        pad_left: per row, the number of padding tokens before the first document.
        build: (input_ids [B, T], layout) -> the keyword arguments of the model call, input_ids included.
    """

    name: str
    title: str
    rows: tuple[tuple[int, ...], ...]
    pad_left: tuple[int, ...]
    build: Callable[[torch.Tensor, Layout], dict[str, Any]]

    def layout(self, lengths: Sequence[int]) -> Layout:
        used = [sum(lengths[d] for d in row) + left for row, left in zip(self.rows, self.pad_left)]
        seqlen = max(used)
        placements = []
        for r, (row, left) in enumerate(zip(self.rows, self.pad_left)):
            col = left
            for d in row:
                placements.append(Placement(d, r, col, lengths[d]))
                col += lengths[d]
        return Layout((len(self.rows), seqlen), tuple(placements))

    def inputs(self, documents: Sequence[torch.Tensor], pad_token_id: int = 0) -> tuple[dict[str, Any], Layout]:
        """The model call's keyword arguments for ``documents`` ([L] int64 each), and the layout."""
        layout = self.layout([len(d) for d in documents])
        ids = torch.full(layout.batch_shape, pad_token_id, dtype=torch.long)
        for p in layout.placements:
            ids[p.row, p.start : p.start + p.length] = documents[p.doc]
        return self.build(ids, layout), layout


def _doc_ids(layout: Layout) -> torch.Tensor:
    """Indexed mask [B, T]: 1..n for the documents of each row, 0 for padding."""
    mask = torch.zeros(layout.batch_shape, dtype=torch.long)
    count: dict[int, int] = {}
    for p in sorted(layout.placements, key=lambda p: (p.row, p.start)):
        count[p.row] = count.get(p.row, 0) + 1
        mask[p.row, p.start : p.start + p.length] = count[p.row]
    return mask


def _positions(layout: Layout) -> torch.Tensor:
    """[B, T] positions restarting at 0 for each document (0 at padding)."""
    pos = torch.zeros(layout.batch_shape, dtype=torch.long)
    for p in layout.placements:
        pos[p.row, p.start : p.start + p.length] = torch.arange(p.length)
    return pos


def _cu_seqlens(layout: Layout) -> torch.Tensor:
    lengths = [p.length for p in sorted(layout.placements, key=lambda p: (p.row, p.start))]
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _position_ids(use_cache: bool | None) -> Callable[[torch.Tensor, Layout], dict[str, Any]]:
    def build(ids: torch.Tensor, layout: Layout) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"input_ids": ids, "position_ids": _positions(layout)}
        if use_cache is not None:
            kwargs["use_cache"] = use_cache
        return kwargs

    return build


def _indexed_mask(ids: torch.Tensor, layout: Layout) -> dict[str, Any]:
    return {"input_ids": ids, "attention_mask": _doc_ids(layout), "use_cache": False}


def _cu_seq_lens(ids: torch.Tensor, layout: Layout) -> dict[str, Any]:
    cu = _cu_seqlens(layout)
    longest = max(p.length for p in layout.placements)
    return {
        "input_ids": ids,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
        "use_cache": False,
    }


def _cu_seq_lens_seq_idx(ids: torch.Tensor, layout: Layout) -> dict[str, Any]:
    kwargs = _cu_seq_lens(ids, layout)
    cu = kwargs["cu_seq_lens_q"].long()
    kwargs["seq_idx"] = torch.arange(len(cu) - 1, dtype=torch.int32).repeat_interleave(cu[1:] - cu[:-1])[None]
    kwargs["position_ids"] = _positions(layout)
    return kwargs


def _padding_mask(ids: torch.Tensor, layout: Layout) -> dict[str, Any]:
    return {"input_ids": ids, "attention_mask": (_doc_ids(layout) > 0).long(), "use_cache": False}


# (name, title, rows of documents, left padding per row, builder); documents are indices into DOC_LENGTHS
FORMATS: tuple[InputFormat, ...] = (
    InputFormat("position_ids", "position_ids restarting, use_cache=False", ((0, 1, 2),), (0,), _position_ids(False)),
    InputFormat(
        "position_ids_cache",
        "position_ids restarting, use_cache left at its default",
        ((0, 1, 2),),
        (0,),
        _position_ids(None),
    ),
    InputFormat("indexed_mask", "indexed attention_mask 1,2,3", ((0, 1, 2),), (0,), _indexed_mask),
    InputFormat("cu_seq_lens", "cu_seq_lens_q/k + max_length_q/k kwargs", ((0, 1, 2),), (0,), _cu_seq_lens),
    InputFormat(
        "cu_seq_lens_seq_idx",
        "cu_seq_lens_q/k + seq_idx + position_ids kwargs",
        ((0, 1, 2),),
        (0,),
        _cu_seq_lens_seq_idx,
    ),
    InputFormat("padding_left", "0/1 padding mask, B=2, left padding", ((1,), (2,)), (0, 5), _padding_mask),
    InputFormat("padding_right", "0/1 padding mask, B=2, right padding", ((1,), (2,)), (0, 0), _padding_mask),
    InputFormat(
        "indexed_mask_padded",
        "indexed attention_mask, B=2, right and left padding",
        ((0, 1), (2, 3, 4)),
        (0, 6),
        _indexed_mask,
    ),
)


def make_documents(vocab_size: int, lengths: Sequence[int] = DOC_LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    """Random token ids, one [L] int64 tensor per length, drawn from [0, min(vocab_size, 1000))."""
    gen = torch.Generator().manual_seed(seed)
    high = max(2, min(vocab_size, 1000))
    return [torch.randint(0, high, (n,), generator=gen) for n in lengths]
