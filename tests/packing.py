"""Build packed batches in every input format from lists of documents, for the tests.

A layout is a list of rows, each a list of documents (lists of token ids). ``build`` lays the rows out in a
[B, T] batch (padding on the left or right) and returns the model kwargs of one input format together with where
each document sits, so a test can compare each document's logits with the document run alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = ("position_ids", "indexed_mask", "cu_seqlens", "padding_mask")


@dataclass
class Packed:
    kwargs: dict
    places: list[tuple[int, int, int]]  # (row, first column, length) per document, in document order
    docs: list[list[int]]


def build(rows: list[list[list[int]]], fmt: str, pad_left: bool = False, extra_pad: int = 0, pad_id: int = 0) -> Packed:
    if fmt == "padding_mask" and any(len(r) > 1 for r in rows):
        raise ValueError("a plain padding mask holds one document per row")
    width = max(sum(len(d) for d in r) for r in rows) + extra_pad
    batch = len(rows)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    doc_ids = torch.zeros(batch, width, dtype=torch.long)
    pos = torch.zeros(batch, width, dtype=torch.long)
    places, docs = [], []
    for r, row in enumerate(rows):
        col = width - sum(len(d) for d in row) if pad_left else 0
        for n, doc in enumerate(row):
            ids[r, col : col + len(doc)] = torch.tensor(doc)
            doc_ids[r, col : col + len(doc)] = n + 1
            pos[r, col : col + len(doc)] = torch.arange(len(doc))
            places.append((r, col, len(doc)))
            docs.append(doc)
            col += len(doc)
    padding = (doc_ids > 0).long()
    has_padding = not bool(padding.all())
    kwargs: dict = {"input_ids": ids}
    if fmt == "position_ids":
        kwargs["position_ids"] = pos
        if has_padding:
            kwargs["attention_mask"] = padding
    elif fmt == "indexed_mask":
        kwargs["attention_mask"] = doc_ids
    elif fmt == "cu_seqlens":
        lengths = torch.tensor([n for _, _, n in places])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
        kwargs.update(
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(lengths.max()), max_length_k=int(lengths.max())
        )
        if has_padding:
            kwargs["attention_mask"] = padding
    elif fmt == "padding_mask":
        kwargs["attention_mask"] = padding
    else:
        raise ValueError(f"unknown format {fmt}")
    return Packed(kwargs, places, docs)


def max_doc_diff(logits: torch.Tensor, packed: Packed, alone: list[torch.Tensor]) -> float:
    """Largest |packed - alone| over every document's logits."""
    return max((logits[r, c : c + n] - a).abs().max().item() for (r, c, n), a in zip(packed.places, alone))
