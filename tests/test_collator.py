"""PackedCollator: the batch says exactly where the documents are, and masks every cross-document target."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltapack import Boundaries
from deltapack.data import PackedCollator, pack_documents

rows_st = st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=5), min_size=1, max_size=4)


def rows_from_lengths(layout: list[list[int]]) -> list[dict]:
    token = iter(range(1, 10_000))
    rows = []
    for lengths in layout:
        ids = [next(token) for _ in range(sum(lengths))]
        rows.append({"input_ids": ids, "labels": list(ids), "seq_lengths": lengths})
    return rows


@settings(max_examples=40, deadline=None)
@given(layout=rows_st, multiple=st.sampled_from([None, 8]), indexed=st.booleans())
def test_batch_describes_the_documents(layout, multiple, indexed) -> None:
    rows = rows_from_lengths(layout)
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=multiple, indexed_mask=indexed)(rows)
    width = max(sum(r) for r in layout)
    width = -(-width // multiple) * multiple if multiple else width
    assert all(t.shape == (len(layout), width) and t.dtype == torch.long for t in batch.values())
    for r, lengths in enumerate(layout):
        n = sum(lengths)
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        doc = torch.repeat_interleave(torch.arange(1, len(lengths) + 1), torch.tensor(lengths))
        assert torch.equal(batch["attention_mask"][r, :n], doc if indexed else torch.ones(n, dtype=torch.long))
        assert batch["attention_mask"][r, n:].eq(0).all() and batch["input_ids"][r, n:].eq(0).all()
        assert batch["labels"][r, n:].eq(-100).all()
        expected_labels = torch.tensor(rows[r]["labels"])
        expected_labels[starts] = -100
        assert torch.equal(batch["labels"][r, :n], expected_labels)
        assert batch["position_ids"][r, :n].tolist() == [p for m in lengths for p in range(m)]

    # the core reads the same documents from the batch; the Trainer's loss-token count is the model's
    bounds = Boundaries.from_inputs(
        tuple(batch["input_ids"].shape), attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    )
    docs = [m for lengths in layout for m in lengths]
    if bounds is None:  # one document per row and no padding anywhere: nothing to unpad
        assert all(len(lengths) == 1 for lengths in layout) and not batch["labels"].eq(-100)[:, 1:].any()
        return
    assert bounds.doc_lengths == docs
    model_targets = bounds.shift_labels(bounds.unpad(batch["labels"]))
    assert int((batch["labels"][:, 1:] != -100).sum()) == int((model_targets != -100).sum())


def test_rows_with_only_position_ids() -> None:
    rows = [{"input_ids": [5, 6, 7, 8], "position_ids": [0, 1, 0, 1]}, {"input_ids": [9, 10, 11], "seq_lengths": [3]}]
    batch = PackedCollator(pad_token_id=3)(rows)
    assert batch["attention_mask"].tolist() == [[1, 1, 2, 2], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8], [-100, 10, 11, -100]]
    assert batch["input_ids"][1, 3] == 3


def test_a_row_without_document_lengths_raises() -> None:
    """A row whose seq_lengths were dropped (e.g. by a Trainer) must not silently become one document."""
    with pytest.raises(ValueError, match="neither seq_lengths nor position_ids"):
        PackedCollator(pad_token_id=3)([{"input_ids": [9, 10, 11]}])


def test_packer_rows_go_straight_in() -> None:
    packed = pack_documents([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, [4, 5], [6]], max_tokens=6)
    batch = PackedCollator()(packed.rows)
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100]]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"input_ids": [1, 2, 3], "seq_lengths": [1, 1]}, "sum to the row length"),
        ({"input_ids": [1, 2, 3], "seq_lengths": [3, 0]}, "positive document lengths"),
        ({"input_ids": [1, 2, 3], "position_ids": [0, 2, 3]}, "row 0 jumps from 0 to 2"),
        ({"input_ids": [1, 2, 3], "position_ids": [0, 1, 2], "seq_lengths": [1, 2]}, "disagree"),
        ({"input_ids": [1, 2, 3], "labels": [1, 2]}, "one label per token"),
        ({"tokens": [1]}, "expected 'input_ids'"),
    ],
)
def test_inconsistent_rows_are_named(row, message) -> None:
    with pytest.raises(ValueError, match=message):
        PackedCollator()([row])


def test_row_longer_than_max_tokens_is_rejected() -> None:
    with pytest.raises(ValueError, match="at most 2"):
        PackedCollator(max_tokens=2)([{"input_ids": [1, 2, 3]}])
