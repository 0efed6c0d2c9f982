"""deltapack: exact, fast sequence packing for Gated DeltaNet hybrids in transformers.

import deltapack
model = deltapack.patch(model)        # qwen3_5, qwen3_5_moe or qwen3_next
out = model(input_ids, attention_mask=doc_ids)   # doc_ids: 1..n per document in each row, 0 = padding
# or position_ids restarting per document, or cu_seq_lens_q, or a prebuilt boundaries=Boundaries.from_...(...)
"""

from deltapack.boundaries import Boundaries
from deltapack.data import PackedCollator, pack_dataset, pack_documents
from deltapack.models.registry import SUPPORTED
from deltapack.patch import is_patched, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "Boundaries",
    "PackedCollator",
    "SUPPORTED",
    "is_patched",
    "pack_dataset",
    "pack_documents",
    "patch",
    "unpatch",
    "__version__",
]
