"""Packing a Hugging Face ``datasets.Dataset`` (what Trainer and SFTTrainer users hold) with the same planner.

The token columns are moved with Arrow (one ``take`` and new list offsets), never through Python lists, so packing
a million documents costs about the planning time plus one copy of the tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deltapack.data.packer import PackStats, _check_options, drop_overflow, plan_pieces

__all__ = ["pack_dataset", "dataset_stats"]


def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - the train extra installs it
        raise ImportError("pack_dataset needs the `datasets` package: pip install 'deltapack[train]'") from err
    return datasets


def _list_column(table: Any, name: str) -> Any:
    import pyarrow as pa

    chunked = table.column(name)
    if chunked.num_chunks == 1:
        column = chunked.chunk(0)  # no copy
    elif chunked.num_chunks == 0:
        column = pa.array([], type=chunked.type)
    else:
        column = pa.concat_arrays(chunked.chunks)
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise ValueError(f"deltapack: column {name!r} has type {column.type}; expected a list of token ids per row")
    return column


def pack_dataset(
    dataset: Any,
    max_tokens: int,
    strategy: str = "bfd",
    overflow: str = "split",
    columns: tuple[str, ...] = ("input_ids", "labels"),
) -> Any:
    """Pack a tokenized ``datasets.Dataset`` (or every split of a ``DatasetDict``) into rows of <= max_tokens.

    Args:
        dataset: one document per example, with a list column ``input_ids`` and optionally ``labels`` (same
            lengths). Other columns are dropped.
        max_tokens, strategy, overflow: as in :func:`deltapack.data.pack_documents`.
        columns: the token columns to pack (those present are kept, ``input_ids`` is required).

    Returns:
        A Dataset with the packed token columns and ``seq_lengths`` (document lengths per row), ready for
        :class:`deltapack.data.PackedCollator`; :func:`dataset_stats` gives its fill. The whole dataset is planned
        at once (TRL's ``pack_dataset`` plans each ``map`` batch, 1000 documents by default, separately).
    """
    datasets = _require_datasets()
    _check_options(max_tokens, strategy, overflow)
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict(
            {name: pack_dataset(split, max_tokens, strategy, overflow, columns) for name, split in dataset.items()}
        )
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"deltapack: pack_dataset got {type(dataset).__name__}; expected a datasets.Dataset")
    import pyarrow as pa

    names = [c for c in columns if c in dataset.column_names]
    if "input_ids" not in names:
        raise ValueError(f"deltapack: the dataset has columns {dataset.column_names}; expected 'input_ids'")
    table = dataset.with_format("arrow")[:]
    cols = [_list_column(table, name) for name in names]
    lengths = pa.compute.list_value_length(cols[0]).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    for name, col in zip(names[1:], cols[1:]):
        other = pa.compute.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
        if not np.array_equal(other, lengths):
            bad = int(np.nonzero(other != lengths)[0][0])
            raise ValueError(
                f"deltapack: example {bad} has {lengths[bad]} input_ids and {other[bad]} {name}; "
                "expected the same length"
            )
    dropped = drop_overflow(lengths, max_tokens, overflow, stacklevel=3)
    if bool(dropped.any()):
        keep = pa.array(~dropped)
        cols = [pa.compute.filter(col, keep) for col in cols]
        lengths = lengths[~dropped]
    piece_doc, piece_start, plan = plan_pieces(lengths, max_tokens, strategy)
    piece_len = np.minimum(lengths[piece_doc] - piece_start, max_tokens)
    order = pa.array(np.fromiter((p for row in plan for p in row), dtype=np.int64, count=len(piece_len)))
    docs_per_row = np.fromiter((len(row) for row in plan), dtype=np.int64, count=len(plan))
    ordered_len = piece_len[order.to_numpy()]
    # pieces tile the documents' tokens in order, so their offsets are the running sum of their lengths
    piece_offsets = np.concatenate([[0], np.cumsum(piece_len)])
    row_of_piece = np.repeat(np.arange(len(plan)), docs_per_row)
    row_tokens = np.bincount(row_of_piece, weights=ordered_len, minlength=len(plan)).astype(np.int64)
    row_offsets = np.concatenate([[0], np.cumsum(row_tokens)])
    large = int(piece_offsets[-1]) > np.iinfo(np.int32).max
    array_type, offset_type = (pa.LargeListArray, np.int64) if large else (pa.ListArray, np.int32)
    packed = []
    for col in cols:
        packed.append(
            array_type.from_arrays(pa.array(row_offsets.astype(offset_type)), _reorder(col, piece_offsets, order))
        )
    doc_offsets = np.concatenate([[0], np.cumsum(docs_per_row)]).astype(np.int32)
    packed.append(pa.ListArray.from_arrays(pa.array(doc_offsets), pa.array(ordered_len.astype(np.int32))))
    out = pa.Table.from_arrays(packed, names=[*names, "seq_lengths"])
    # a fingerprint given up front: otherwise datasets hashes the whole table (seconds per million documents)
    fingerprint = datasets.fingerprint.generate_random_fingerprint()
    return datasets.Dataset(datasets.table.InMemoryTable(out), fingerprint=fingerprint)


def _reorder(column: Any, piece_offsets: np.ndarray, order: Any) -> Any:
    """The tokens of ``column`` (a list array, one document per entry) laid out piece by piece in ``order``.

    Integer tokens are copied with numpy slices (about 4x faster than Arrow's list ``take``); other types go
    through ``take``.
    """
    import pyarrow as pa

    values = column.flatten()
    order_np = order.to_numpy()
    if pa.types.is_integer(values.type) and values.null_count == 0:
        tokens = values.to_numpy()
        starts = piece_offsets[:-1][order_np].tolist()
        ends = piece_offsets[1:][order_np].tolist()
        if not starts:
            return values.slice(0, 0)
        return pa.array(np.concatenate([tokens[a:b] for a, b in zip(starts, ends)]))
    array_type = pa.LargeListArray if pa.types.is_large_list(column.type) else pa.ListArray
    offset_type = np.int64 if array_type is pa.LargeListArray else np.int32
    pieces = array_type.from_arrays(pa.array(piece_offsets.astype(offset_type)), values)
    return pieces.take(order).flatten()


def dataset_stats(dataset: Any, max_tokens: int) -> PackStats:
    """Counts and fill of a packed dataset (one with a ``seq_lengths`` column)."""
    seq = _list_column(dataset.with_format("arrow")[:], "seq_lengths")
    lengths = seq.flatten().to_numpy(zero_copy_only=False)
    return PackStats(max_tokens=max_tokens, documents=len(lengths), tokens=int(lengths.sum()), rows=len(seq))
