"""pack_documents / pack_stream / pack_dataset: no token lost, duplicated or reordered; rows fit; BFD is BFD."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltapack.data import dataset_stats, pack_dataset, pack_documents, pack_stream, plan_rows

STRIDE = 10_000  # token id = document * STRIDE + position: every token names where it came from

lengths_st = st.lists(st.integers(0, 60), min_size=1, max_size=40)


def tagged(lengths: list[int]) -> list[list[int]]:
    return [[d * STRIDE + j for j in range(n)] for d, n in enumerate(lengths)]


def check_rows(rows, lengths: list[int], max_tokens: int, dropped: set[int] = frozenset()) -> None:
    """Each kept token exactly once; inside a piece, consecutive tokens of one document; positions restart."""
    seen = []
    for row in rows:
        ids, pos, seq = row["input_ids"], row["position_ids"], row["seq_lengths"]
        assert 0 < len(ids) <= max_tokens and sum(seq) == len(ids) == len(pos) == len(row["labels"])
        assert row["labels"] == ids
        start = 0
        for n in seq:
            piece = ids[start : start + n]
            assert n > 0 and len({t // STRIDE for t in piece}) == 1
            assert piece == list(range(piece[0], piece[0] + n))  # in order, nothing skipped
            assert pos[start : start + n] == list(range(n))
            seen += piece
            start += n
    expected = [t for d, doc in enumerate(tagged(lengths)) if d not in dropped for t in doc]
    assert sorted(seen) == expected


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, max_tokens=st.integers(1, 70), strategy=st.sampled_from(["bfd", "sequential"]))
def test_pack_documents_keeps_every_token_once_and_in_order(lengths, max_tokens, strategy) -> None:
    packed = pack_documents(tagged(lengths), max_tokens, strategy=strategy)
    check_rows(packed.rows, lengths, max_tokens)
    stats = packed.stats
    assert stats.tokens == sum(lengths) and stats.documents == sum(n > 0 for n in lengths)
    assert stats.split == sum(n > max_tokens for n in lengths) and stats.empty == lengths.count(0)
    assert stats.rows == len(packed) >= -(-sum(lengths) // max_tokens)


@settings(max_examples=25, deadline=None)
@given(lengths=lengths_st, max_tokens=st.integers(1, 70))
def test_overflow_drop_warns_and_drops_only_long_documents(lengths, max_tokens) -> None:
    long = {d for d, n in enumerate(lengths) if n > max_tokens}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed = pack_documents(tagged(lengths), max_tokens, overflow="drop")
    assert bool(caught) == bool(long)
    check_rows(packed.rows, lengths, max_tokens, dropped=long)
    assert packed.stats.dropped == len(long)


def test_sft_labels_follow_their_tokens() -> None:
    docs = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}, {"input_ids": [5, 6], "labels": [5, 6]}]
    row = pack_documents(docs, max_tokens=8).rows[0]
    assert row == {
        "input_ids": [1, 2, 3, 4, 5, 6],
        "labels": [-100, -100, 3, 4, 5, 6],
        "position_ids": [0, 1, 2, 3, 0, 1],
        "seq_lengths": [4, 2],
    }


@pytest.mark.parametrize(
    "docs, message",
    [
        ([{"input_ids": [1, 2], "labels": [1]}], "one label per token"),
        ([{"tokens": [1]}], "expected 'input_ids'"),
        (["some text"], "tokenize first"),
        ([[1.5, 2.0]], "token ids"),
    ],
)
def test_bad_documents_are_named(docs, message) -> None:
    with pytest.raises(ValueError, match=message):
        pack_documents(docs, max_tokens=4)


@pytest.mark.parametrize(
    "kwargs", [{"max_tokens": 0}, {"max_tokens": 4, "strategy": "ffd"}, {"max_tokens": 4, "overflow": "cut"}]
)
def test_bad_options_are_named(kwargs) -> None:
    with pytest.raises(ValueError, match="expected"):
        pack_documents([[1, 2]], **kwargs)


def test_plan_rows_rejects_lengths_outside_the_row() -> None:
    with pytest.raises(ValueError, match="1..max_tokens"):
        plan_rows([3, 9], max_tokens=8)


def trl_bfd_row_fills(lengths: list[int], max_tokens: int) -> list[int]:
    import datasets
    from trl import pack_dataset as trl_pack_dataset

    ds = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    packed = trl_pack_dataset(ds, max_tokens, strategy="bfd", map_kwargs={"batch_size": None})
    return sorted(sum(s) for s in packed["seq_lengths"])


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=60), max_tokens=st.integers(50, 120))
def test_bfd_packs_exactly_like_trl_bfd(lengths, max_tokens) -> None:
    # best fit decreasing is determined up to ties between rows with the same free space, which are
    # interchangeable: the rows' fills must agree with TRL's implementation of the same algorithm
    pytest.importorskip("trl")
    rows = plan_rows(lengths, max_tokens)
    assert sorted(sum(lengths[i] for i in row) for row in rows) == trl_bfd_row_fills(lengths, max_tokens)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=80), buffer_docs=st.integers(1, 12))
def test_pack_stream_keeps_every_token_with_a_bounded_buffer(lengths, buffer_docs) -> None:
    max_tokens = 32
    stream = pack_stream(iter(tagged(lengths)), max_tokens, buffer_docs=buffer_docs)
    rows = []
    for row in stream:
        rows.append(row)
        assert len(stream._held) <= buffer_docs // 2  # bounded, whatever the length of the stream
    check_rows(rows, lengths, max_tokens)
    assert stream.stats.tokens == sum(lengths) and stream.stats.rows == len(rows)
    assert stream.stats.documents == sum(n > 0 for n in lengths)


def test_pack_stream_fills_close_to_whole_data_packing() -> None:
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(np.log(60), 1.0, 3000).astype(int) + 1, 512).tolist()
    docs = [[1] * n for n in lengths]
    whole = pack_documents(docs, 512).stats
    stream = pack_stream(iter(docs), 512, buffer_docs=500)
    sum(1 for _ in stream)
    assert whole.fill > 0.99 and stream.stats.fill > whole.fill - 0.02


def test_pack_dataset_matches_pack_documents_and_handles_slices() -> None:
    datasets = pytest.importorskip("datasets")
    lengths = [5, 0, 17, 3, 40, 9, 1, 22]
    docs = tagged(lengths)
    labels = [[-100] * min(2, len(d)) + d[2:] for d in docs]
    full = datasets.Dataset.from_dict({"input_ids": docs, "labels": labels, "text": [str(n) for n in lengths]})
    # a slice whose arrow arrays start at an offset: the packed tokens must still be the slice's own
    part = full.select(range(2, 8))
    for ds, kept in ((full, lengths), (part, lengths[2:])):
        packed = pack_dataset(ds, 16)
        assert packed.column_names == ["input_ids", "labels", "seq_lengths"]
        rows = pack_documents([{"input_ids": i, "labels": ll} for i, ll in zip(ds["input_ids"], ds["labels"])], 16)
        ours = sorted(zip(map(tuple, packed["input_ids"]), map(tuple, packed["labels"])))
        assert ours == sorted((tuple(r["input_ids"]), tuple(r["labels"])) for r in rows)
        assert dataset_stats(packed, 16).tokens == sum(kept) == rows.stats.tokens


def test_pack_dataset_rejects_mismatched_labels() -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[1, 2]]})
    with pytest.raises(ValueError, match="same length"):
        pack_dataset(ds, 8)
