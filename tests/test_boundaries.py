"""Boundaries: each input format, the precedence between them, unpad / repad, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltapack import Boundaries


def t(rows):
    return torch.tensor(rows)


def test_indexed_mask_with_padding():
    b = Boundaries.from_document_ids(t([[1, 1, 2, 3, 3, 0], [0, 0, 1, 1, 1, 1]]))
    assert b.cu_seqlens_host == (0, 2, 3, 5, 9)
    assert b.cu_seqlens.dtype == torch.int32
    assert b.seq_idx.tolist() == [[0, 0, 1, 2, 2, 3, 3, 3, 3]]
    assert b.position_ids.tolist() == [[0, 1, 0, 0, 1, 0, 1, 2, 3]]
    assert b.indices.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11]
    assert b.max_seqlen == 4 and b.num_docs == 4 and b.batch_shape == (2, 6)


def test_documents_of_two_rows_never_share_a_segment():
    """Row 0 ends with document 1 and row 1 starts with document 1: two segments, two seq_idx values."""
    b = Boundaries.from_document_ids(t([[1, 1, 1], [1, 1, 2]]))
    assert b.cu_seqlens_host == (0, 3, 5, 6)
    assert b.seq_idx.tolist() == [[0, 0, 0, 1, 1, 2]]


def test_position_ids_restarting():
    b = Boundaries.from_position_ids(t([[0, 1, 2, 0, 0, 1]]))
    assert b.cu_seqlens_host == (0, 3, 4, 6)
    assert b.indices is None


def test_padding_mask_left_and_right():
    b = Boundaries.from_padding_mask(t([[0, 0, 1, 1], [1, 1, 1, 0]]))
    assert b.cu_seqlens_host == (0, 2, 5)
    assert b.position_ids.tolist() == [[0, 1, 0, 1, 2]]


def test_cu_seqlens_over_rows():
    b = Boundaries.from_cu_seqlens(torch.tensor([0, 2, 3, 5, 6], dtype=torch.int32), (2, 3))
    assert b.seq_idx.tolist() == [[0, 0, 1, 2, 2, 3]]


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, None),
        ({"attention_mask": t([[1, 1, 1]])}, None),
        ({"position_ids": t([[0, 1, 2]])}, None),
        ({"position_ids": t([[5, 6, 7]])}, None),  # offset positions, one document: nothing to pack
        ({"position_ids": t([[0, 1, 0]])}, (0, 2, 3)),
        # any step other than +1 starts a document, as in transformers' packed-sequence detection
        ({"position_ids": t([[1, 2, 3, 1, 2]])}, (0, 3, 5)),  # DataCollatorWithFlattening(position_ids_start=1)
        ({"position_ids": t([[1, 1, 2, 1]])}, (0, 1, 3, 4)),
        ({"position_ids": t([[5, 6, 0, 1]])}, (0, 2, 4)),  # a row may begin inside a document (TRL's wrapped rows)
        ({"attention_mask": t([[0, 1, 1, 1]]), "position_ids": t([[1, 1, 2, 1]])}, (0, 2, 3)),  # padding not read
        ({"cu_seqlens": [0, 3, 5], "position_ids": t([[1, 2, 3, 1, 2]])}, (0, 3, 5)),
        ({"attention_mask": t([[1, 1, 0]])}, (0, 2)),
        ({"attention_mask": t([[1, 2, 2]]), "position_ids": t([[0, 0, 1]])}, (0, 1, 3)),
        # cu_seqlens first, then the indexed mask, then positions
        ({"cu_seqlens": [0, 1, 3], "position_ids": t([[0, 0, 1]])}, (0, 1, 3)),
    ],
)
def test_from_inputs_precedence(kwargs, expected):
    given = kwargs.get("position_ids", kwargs.get("attention_mask"))
    b = Boundaries.from_inputs((1, 3) if given is None else tuple(given.shape), **kwargs)
    assert (b.cu_seqlens_host if b is not None else None) == expected


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=4), min_size=1, max_size=4), left=st.booleans())
def test_formats_agree_and_round_trip(rows, left):
    """Indexed mask, positions (+ padding mask) and cu_seqlens give the same boundaries; unpad/repad round-trips."""
    rows = [r for r in rows if r] or [[1]]
    width = max(sum(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        col = width - sum(r) if left else 0
        for n, length in enumerate(r):
            ids[i, col : col + length] = n + 1
            pos[i, col : col + length] = torch.arange(length)
            col += length
    real = (ids > 0).long()
    lengths = [n for r in rows for n in r]
    cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
    a = Boundaries.from_document_ids(ids)
    b = Boundaries.from_position_ids(pos, real)
    c = Boundaries.from_cu_seqlens(cu, tuple(ids.shape), real)
    assert a.cu_seqlens_host == b.cu_seqlens_host == c.cu_seqlens_host == tuple(cu)
    assert torch.equal(a.position_ids, b.position_ids) and torch.equal(a.seq_idx, c.seq_idx)
    x = torch.randn(*ids.shape, 3)
    stream = a.unpad(x)
    assert stream.shape == (1, sum(lengths), 3)
    assert torch.equal(a.repad(stream), x * real.unsqueeze(-1))


def test_shift_labels_stop_at_document_ends():
    b = Boundaries.from_document_ids(t([[1, 1, 2, 2, 2]]))
    labels = t([[10, 11, 20, 21, 22]])
    assert b.shift_labels(labels).tolist() == [[11, -100, 21, 22, -100]]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Boundaries.from_document_ids(t([[1, 1, 3, 3]])), "document id 3 at column 2 after 1"),
        (lambda: Boundaries.from_document_ids(t([[2, 2, 1, 1]])), "document id 2 at column 0 after 0"),
        (lambda: Boundaries.from_document_ids(t([[1, 2, 1]])), "document id 1 at column 2 after 2"),
        (lambda: Boundaries.from_document_ids(t([[1, 0, 2]])), "padding between real tokens"),
        (lambda: Boundaries.from_document_ids(t([[1, -1]])), "negative value"),
        (lambda: Boundaries.from_document_ids(t([[0, 0]])), "no real tokens"),
        (lambda: Boundaries.from_document_ids(torch.tensor([[1.0, 1.5]])), "non-integer"),
        (lambda: Boundaries.from_cu_seqlens([1, 3], (1, 3)), "starts at 1"),
        (lambda: Boundaries.from_cu_seqlens([0, 2, 2, 3], (1, 3)), "not strictly increasing"),
        (lambda: Boundaries.from_cu_seqlens([0, 3, 1], (1, 3)), "not strictly increasing"),
        (lambda: Boundaries.from_cu_seqlens([0, 2], (1, 3)), "ends at 2"),
        (lambda: Boundaries.from_cu_seqlens([0, 4, 6], (2, 3)), "runs from row 0 into row 1"),
        (lambda: Boundaries.from_cu_seqlens([[0, 3]], (1, 3)), "1-D integer tensor"),
        (lambda: Boundaries.from_position_ids(t([[0, 1, 3, 0]])), "jumps from 1 to 3 at column 2"),
        (lambda: Boundaries.from_position_ids(t([[1, 2, 5, 6]])), "jumps from 2 to 5 at column 2"),
        (lambda: Boundaries.from_padding_mask(t([[1, 0, 1]])), "padding between real tokens"),
        (lambda: Boundaries.from_padding_mask(t([[1, 2, 0]])), "plain 0/1 padding mask"),
        (lambda: Boundaries.from_inputs((1, 3), attention_mask=t([[1, 1]])), "like input_ids"),
        (lambda: Boundaries.from_inputs((1, 3), position_ids=t([[0, 1]])), "position_ids has shape"),
        (
            lambda: Boundaries.from_inputs((1, 3), attention_mask=t([[1, 2, 2]]), position_ids=t([[0, 1, 2]])),
            "position_ids disagree",
        ),
        (
            lambda: Boundaries.from_inputs((1, 3), attention_mask=t([[1, 2, 2]]), cu_seqlens=[0, 1, 3]),
            "both cu_seqlens and an indexed attention_mask",
        ),
        (
            lambda: Boundaries.from_inputs((1, 2), position_ids=t([[[0, 1]], [[0, 2]]])),
            "different planes",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(build, message):
    with pytest.raises(ValueError, match="expected") as info:
        build()
    assert message in str(info.value)


def test_unpad_checks_the_shape():
    b = Boundaries.from_document_ids(t([[1, 2, 0]]))
    with pytest.raises(ValueError, match=r"\[B, T, ...\] = \(1, 3\)"):
        b.unpad(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[1, 2, ...\]"):
        b.repad(torch.zeros(1, 3))
