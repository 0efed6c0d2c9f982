"""DeepSeek-V4: sliding-window attention plus compressed key / value entries pooled over windows of tokens.

Besides its sliding window (kept within documents by the attention hooks), a compressed layer attends to entries
that its compressor pools over windows of ``compress_rate`` tokens: ``DeepseekV4HCACompressor`` over disjoint
windows, ``DeepseekV4CSACompressor`` over overlapping ones (each entry mixes the previous window's Ca series with its
own Cb series) and a Lightning indexer that keeps each query's top ``index_topk`` entries. transformers lays the
windows from the start of the row and numbers them along it, so on a packed stream a document's windows straddle
its neighbours and its queries see entries pooled from earlier documents.

The packed forward gives every document its windows as it has them alone: the stream is laid out one document per
row ([N, Lmax], each row starting at a document start), the compressor's own forward runs on that batch (windows,
overlap, indexer and its causal top-k per row, i.e. per document), and its entries come back as one list of N * n
entries whose per-query bias admits only the query's own document's entries, where the document alone admits them.
The rows' padding sits after each document's last token, so it only fills windows that none of its queries sees.

Legend: T = tokens of the packed stream, N = documents, L = the longest document, n = entries per row (L // rate),
D = hidden size, Q = the query LoRA rank, K = head size.
"""

from __future__ import annotations

import torch
from torch import nn

from deltapack.boundaries import Boundaries
from deltapack.models.layers import Family, PackedLayer, check_packed_stream, register_family
from deltapack.ops.varlen import chunk_layout, positions
from deltapack.tiny import register_tinies, table


def packed_compressor_forward(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    bounds: Boundaries,
    q_residual: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    cache: object = None,
    layer_idx: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A DeepSeek-V4 compressor (``DeepseekV4CSACompressor`` or ``DeepseekV4HCACompressor``) over a packed stream.

    Args:
        layer: the transformers compressor.
        hidden_states: [1, T, D] the unpadded stream ``bounds`` describes.
        bounds: the batch's boundaries.
        q_residual: [1, T, Q] the attention's query residual (read by the CSA indexer).
        position_ids: [1, T] the stream's positions, each document's from 0, laid into the rows with the tokens
            (each query's compressed entries are those its position admits, as for the document alone); None: each
            document from 0.
        cache: must be None (packed documents share no cache).
        layer_idx: the layer's index, passed through.

    Returns:
        (compressed_kv [1, 1, N * n, K], block_bias [1, 1, T, N * n] with 0 where a query may attend to an entry and
        -inf elsewhere, or None when there is no entry), what the attention concatenates to its keys and mask.

    Raises:
        ValueError: a cache, a context-parallel shard (a document's windows would span ranks), or a document whose
            positions do not start at 0.
    """
    check_packed_stream(layer, hidden_states, bounds)
    segments = bounds.segments
    if cache is not None or segments.is_shard:
        raise ValueError(
            f"deltapack: {type(layer).__name__} got a cache or a context-parallel shard with packed documents; "
            "expected the whole packed stream on each rank and no cache (its windows run over whole documents)"
        )
    num_docs, longest = segments.num_docs, segments.max_seqlen
    dest_T = chunk_layout(segments, longest).dest  # token t -> row seq_idx[t], column = its in-document position

    def rows(x_1TC: torch.Tensor) -> torch.Tensor:  # [1, T, C] -> [N, L, C], zeros after each document
        buf = x_1TC.new_zeros((num_docs * longest, x_1TC.shape[-1])).index_copy(0, dest_T, x_1TC[0])
        return buf.view(num_docs, longest, -1)

    if position_ids is None:
        pos_NL = torch.arange(longest, device=hidden_states.device).expand(num_docs, -1)
    else:  # the caller's positions, which the entries' causal thresholds read
        starts_N = position_ids.reshape(-1)[segments.cu_seqlens[:-1].long()]
        if bool((starts_N != 0).any()):  # a host sync; this model runs eager attention with a dense mask anyway
            # numbered from 1, a document's last queries admit a window that only its row's padding completes: the
            # document alone has no such entry, and the indexer's top-k would see it
            raise ValueError(
                "deltapack: deepseek_v4's compressors need every document's positions to start at 0 (got "
                f"{sorted(set(starts_N.tolist()))}); expected position_ids restarting at 0 (e.g. "
                "DataCollatorWithFlattening(position_ids_start=0))"
            )
        pos_NL = rows(position_ids.reshape(1, -1, 1)).squeeze(-1)
    own_forward = type(layer).forward  # the class's forward: the instance's is deltapack's wrapper
    kv_N1nK, bias_N1Ln = own_forward(layer, rows(hidden_states), rows(q_residual), pos_NL, None, layer_idx)
    entries = kv_N1nK.shape[2]
    kv_11EK = kv_N1nK.transpose(0, 1).reshape(1, 1, num_docs * entries, kv_N1nK.shape[-1])
    if entries == 0:
        return kv_11EK, None
    if bias_N1Ln is None:  # one query per row: every entry is visible to it
        bias_N1Ln = kv_N1nK.new_zeros((num_docs, 1, longest, entries))
    doc_T = segments.seq_idx.reshape(-1).long()
    own_Tn = bias_N1Ln[doc_T, 0, positions(segments)]  # each query's row of its own document
    same_TN = doc_T[:, None] == torch.arange(num_docs, device=doc_T.device)
    bias_TNn = torch.where(same_TN[..., None], own_Tn[:, None, :], float("-inf"))
    return kv_11EK, bias_TNn.reshape(1, 1, -1, num_docs * entries)


COMPRESSORS = (
    "transformers.models.deepseek_v4.modeling_deepseek_v4.DeepseekV4CSACompressor",
    "transformers.models.deepseek_v4.modeling_deepseek_v4.DeepseekV4HCACompressor",
)

TINY = table("deepseek_v4")

# pads_exactly=False: transformers lays the windows from the row's first column, so left padding shifts them
DEEPSEEK_V4 = register_family(
    Family(
        name="deepseek_v4_compressed",
        model_types=tuple(TINY),
        layers=(PackedLayer(classes=COMPRESSORS, forward=packed_compressor_forward, call_args=True),),
        pads_exactly=False,
    )
)
register_tinies(TINY)
