"""Packing documents into rows of at most ``max_tokens`` tokens.

A document is a list of token ids, or a dict with ``input_ids`` and optional ``labels`` (same length; -100 where a
token is not trained on, e.g. an SFT prompt). A packed row is a dict of plain lists:

- ``input_ids``, ``labels``: the documents of the row one after the other (labels default to the input ids);
- ``position_ids``: 0, 1, ... restarting at 0 for each document;
- ``seq_lengths``: the length of each document in the row, in order (the column name TRL uses for the same thing).

Strategies: ``"bfd"`` (best-fit decreasing: each document, longest first, goes into the row whose free space fits it
most tightly) and ``"sequential"`` (documents in the given order, a new row whenever the next one does not fit);
the fill BFD reaches is in ``benchmarks/RESULTS.md``. Documents longer
than ``max_tokens`` are split into pieces of ``max_tokens`` (``overflow="split"``; each piece is then a document of
its own) or dropped with a warning (``overflow="drop"``). Tokens are never lost, duplicated or reordered inside a
document; documents may move between rows. Empty documents are skipped (and counted).
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "PackStats",
    "PackedRows",
    "PackStream",
    "pack_documents",
    "pack_stream",
    "plan_rows",
    "check_labels",
    "drop_overflow",
    "plan_pieces",
    "split_lengths",
]

STRATEGIES = ("bfd", "sequential")
OVERFLOW = ("split", "drop")


@dataclass
class PackStats:
    """Counts of one packing. ``fill`` = real tokens / (rows * max_tokens)."""

    max_tokens: int
    documents: int = 0
    tokens: int = 0
    rows: int = 0
    split: int = 0
    dropped: int = 0
    dropped_tokens: int = 0
    empty: int = 0

    @property
    def capacity(self) -> int:
        return self.rows * self.max_tokens

    @property
    def fill(self) -> float:
        return self.tokens / self.capacity if self.rows else 0.0

    def add(self, other: PackStats) -> None:
        for name in ("documents", "tokens", "rows", "split", "dropped", "dropped_tokens", "empty"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def __str__(self) -> str:
        text = (
            f"{self.documents} documents, {self.tokens} tokens -> {self.rows} rows of {self.max_tokens} "
            f"(fill {self.fill:.2%})"
        )
        if self.split:
            text += f", {self.split} split"
        if self.dropped:
            text += f", {self.dropped} dropped ({self.dropped_tokens} tokens)"
        return text


def _check_options(max_tokens: int, strategy: str, overflow: str) -> None:
    if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise ValueError(f"deltapack: max_tokens is {max_tokens!r}; expected a positive int")
    if strategy not in STRATEGIES:
        raise ValueError(f"deltapack: packing strategy {strategy!r}; expected one of {STRATEGIES}")
    if overflow not in OVERFLOW:
        raise ValueError(f"deltapack: overflow {overflow!r}; expected one of {OVERFLOW}")


def plan_rows(lengths: Sequence[int] | np.ndarray, max_tokens: int, strategy: str = "bfd") -> list[list[int]]:
    """Which documents go into which row: a list of rows, each a list of indices into ``lengths``.

    Args:
        lengths: [N] document lengths, each in 1..max_tokens.
        max_tokens: row capacity. strategy: ``"bfd"`` or ``"sequential"``.

    BFD runs in O(N log N) for the sort plus, per document, a lookup of the smallest free space >= its length in a
    bitmask of the free-space values present (a few big-int operations on a max_tokens-bit int): about 3 s for
    1,000,000 documents on one CPU core. Inside a row, documents keep the order in which they were placed.
    """
    _check_options(max_tokens, strategy, "split")
    arr = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if arr.size and (int(arr.min()) < 1 or int(arr.max()) > max_tokens):
        raise ValueError(
            f"deltapack: document lengths range over {int(arr.min())}..{int(arr.max())}; "
            f"expected 1..max_tokens ({max_tokens}); split or drop longer documents first"
        )
    if strategy == "sequential":
        return _plan_sequential(arr, max_tokens)
    return _plan_bfd(arr, max_tokens)


def _plan_sequential(lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    rows: list[list[int]] = []
    used = max_tokens
    for idx, length in enumerate(lengths.tolist()):
        if used + length > max_tokens:
            rows.append([])
            used = 0
        rows[-1].append(idx)
        used += length
    return rows


def _plan_bfd(lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    # rows_with_free[r]: the rows that have exactly r free tokens (1 <= r < max_tokens); bit r of `free` is set
    # when that list is non-empty, so the tightest fit for a length L is the lowest set bit at or above L
    rows_with_free: list[list[int] | None] = [None] * (max_tokens + 1)
    free = 0
    for idx, length in zip(order.tolist(), lengths[order].tolist()):
        above = free >> length
        if above:
            space = length + (above & -above).bit_length() - 1
            candidates = rows_with_free[space]
            row = candidates.pop()
            if not candidates:
                free ^= 1 << space
            rows[row].append(idx)
        else:
            row = len(rows)
            rows.append([idx])
            space = max_tokens
        space -= length
        if space:
            bucket = rows_with_free[space]
            if bucket is None:
                bucket = rows_with_free[space] = []
            if not bucket:
                free |= 1 << space
            bucket.append(row)
    return rows


def split_lengths(lengths: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Pieces of at most ``max_tokens`` for every document: (document index [P], piece start [P]), in order.

    A document of length L gives ceil(L / max_tokens) pieces; all but the last are ``max_tokens`` long.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = np.maximum(-(-lengths // max_tokens), 0)
    doc = np.repeat(np.arange(len(lengths)), counts)
    first = np.cumsum(counts) - counts
    start = (np.arange(len(doc)) - np.repeat(first, counts)) * max_tokens
    return doc, start


def drop_overflow(
    lengths: np.ndarray, max_tokens: int, overflow: str, first_position: int = 0, stacklevel: int = 4
) -> np.ndarray:
    """[D] bool, True for the documents ``overflow="drop"`` drops (longer than ``max_tokens``), with one warning
    naming how many (``stacklevel`` as for ``warnings.warn``, counted from here); all False for "split"."""
    too_long = lengths > max_tokens
    if overflow != "drop" or not bool(too_long.any()):
        return np.zeros(len(lengths), dtype=bool)
    warnings.warn(
        f"deltapack: dropped {int(too_long.sum())} documents longer than max_tokens={max_tokens} "
        f"({int(lengths[too_long].sum())} tokens; the first is document {first_position + int(too_long.argmax())})",
        stacklevel=stacklevel,
    )
    return too_long


def plan_pieces(lengths: np.ndarray, max_tokens: int, strategy: str) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Split documents longer than ``max_tokens`` into pieces and plan the rows of the pieces.

    Returns:
        (piece_doc [P] document of each piece, piece_start [P] its first token there, rows: the piece indices of
        every row); the pieces' lengths are ``min(lengths[piece_doc] - piece_start, max_tokens)``.
    """
    piece_doc, piece_start = split_lengths(lengths, max_tokens)
    piece_len = np.minimum(lengths[piece_doc] - piece_start, max_tokens)
    return piece_doc, piece_start, plan_rows(piece_len, max_tokens, strategy)


def check_labels(num_ids: int, num_labels: int, where: str) -> None:
    """Raise ValueError unless there is one label per token; ``where`` names the document or row."""
    if num_labels != num_ids:
        raise ValueError(
            f"deltapack: {where} has {num_ids} input_ids and {num_labels} labels; expected one label per token"
        )


@dataclass
class _Doc:
    input_ids: list[int]
    labels: list[int] | None


def _as_list(x: Any, what: str) -> list[int]:
    if hasattr(x, "tolist"):
        x = x.tolist()
    if not isinstance(x, list):
        x = list(x)
    if x and not all(isinstance(v, int) for v in x):
        raise ValueError(f"deltapack: {what} holds {type(x[0]).__name__} values; expected token ids (ints)")
    return x


def _read_doc(doc: Any, position: int) -> _Doc:
    if isinstance(doc, dict):
        if "input_ids" not in doc:
            raise ValueError(f"deltapack: document {position} has keys {sorted(doc)}; expected 'input_ids'")
        ids = _as_list(doc["input_ids"], f"document {position} input_ids")
        labels = doc.get("labels")
        if labels is not None:
            labels = _as_list(labels, f"document {position} labels")
            check_labels(len(ids), len(labels), f"document {position}")
        return _Doc(ids, labels)
    if isinstance(doc, (str, bytes)):
        raise ValueError(f"deltapack: document {position} is text; expected token ids (tokenize first)")
    return _Doc(_as_list(doc, f"document {position}"), None)


@dataclass
class PackedRows(Sequence):
    """The rows of one packing (a sequence of row dicts) and its :class:`PackStats`."""

    rows: list[dict[str, list[int]]]
    stats: PackStats

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        return self.rows[i]

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        return iter(self.rows)


def _pack_loaded(
    docs: list[_Doc], max_tokens: int, strategy: str, overflow: str, first_position: int = 0
) -> tuple[list[dict[str, list[int]]], PackStats, list[list[tuple[int, int, int]]]]:
    stats = PackStats(max_tokens=max_tokens)
    lengths = np.fromiter((len(d.input_ids) for d in docs), dtype=np.int64, count=len(docs))
    stats.empty = int((lengths == 0).sum())
    dropped = drop_overflow(lengths, max_tokens, overflow, first_position)
    stats.dropped, stats.dropped_tokens = int(dropped.sum()), int(lengths[dropped].sum())
    stats.split = 0 if overflow == "drop" else int((lengths > max_tokens).sum())
    lengths = np.where(dropped, 0, lengths)
    piece_doc, piece_start, plan = plan_pieces(lengths, max_tokens, strategy)
    piece_len = np.minimum(lengths[piece_doc] - piece_start, max_tokens)
    rows = []
    pieces_per_row = []
    piece_doc_l, piece_start_l, piece_len_l = piece_doc.tolist(), piece_start.tolist(), piece_len.tolist()
    for row_pieces in plan:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        seq_lengths: list[int] = []
        where = []
        for p in row_pieces:
            d, s, n = piece_doc_l[p], piece_start_l[p], piece_len_l[p]
            doc = docs[d]
            ids.extend(doc.input_ids[s : s + n])
            labels.extend((doc.labels if doc.labels is not None else doc.input_ids)[s : s + n])
            positions.extend(range(n))
            seq_lengths.append(n)
            where.append((d, s, n))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions, "seq_lengths": seq_lengths})
        pieces_per_row.append(where)
    stats.documents = int((lengths > 0).sum())
    stats.tokens = int(lengths.sum())
    stats.rows = len(rows)
    return rows, stats, pieces_per_row


def pack_documents(docs: Iterable[Any], max_tokens: int, strategy: str = "bfd", overflow: str = "split") -> PackedRows:
    """Pack ``docs`` (token-id lists, or dicts with ``input_ids`` and optional ``labels``) into rows.

    Returns :class:`PackedRows`: the rows (dicts of lists: ``input_ids``, ``labels``, ``position_ids``,
    ``seq_lengths``; at most ``max_tokens`` tokens each) and their :class:`PackStats`. Everything is held in memory;
    for a stream that does not fit, use :func:`pack_stream`.

    >>> packed = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], max_tokens=5)
    >>> [row["seq_lengths"] for row in packed], packed.stats.fill
    ([[4], [3, 2]], 0.9)
    """
    _check_options(max_tokens, strategy, overflow)
    loaded = [_read_doc(doc, i) for i, doc in enumerate(docs)]
    rows, stats, _ = _pack_loaded(loaded, max_tokens, strategy, overflow)
    return PackedRows(rows, stats)


class PackStream(Iterator[dict[str, list[int]]]):
    """Rows packed from a stream of documents with a bounded buffer; ``stats`` counts what was yielded so far.

    Documents are read ``buffer_docs`` at a time and packed with ``strategy``. Rows filled to at least
    ``hold_below`` are yielded; the documents of emptier rows go back into the next buffer (at most half a buffer
    of them, so memory stays bounded), where longer-tailed company usually fills them. The last buffer is flushed.
    """

    def __init__(
        self,
        docs: Iterable[Any],
        max_tokens: int,
        strategy: str = "bfd",
        overflow: str = "split",
        buffer_docs: int = 10_000,
        hold_below: float = 0.98,
    ):
        _check_options(max_tokens, strategy, overflow)
        if buffer_docs < 1:
            raise ValueError(f"deltapack: buffer_docs is {buffer_docs}; expected a positive int")
        self.max_tokens, self.strategy, self.overflow = max_tokens, strategy, overflow
        self.buffer_docs, self.hold_below = buffer_docs, hold_below
        self.stats = PackStats(max_tokens=max_tokens)
        self._source = iter(docs)
        self._position = 0
        self._held: list[_Doc] = []
        self._ready: deque[dict[str, list[int]]] = deque()
        self._done = False

    def __iter__(self) -> PackStream:
        return self

    def __next__(self) -> dict[str, list[int]]:
        while not self._ready:
            if self._done:
                raise StopIteration
            self._fill()
        return self._ready.popleft()

    def _fill(self) -> None:
        fresh: list[_Doc] = []
        while len(fresh) + len(self._held) < self.buffer_docs:
            try:
                doc = next(self._source)
            except StopIteration:
                self._done = True
                break
            fresh.append(_read_doc(doc, self._position))
            self._position += 1
        if not fresh and not self._held:
            return
        buffer = self._held + fresh
        rows, stats, pieces = _pack_loaded(buffer, self.max_tokens, self.strategy, self.overflow, self._position)
        # held documents were counted when first read; they are never empty nor longer than max_tokens
        self.stats.documents += stats.documents - len(self._held)
        self.stats.split += stats.split
        self.stats.dropped += stats.dropped
        self.stats.dropped_tokens += stats.dropped_tokens
        self.stats.empty += stats.empty
        self._held = []
        keep_back = []
        if not self._done:
            room = self.buffer_docs // 2
            by_fill = sorted(range(len(rows)), key=lambda r: len(rows[r]["input_ids"]))
            for r in by_fill:
                used = len(rows[r]["input_ids"])
                if used >= self.hold_below * self.max_tokens or len(rows[r]["seq_lengths"]) > room:
                    break
                room -= len(rows[r]["seq_lengths"])
                keep_back.append(r)
        held_rows = set(keep_back)
        for r in sorted(held_rows):
            for d, s, n in pieces[r]:
                doc = buffer[d]
                labels = None if doc.labels is None else doc.labels[s : s + n]
                self._held.append(_Doc(doc.input_ids[s : s + n], labels))
        for r, row in enumerate(rows):
            if r not in held_rows:
                self._ready.append(row)
                self.stats.rows += 1
                self.stats.tokens += len(row["input_ids"])


def pack_stream(
    docs: Iterable[Any],
    max_tokens: int,
    strategy: str = "bfd",
    overflow: str = "split",
    buffer_docs: int = 10_000,
) -> PackStream:
    """Streaming :func:`pack_documents`: an iterator of rows that reads ``docs`` ``buffer_docs`` at a time."""
    return PackStream(docs, max_tokens, strategy, overflow, buffer_docs)
