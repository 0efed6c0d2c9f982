"""Where the documents of one batch are: built once per batch, read by every layer.

Legend: B, T = rows and columns of the padded batch; total = real (non-padding) tokens; N = documents.

The unpadded stream lists the real tokens row by row, left to right. Documents never span two rows, and every
document gets its own segment in ``cu_seqlens`` (two rows never share one), so ``seq_idx`` is unique across
the whole batch.

Input formats, in order of precedence (see :meth:`Boundaries.from_inputs`):

1. ``cu_seqlens`` (``cu_seq_lens_q`` in transformers): int offsets of the documents in the unpadded stream.
2. An indexed ``attention_mask`` [B, T]: 1..n for the documents of a row, in order, 0 for padding; ids restart in
   every row. A mask whose largest value is 1 is a plain padding mask (one document per row).
3. ``position_ids`` [B, T], read as transformers' packed-sequence detection reads them: inside a document the
   position goes up by exactly 1, so a document starts at the first real token of a row and wherever the position
   does not go up by exactly 1. A start inside a row must restart (a position at most the previous one: 0 for most
   collators, ``position_ids_start`` for transformers' ``DataCollatorWithFlattening``); a jump forward (2 then 5)
   could be a gap inside one document or a new document and raises. This is the one rule deltapack uses for
   positions. Each document then gets positions 0, 1, ... of its own (the rotary models supported depend only on
   position differences).
4. A plain 0/1 padding mask: one document per row, padding on the left or on the right.

Padding is allowed only before the first or after the last real token of a row, never between documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deltapack.ops.segments import IGNORE_INDEX, Segments

__all__ = ["IGNORE_INDEX", "BatchChoices", "Boundaries"]


def _fail(what: str, expected: str) -> None:
    raise ValueError(f"deltapack: {what}; expected {expected}")


class BatchChoices:
    """What the patched model decides once per batch, for every layer of that batch to read (a plain object, so that
    copies of the boundaries, such as FSDP's input casting makes, share it).

    Attributes:
        varlen_attention: the varlen attention backend the full-attention layers run (None: the exact mask, which
            the decoder stack then builds); set by :func:`deltapack.models.attention.attention_inputs`.
    """

    __slots__ = ("varlen_attention",)

    def __init__(self) -> None:
        self.varlen_attention: str | None = None


@dataclass(frozen=True, eq=False)
class Boundaries:
    """Document boundaries of one batch, and what the model needs besides the ops' :class:`Segments`.

    Attributes:
        segments: the documents of the unpadded stream, as every op takes them (``segments=``): ``cu_seqlens`` [N + 1]
            int32, ``cu_seqlens_host``, ``seq_idx`` [1, total] int32, ``max_seqlen``, and the per-batch plans of the
            ops. Under context parallelism, one rank's shard (``deltapack.distributed.ShardSegments``).
        position_ids: [1, total] int64 position of every real token inside its document.
        indices: [total] int64 flat indices (into B * T) of the real tokens; None when every token is real.
        batch_shape: (B, T) of the padded batch.
        choices: what the patched model decides once per batch (:class:`BatchChoices`).

    ``cu_seqlens``, ``cu_seqlens_host``, ``seq_idx``, ``max_seqlen``, ``num_docs``, ``total_tokens``, ``device`` and
    ``doc_lengths`` read through to the segments.
    """

    segments: Segments
    position_ids: torch.Tensor
    indices: torch.Tensor | None
    batch_shape: tuple[int, int]
    choices: BatchChoices = field(default_factory=BatchChoices, repr=False)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return self.segments.cu_seqlens

    @property
    def cu_seqlens_host(self) -> tuple[int, ...]:
        return self.segments.cu_seqlens_host

    @property
    def seq_idx(self) -> torch.Tensor:
        return self.segments.seq_idx

    @property
    def max_seqlen(self) -> int:
        return self.segments.max_seqlen

    @property
    def num_docs(self) -> int:
        return self.segments.num_docs

    @property
    def total_tokens(self) -> int:
        return self.segments.total_tokens

    @property
    def device(self) -> torch.device:
        return self.segments.device

    @property
    def doc_lengths(self) -> list[int]:
        return self.segments.doc_lengths

    # ------------------------------------------------------------------ unpad / repad
    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [1, total, ...]: the real tokens, row by row."""
        if tuple(x.shape[:2]) != self.batch_shape:
            _fail(f"tensor of shape {tuple(x.shape)} does not match the batch", f"[B, T, ...] = {self.batch_shape}")
        flat = x.reshape(-1, *x.shape[2:])
        if self.indices is not None:
            flat = flat.index_select(0, self.indices)
        return flat.unsqueeze(0)

    def repad(self, x: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """[1, total, ...] -> [B, T, ...], ``fill`` at padding."""
        if x.shape[0] != 1 or x.shape[1] != self.total_tokens:
            _fail(f"tensor of shape {tuple(x.shape)} is not the unpadded stream", f"[1, {self.total_tokens}, ...]")
        batch, seqlen = self.batch_shape
        if self.indices is None:
            return x.reshape(batch, seqlen, *x.shape[2:])
        out = x.new_full((batch * seqlen, *x.shape[2:]), fill)
        out = out.index_copy(0, self.indices, x[0])
        return out.reshape(batch, seqlen, *x.shape[2:])

    def shift_labels(self, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """Next-token targets [1, total] for unpadded ``labels`` [1, total]: ``ignore_index`` at the last token
        of every document, so no document's first token is predicted from the previous document.
        Under context parallelism a document cut at this rank's end takes its next target from the next rank."""
        return self.segments.shift_labels(labels, ignore_index)

    def to(self, device: torch.device | str) -> Boundaries:
        """The same boundaries with the device tensors on ``device`` (host copies unchanged)."""
        return Boundaries(
            self.segments.to(device),
            self.position_ids.to(device, non_blocking=True),
            None if self.indices is None else self.indices.to(device, non_blocking=True),
            self.batch_shape,
        )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def _from_flags(cls, real: torch.Tensor, starts: torch.Tensor, device: torch.device | str | None) -> Boundaries:
        """From host bool masks [B, T]: which tokens are real, and which real tokens start a document."""
        batch, seqlen = real.shape
        flat_real = real.reshape(-1)
        total = int(flat_real.sum())
        if total == 0:
            _fail("the batch has no real tokens", "at least one token outside padding")
        indices = None if total == batch * seqlen else flat_real.nonzero().squeeze(1)
        stream_starts = starts.reshape(-1)[flat_real] if indices is not None else starts.reshape(-1)
        start_pos = stream_starts.nonzero().squeeze(1)
        cu = torch.cat([start_pos, torch.tensor([total])]).to(torch.int32)
        lengths = cu[1:] - cu[:-1]
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), lengths)
        position_ids = torch.arange(total) - cu[:-1].long().repeat_interleave(lengths)
        device = device if device is not None else real.device
        segments = Segments(cu.to(device), tuple(cu.tolist()), seq_idx.unsqueeze(0).to(device), int(lengths.max()))
        return cls(
            segments=segments,
            position_ids=position_ids.unsqueeze(0).to(device),
            indices=None if indices is None else indices.to(device),
            batch_shape=(batch, seqlen),
        )

    @staticmethod
    def _padding_mask(mask: torch.Tensor, batch_shape: tuple[int, int]) -> torch.Tensor:
        """Host bool [B, T] of real tokens; checks shape, values and that padding sits only at the row ends."""
        if tuple(mask.shape) != tuple(batch_shape):
            _fail(f"attention_mask has shape {tuple(mask.shape)}", f"[B, T] = {tuple(batch_shape)}")
        real = mask.detach().cpu() != 0
        _check_contiguous(real, "attention_mask")
        return real

    @classmethod
    def from_cu_seqlens(
        cls,
        cu_seqlens: torch.Tensor | Sequence[int],
        batch_shape: tuple[int, int],
        padding_mask: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> Boundaries:
        """From document offsets into the unpadded stream (the real tokens, row by row).

        Args:
            cu_seqlens: [N + 1] ints: 0, then strictly increasing, ending at the number of real tokens.
            batch_shape: (B, T). padding_mask: optional [B, T] 0/1 (1 = real token).
        """
        cu = torch.as_tensor(cu_seqlens).detach().cpu()
        if cu.dim() != 1 or cu.numel() < 2 or cu.is_floating_point():
            _fail(f"cu_seqlens has shape {tuple(cu.shape)} and dtype {cu.dtype}", "a 1-D integer tensor [N + 1]")
        cu = cu.long()
        real = (
            torch.ones(batch_shape, dtype=torch.bool)
            if padding_mask is None
            else cls._padding_mask(padding_mask, batch_shape)
        )
        total = int(real.sum())
        if int(cu[0]) != 0:
            _fail(f"cu_seqlens starts at {int(cu[0])}", "0")
        steps = cu[1:] - cu[:-1]
        if bool((steps <= 0).any()):
            bad = int((steps <= 0).nonzero()[0])
            _fail(
                f"cu_seqlens is not strictly increasing ({int(cu[bad])} then {int(cu[bad + 1])} at index {bad})",
                "every document at least one token long",
            )
        if int(cu[-1]) != total:
            _fail(f"cu_seqlens ends at {int(cu[-1])}", f"the number of real tokens, {total}")
        stream_starts = torch.zeros(total, dtype=torch.bool)
        stream_starts[cu[:-1]] = True
        starts = torch.zeros_like(real)
        starts[real] = stream_starts
        first_real = real & (real.long().cumsum(1) == 1)
        if bool((first_real & ~starts).any()):
            row = int((first_real & ~starts).any(1).nonzero()[0])
            _fail(f"a document in cu_seqlens runs from row {row - 1} into row {row}", "documents never span two rows")
        return cls._from_flags(real, starts, device if device is not None else _device_of(cu_seqlens, padding_mask))

    @classmethod
    def from_document_ids(cls, doc_ids: torch.Tensor, device: torch.device | str | None = None) -> Boundaries:
        """From an indexed mask [B, T]: 1..n for the documents of each row, in order, 0 for padding."""
        ids = _integer_host(doc_ids, "attention_mask")
        if ids.dim() != 2:
            _fail(f"attention_mask has shape {tuple(ids.shape)}", "[B, T]")
        if bool((ids < 0).any()):
            _fail(f"attention_mask holds the negative value {int(ids.min())}", "0 for padding and 1..n for documents")
        real = ids > 0
        _check_contiguous(real, "attention_mask")
        prev = torch.nn.functional.pad(ids[:, :-1], (1, 0))  # 0 before the row start
        starts = real & (ids != prev)
        # the first document of each row is 1, and each new document is the previous one plus 1
        expected = torch.where(prev == 0, torch.ones_like(ids), prev + 1)
        bad = starts & (ids != expected)
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            _fail(
                f"attention_mask row {row} has document id {int(ids[row, col])} at column {col} "
                f"after {int(prev[row, col])}",
                "ids 1, 2, ..., n in order within each row (restarting at 1 in every row), 0 only for padding",
            )
        return cls._from_flags(real, starts, device if device is not None else doc_ids.device)

    @classmethod
    def from_position_ids(
        cls,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> Boundaries:
        """From positions [B, T] (optionally with a 0/1 padding mask [B, T]), by the rule in the module docstring.

        A document starts at the first real token of each row and wherever the position does not go up by exactly 1
        from the previous token; such a start must not jump forward (ValueError: a gap and a new document read the
        same). Positions restarting at 0 (most collators) or at 1 (``DataCollatorWithFlattening(position_ids_start=1)``)
        both work.
        """
        pos = _integer_host(_text_positions(position_ids), "position_ids")
        if pos.dim() != 2:
            _fail(f"position_ids has shape {tuple(position_ids.shape)}", "[B, T] (or [planes, B, T])")
        real = (
            torch.ones_like(pos, dtype=torch.bool)
            if padding_mask is None
            else cls._padding_mask(padding_mask, tuple(pos.shape))
        )
        starts, jumps = _position_starts(pos, real)
        if bool(jumps.any()):
            row, col = (int(i) for i in jumps.nonzero()[0])
            _fail(
                f"position_ids row {row} jumps from {int(pos[row, col - 1])} to {int(pos[row, col])} at column {col} "
                "(a gap inside one document, or a new document?)",
                "positions that go up by exactly 1 inside a document and restart (0, 1, ... again) where a document "
                "starts",
            )
        return cls._from_flags(real, starts, device if device is not None else position_ids.device)

    @classmethod
    def from_padding_mask(cls, mask: torch.Tensor, device: torch.device | str | None = None) -> Boundaries:
        """From a plain 0/1 mask [B, T]: one document per row, padding on the left or the right."""
        host = _integer_host(mask, "attention_mask")
        if host.dim() != 2:
            _fail(f"attention_mask has shape {tuple(host.shape)}", "[B, T]")
        if bool(((host != 0) & (host != 1)).any()):
            _fail(f"attention_mask holds {sorted(set(host.unique().tolist()))}", "a plain 0/1 padding mask")
        real = cls._padding_mask(host, tuple(host.shape))
        starts = real & ~torch.nn.functional.pad(real[:, :-1], (1, 0), value=False)
        return cls._from_flags(real, starts, device if device is not None else mask.device)

    @classmethod
    def from_inputs(
        cls,
        batch_shape: tuple[int, int],
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> Boundaries | None:
        """The boundaries a batch describes, or None when it describes no packing and no padding.

        Precedence: ``cu_seqlens``; an indexed ``attention_mask`` (largest value > 1); ``position_ids`` that do not
        go up by exactly 1 somewhere inside a row (the rule in the module docstring); a 0/1 ``attention_mask`` with
        padding. When ``position_ids`` are given together with another format they must agree with it (restart
        exactly where each document starts). None means: no mask or an all-ones mask, and positions absent or going
        up by exactly 1 along every row.
        """
        mask = None if attention_mask is None else _integer_host(attention_mask, "attention_mask")
        if mask is not None and mask.dim() != 2:
            _fail(f"attention_mask has shape {tuple(mask.shape)}", "a 2-D [B, T] mask (indexed or 0/1)")
        if mask is not None and tuple(mask.shape) != tuple(batch_shape):
            _fail(f"attention_mask has shape {tuple(mask.shape)}", f"[B, T] = {tuple(batch_shape)} like input_ids")
        pos = None if position_ids is None else _text_positions(position_ids)
        if pos is not None and tuple(pos.shape[-2:]) != tuple(batch_shape):
            _fail(f"position_ids has shape {tuple(position_ids.shape)}", f"[B, T] = {tuple(batch_shape)}")
        device = device if device is not None else _device_of(attention_mask, position_ids, cu_seqlens)
        indexed = mask is not None and mask.numel() > 0 and int(mask.max()) > 1

        # built and checked on the host, moved to the device once at the end
        if cu_seqlens is not None:
            padding = None if mask is None or indexed else mask
            if indexed:
                _fail("both cu_seqlens and an indexed attention_mask were given", "one description of the documents")
            bounds = cls.from_cu_seqlens(cu_seqlens, batch_shape, padding, "cpu")
        elif indexed:
            bounds = cls.from_document_ids(mask, "cpu")
        elif pos is not None and _breaks_inside_a_row(_integer_host(pos, "position_ids"), mask):
            return cls.from_position_ids(pos, mask, device)
        elif mask is not None and not bool(mask.all()):
            bounds = cls.from_padding_mask(mask, "cpu")
        else:
            return None
        if pos is not None:
            host = _integer_host(pos, "position_ids")
            real = torch.ones_like(host, dtype=torch.bool) if mask is None else mask != 0
            starts, _ = _position_starts(host, real)
            given = bounds.unpad(starts.unsqueeze(-1)).reshape(-1)
            expected = torch.zeros_like(given)
            expected[list(bounds.cu_seqlens_host[:-1])] = True
            if not torch.equal(given, expected):
                where = int((given != expected).nonzero()[0])
                what = "starts a document" if bool(expected[where]) else "continues a document"
                _fail(
                    f"position_ids disagree with the document boundaries at real token {where}, which "
                    f"{what} there but whose position is {int(bounds.unpad(host.unsqueeze(-1)).reshape(-1)[where])}",
                    "positions that restart where each document starts and otherwise go up by 1 (or no position_ids)",
                )
        bounds = bounds.to(device)
        return bounds


def _integer_host(t: torch.Tensor, name: str) -> torch.Tensor:
    host = torch.as_tensor(t).detach().cpu()
    if host.dtype == torch.bool:
        return host.long()
    if host.is_floating_point():
        if bool((host != host.round()).any()):
            _fail(f"{name} holds non-integer values", "integers")
        return host.long()
    return host.long()


def _text_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] positions; multimodal [planes, B, T] positions are accepted when every plane is the same (text)."""
    if position_ids.dim() == 3:
        if not bool((position_ids == position_ids[:1]).all()):
            _fail(
                "position_ids has different planes (multimodal rope positions)",
                "text-only inputs, whose position planes are equal",
            )
        return position_ids[0]
    return position_ids


def _position_starts(pos: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Host bool [B, T] each: the real tokens that start a document (first real token of a row, or a position that
    does not go up by exactly 1), and the starts inside a row that jump forward (ambiguous)."""
    prev_real = torch.nn.functional.pad(real[:, :-1], (1, 0), value=False)
    prev = torch.nn.functional.pad(pos[:, :-1], (1, 0), value=0)
    inside = real & prev_real
    breaks = inside & (pos != prev + 1)
    return (real & ~prev_real) | breaks, breaks & (pos > prev)


def _breaks_inside_a_row(pos: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """True when the positions of some row's real tokens do not go up by exactly 1 (a document starts inside it)."""
    real = torch.ones_like(pos, dtype=torch.bool) if mask is None else mask != 0
    starts = _position_starts(pos, real)[0]
    first = real & ~torch.nn.functional.pad(real[:, :-1], (1, 0), value=False)
    return bool((starts & ~first).any())


def _check_contiguous(real: torch.Tensor, name: str) -> None:
    """Padding only at the ends of each row: the real tokens of a row form one run."""
    runs = (real & ~torch.nn.functional.pad(real[:, :-1], (1, 0), value=False)).sum(1)
    if bool((runs > 1).any()):
        row = int((runs > 1).nonzero()[0])
        _fail(
            f"{name} row {row} has padding between real tokens",
            "padding only before the first or after the last real token of a row",
        )


def _device_of(*tensors: Any) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")
