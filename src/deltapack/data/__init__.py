"""Packing documents into rows and batching them for training.

from deltapack.data import pack_documents, PackedCollator
packed = pack_documents(docs, max_tokens=4096)         # rows + packed.stats (fill, counts)
collate = PackedCollator(pad_token_id=tokenizer.pad_token_id)
batch = collate(packed[:8])    # input_ids, labels, position_ids, indexed attention_mask, all [B, T]
"""

from deltapack.data.collator import PackedCollator, row_seq_lengths
from deltapack.data.hf_dataset import dataset_stats, pack_dataset
from deltapack.data.packer import PackedRows, PackStats, PackStream, pack_documents, pack_stream, plan_rows

__all__ = [
    "PackStats",
    "PackStream",
    "PackedCollator",
    "PackedRows",
    "dataset_stats",
    "pack_dataset",
    "pack_documents",
    "pack_stream",
    "plan_rows",
    "row_seq_lengths",
]
