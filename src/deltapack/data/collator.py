"""Batching packed rows for the Hugging Face Trainer and TRL's SFTTrainer.

Legend: B = rows in the batch, T = the longest row (rounded up to ``pad_to_multiple_of``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deltapack.boundaries import IGNORE_INDEX, Boundaries
from deltapack.data.packer import check_labels

__all__ = ["PackedCollator", "row_seq_lengths"]


def _ints(x: Any) -> list[int]:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    if hasattr(x, "tolist"):
        return x.tolist()
    return list(x)


def row_seq_lengths(row: Mapping[str, Any], index: int = 0) -> list[int]:
    """The document lengths of one packed row, from ``seq_lengths``, else ``position_ids``; ValueError if neither.

    ``position_ids`` follow deltapack's one rule, :meth:`Boundaries.from_position_ids`: inside a document positions
    go up by exactly 1, and a document starts wherever they do not (restarting). Raises ValueError when the row's
    description is inconsistent or ambiguous.
    """
    size = len(row["input_ids"])
    seq_lengths = row.get("seq_lengths")
    positions = row.get("position_ids")
    if seq_lengths is not None:
        lengths = _ints(seq_lengths)
        if any(n < 1 for n in lengths) or sum(lengths) != size:
            raise ValueError(
                f"deltapack: row {index} has seq_lengths {lengths} for {size} tokens; "
                "expected positive document lengths that sum to the row length"
            )
    elif positions is not None:
        pos = _ints(positions)
        if len(pos) != size:
            raise ValueError(f"deltapack: row {index} has {len(pos)} position_ids for {size} tokens; expected {size}")
        lengths = []
        if size:  # the rule is Boundaries', applied to this one row
            try:
                host = Boundaries.from_position_ids(torch.tensor([pos])).cu_seqlens_host
            except ValueError as err:
                raise ValueError(str(err).replace("position_ids row 0", f"position_ids row {index}")) from None
            lengths = [b - a for a, b in zip(host[:-1], host[1:])]
    else:
        raise ValueError(
            f"deltapack: row {index} has neither seq_lengths nor position_ids; expected the document lengths of the "
            "packed row (a transformers Trainer drops the seq_lengths column unless remove_unused_columns=False)"
        )
    if positions is not None and seq_lengths is not None:
        expected = [p for n in lengths for p in range(n)]
        if _ints(positions) != expected:
            raise ValueError(
                f"deltapack: row {index} position_ids disagree with its seq_lengths {lengths}; "
                "expected positions restarting at 0 at the start of each document"
            )
    return lengths


@dataclass
class PackedCollator:
    """Turns packed rows into a batch that a :func:`deltapack.patch`-ed model reads exactly.

    Each row is a mapping with ``input_ids`` and optional ``labels`` (-100 where a token is not trained on),
    ``seq_lengths`` (document lengths, as :func:`deltapack.data.pack_documents` and TRL write them) or
    ``position_ids`` restarting at 0 per document; a row with neither raises (never a silent single document).
    Other keys are ignored.

    Returns int64 tensors [B, T], rows padded on the right:

    - ``input_ids``: ``pad_token_id`` at padding;
    - ``labels``: the row's labels, with -100 at padding and at the first token of every document, so no token
      is predicted from the previous document and the Trainer's count of loss tokens (``num_items_in_batch``)
      equals the number of targets the patched model scores;
    - ``position_ids``: 0, 1, ... per document (0 at padding);
    - ``attention_mask``: the indexed mask ``patch()`` reads: 1..n for the documents of each row, 0 at padding.
      With ``indexed_mask=False`` it is a plain 0/1 mask instead (the documents are then read from the restarting
      ``position_ids``; exact as well, and what code that sums the mask to count tokens expects).
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    max_tokens: int | None = None
    indexed_mask: bool = True
    return_tensors: str = "pt"

    def __post_init__(self) -> None:
        if self.pad_token_id is None or int(self.pad_token_id) < 0:
            raise ValueError(f"deltapack: pad_token_id is {self.pad_token_id!r}; expected a token id >= 0")
        if self.return_tensors != "pt":
            raise ValueError(f"deltapack: return_tensors={self.return_tensors!r}; expected 'pt'")

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("deltapack: PackedCollator got an empty list of rows; expected at least one row")
        ids_rows, label_rows, lengths_rows = [], [], []
        for i, row in enumerate(rows):
            if "input_ids" not in row:
                raise ValueError(f"deltapack: row {i} has keys {sorted(row)}; expected 'input_ids'")
            ids = _ints(row["input_ids"])
            labels = _ints(row["labels"]) if row.get("labels") is not None else ids
            check_labels(len(ids), len(labels), f"row {i}")
            if self.max_tokens is not None and len(ids) > self.max_tokens:
                raise ValueError(f"deltapack: row {i} has {len(ids)} tokens; expected at most {self.max_tokens}")
            ids_rows.append(ids)
            label_rows.append(labels)
            lengths_rows.append(row_seq_lengths(row, i))
        width = max(len(ids) for ids in ids_rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        width = max(width, 1)
        batch = len(rows)
        input_ids = torch.full((batch, width), int(self.pad_token_id), dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        doc_ids = torch.zeros((batch, width), dtype=torch.long)
        for r, (ids, lab, lengths) in enumerate(zip(ids_rows, label_rows, lengths_rows)):
            n = len(ids)
            if n == 0:
                continue
            input_ids[r, :n] = torch.tensor(ids, dtype=torch.long)
            labels[r, :n] = torch.tensor(lab, dtype=torch.long)
            lengths_t = torch.tensor(lengths, dtype=torch.long)
            starts = torch.cumsum(lengths_t, 0) - lengths_t
            doc_ids[r, :n] = torch.repeat_interleave(torch.arange(1, len(lengths) + 1), lengths_t)
            position_ids[r, :n] = torch.arange(n) - torch.repeat_interleave(starts, lengths_t)
            labels[r, starts] = IGNORE_INDEX
        if not bool((doc_ids > 0).any()):
            raise ValueError("deltapack: every row of the batch is empty; expected at least one token")
        mask = doc_ids if self.indexed_mask else (doc_ids > 0).long()
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}
