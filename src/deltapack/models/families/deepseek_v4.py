"""DeepSeek-V4: sliding-window attention plus compressed key / value entries pooled over windows of tokens.

Besides its sliding window (kept within documents by the attention hooks), a compressed layer attends to entries
that its compressor pools over windows of ``compress_rate`` tokens: ``DeepseekV4HCACompressor`` over disjoint
windows, ``DeepseekV4CSACompressor`` over overlapping ones (each entry mixes the previous window's Ca series with its
own Cb series) and a Lightning indexer that keeps each query's top ``index_topk`` entries. transformers lays the
windows from the start of the row and numbers them along it, so on a packed stream a document's windows straddle
its neighbours and its queries see entries pooled from earlier documents.

The packed forward (:func:`packed_compressor_forward`) gives every document its windows as it has them alone,
directly on the stream: window w of a document pools its tokens w * rate ... (w + 1) * rate - 1 (only complete
windows; a document shorter than a window has none), at rotary position w * rate, the CSA overlap reads the previous
window of the same document only, and query t (in-document position p) may see window w of its own document when
w < (p + 1) // rate, the document alone's causal rule. The entries of all documents form one list of E = sum of
(L_d // rate) entries, document after document; the per-query bias [T, E] admits only the query's own document's
entries. The indexer scores each query against its own document's entries only ([T, n] with n the most entries of
one document), so nothing is laid out per document row, and searches its top-k among as many entries as the document
alone has (scores tie exactly, and torch.topk's order among ties depends on the length of the row it searches).
:func:`packed_compressor_forward_ref` is the reference with the same signature: the stream laid out one document per
row ([N, L]) and the compressor's own forward run on it (the CSA compressor's on each document alone).

Legend: T = tokens of the packed stream, N = documents, L = the longest document, E = entries of the stream,
n = the most entries of one document (L // rate), m = rate (tokens per window), D = hidden size, Q = the query LoRA
rank, K = head size (of the compressor or of its indexer), H = the indexer's heads.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltapack.boundaries import Boundaries
from deltapack.models.layers import Family, PackedLayer, check_packed_stream, register_family
from deltapack.ops.segments import Segments
from deltapack.ops.varlen import chunk_layout, positions
from deltapack.tiny import register_tinies, table


@dataclass(frozen=True)
class Windows:
    """The complete windows of ``rate`` tokens of every document of a packed stream, numbered document by document.

    Attributes:
        tokens: [E, m] int64 stream index of every token of each window.
        index: [E] int64 each window's index inside its document (0, 1, ...).
        doc: [E] int64 each window's document.
        first: [N] int64 the number (in E) of each document's first window.
        count: [N] int64 windows of each document (its length // rate).
        most: host int, the most windows of one document (n).
    """

    tokens: torch.Tensor
    index: torch.Tensor
    doc: torch.Tensor
    first: torch.Tensor
    count: torch.Tensor
    most: int


@functools.cache
def _windows_builder(rate: int) -> Callable[[Segments], Windows]:
    """One builder per rate, so that :meth:`Segments.plan` keeps each batch's windows once per rate."""

    def build(segments: Segments) -> Windows:
        lengths = segments.doc_lengths
        total = sum(n // rate for n in lengths)  # host ints: no sync
        cu = segments.cu_seqlens.long()
        count_N = (cu[1:] - cu[:-1]) // rate
        first_N = count_N.cumsum(0) - count_N
        docs = torch.arange(len(lengths), device=cu.device)
        doc_E = docs.repeat_interleave(count_N, output_size=total)
        index_E = torch.arange(total, device=cu.device) - first_N[doc_E]
        start_E = cu[doc_E] + index_E * rate
        tokens_Em = start_E[:, None] + torch.arange(rate, device=cu.device)
        return Windows(tokens_Em, index_E, doc_E, first_N, count_N, max(lengths) // rate)

    return build


def _check(
    layer: nn.Module, hidden_states: torch.Tensor, bounds: Boundaries, position_ids: torch.Tensor | None, cache: object
) -> None:
    """The inputs both packed forwards take: the stream ``bounds`` describes, no cache, no shard, positions from 0."""
    check_packed_stream(layer, hidden_states, bounds)
    segments = bounds.segments
    if cache is not None or segments.is_shard:
        raise ValueError(
            f"deltapack: {type(layer).__name__} got a cache or a context-parallel shard with packed documents; "
            "expected the whole packed stream on each rank and no cache (its windows run over whole documents)"
        )
    if position_ids is None or position_ids is bounds.position_ids:
        return
    starts_N = position_ids.reshape(-1)[segments.cu_seqlens[:-1].long()]
    if bool((starts_N != 0).any()):  # a host sync; this model runs eager attention with a dense mask anyway
        # numbered from 1, a document's last queries would admit a window past its end (and its first queries the
        # window that their next token completes), what the unpacked model does with such positions: refused
        raise ValueError(
            "deltapack: deepseek_v4's compressors need every document's positions to start at 0 (got "
            f"{sorted(set(starts_N.tolist()))}); expected position_ids restarting at 0 (e.g. "
            "DataCollatorWithFlattening(position_ids_start=0))"
        )


def _pool(module: nn.Module, x_TD: torch.Tensor, win: Windows, overlap: bool) -> torch.Tensor:
    """The compressed entries that ``module`` (a compressor or the CSA indexer) pools over the windows ``win``:
    [1, 1, E, K] in the dtype of x [T, D], as transformers computes them for each document alone (softmax-gated
    sums over each window, for ``overlap`` over the previous window's Ca half and the own window's Cb half, then
    ``kv_norm`` and rotary at position index * rate)."""
    kv_EmC = module.kv_proj(x_TD)[win.tokens]
    gate_EmC = module.gate_proj(x_TD)[win.tokens] + module.position_bias
    if overlap:  # slots: the previous window's Ca (-inf gate: weight 0 for a document's first window), own Cb
        head = kv_EmC.shape[-1] // 2
        has_prev = (win.index > 0)[:, None, None]
        prev_kv = torch.where(has_prev, kv_EmC.roll(1, 0)[..., :head], 0.0)
        prev_gate = torch.where(has_prev, gate_EmC.roll(1, 0)[..., :head], float("-inf"))
        kv_EmC = torch.cat([prev_kv, kv_EmC[..., head:]], 1)
        gate_EmC = torch.cat([prev_gate, gate_EmC[..., head:]], 1)
    weights = gate_EmC.softmax(dim=1, dtype=torch.float32).to(kv_EmC.dtype)
    pooled_EK = module.kv_norm((kv_EmC * weights).sum(dim=1))
    at_1E = (win.index * module.compress_rate)[None]
    cos, sin = module.rotary_emb(pooled_EK, position_ids=at_1E, layer_type=module.rope_layer_type)
    return _rope(module)(pooled_EK[None, None], cos, sin)


def _rope(module: nn.Module) -> Callable[..., torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` of the module's own modeling file (interleaved, on the last dims)."""
    return sys.modules[type(module).__module__].apply_rotary_pos_emb


@torch.no_grad()  # the indexer only picks entries (integer top-k): no gradient flows through it
def _indexer_bias(
    indexer: nn.Module,
    x_TD: torch.Tensor,
    q_residual_TQ: torch.Tensor,
    pos_T: torch.Tensor,
    win: Windows,
    doc_T: torch.Tensor,
    segments: Segments,
) -> torch.Tensor:
    """[T, E] bool: the entries the CSA indexer keeps for each query, its top ``index_topk`` among its own
    document's complete windows (as the document alone picks them). x: [T, D], q_residual: [T, Q], pos, doc: [T]
    int64. Holds each query's own document's keys [T, n, K] and scores [T, H, n] (the rows held [N, L, H, n])."""
    keys_EK = _pool(indexer, x_TD, win, overlap=True)[0, 0]
    total = x_TD.shape[0]
    cos, sin = indexer.rotary_emb(x_TD, position_ids=pos_T[None], layer_type=indexer.rope_layer_type)
    q_1HTK = indexer.q_b_proj(q_residual_TQ).view(1, total, -1, indexer.head_dim).transpose(1, 2)
    q_THK = _rope(indexer)(q_1HTK, cos, sin)[0].transpose(0, 1)
    # each query against its own document's entries: column j is its document's window j
    cols_Tn = win.first[doc_T][:, None] + torch.arange(win.most, device=x_TD.device)
    scores_Tn = indexer.scorer(q_THK[:, None], keys_EK[cols_Tn.clamp(max=keys_EK.shape[0] - 1)], x_TD[:, None])[:, 0]
    seen_T = torch.minimum((pos_T + 1) // indexer.compress_rate, win.count[doc_T])  # complete windows at the query
    future_Tn = torch.arange(win.most, device=x_TD.device) >= seen_T[:, None]
    top_Tk = _top_k_per_length(scores_Tn.masked_fill(future_Tn, float("-inf")), indexer, segments)
    picks_Tk = torch.where(top_Tk < seen_T[:, None], win.first[doc_T][:, None] + top_Tk, keys_EK.shape[0])
    keep_TE = torch.zeros((total, keys_EK.shape[0] + 1), dtype=torch.bool, device=x_TD.device)
    return keep_TE.scatter_(1, picks_Tk, True)[:, :-1]


def _top_k_per_length(scores_Tn: torch.Tensor, indexer: nn.Module, segments: Segments) -> torch.Tensor:
    """[T, k] int64 each query's top ``index_topk`` columns of scores [T, n] (its own document's entries, -inf past
    what it may see), searched as the document alone searches them: in a row of its document's own number of entries.

    The scores are sums of ReLUs, so entries tie exactly (every head at zero), and torch.topk breaks ties in an order
    that depends on the length of the row it searches: in a row of the longest document's n entries a shorter
    document would keep other entries than it keeps alone. So the queries are searched in groups of documents with
    the same number of entries (host lengths: no sync). Columns a document lacks come back as n (never seen)."""
    rate, most = indexer.compress_rate, scores_Tn.shape[1]
    top_Tk = torch.full((scores_Tn.shape[0], min(indexer.index_topk, most)), most, device=scores_Tn.device)
    groups: dict[int, list[int]] = {}
    start = 0
    for length in segments.doc_lengths:
        if length // rate:  # a document without a complete window keeps nothing
            groups.setdefault(length // rate, []).extend(range(start, start + length))
        start += length
    for entries, tokens in groups.items():
        rows = torch.tensor(tokens, device=scores_Tn.device)
        k = min(indexer.index_topk, entries)
        top_Tk[rows, :k] = scores_Tn[rows, :entries].topk(k, dim=-1).indices
    return top_Tk


def packed_compressor_forward(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    bounds: Boundaries,
    q_residual: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    cache: object = None,
    layer_idx: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A DeepSeek-V4 compressor (``DeepseekV4CSACompressor`` or ``DeepseekV4HCACompressor``) over a packed stream,
    each document's windows computed on the stream itself (no per-document rows).

    Args:
        layer: the transformers compressor.
        hidden_states: [1, T, D] the unpadded stream ``bounds`` describes.
        bounds: the batch's boundaries.
        q_residual: [1, T, Q] the attention's query residual (read by the CSA indexer).
        position_ids: [1, T] the stream's positions, each document's from 0 (each query's compressed entries are
            those its position admits, as for the document alone); None: each document from 0.
        cache: must be None (packed documents share no cache).
        layer_idx: the layer's index (unused: no cache).

    Returns:
        (compressed_kv [1, 1, E, K], block_bias [1, 1, T, E] with 0 where a query may attend to an entry and -inf
        elsewhere, or None when there is no entry), what the attention concatenates to its keys and mask.

    Raises:
        ValueError: a cache, a context-parallel shard (a document's windows would span ranks), or a document whose
            positions do not start at 0.
    """
    _check(layer, hidden_states, bounds, position_ids, cache)
    win = bounds.segments.plan(_windows_builder(layer.compress_rate))
    x_TD = hidden_states[0]
    csa = hasattr(layer, "indexer")
    kv_11EK = _pool(layer, x_TD, win, overlap=csa)
    if win.doc.numel() == 0:
        return kv_11EK, None
    doc_T = bounds.seq_idx.reshape(-1).long()
    pos_T = (bounds.position_ids if position_ids is None else position_ids).reshape(-1).to(doc_T.device)
    if csa:
        keep_TE = _indexer_bias(layer.indexer, x_TD, q_residual[0], pos_T, win, doc_T, bounds.segments)
    else:  # every complete window of the query's own document
        seen_T = (pos_T + 1) // layer.compress_rate
        keep_TE = (doc_T[:, None] == win.doc) & (win.index < seen_T[:, None])
    bias_TE = kv_11EK.new_full(keep_TE.shape, float("-inf")).masked_fill(keep_TE, 0.0)
    return kv_11EK, bias_TE[None, None]


def packed_compressor_forward_ref(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    bounds: Boundaries,
    q_residual: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    cache: object = None,
    layer_idx: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference twin of :func:`packed_compressor_forward` (same signature and inputs): the stream laid out one
    document per row ([N, L], each row starting at a document start, zeros after its end, which only fill windows
    that none of its queries sees) and the compressor's own forward run on that batch, so each row's windows, overlap
    and top-k are its document's alone (the CSA compressor runs on each document alone: see :func:`_per_document`).
    Costs N * L tokens per layer rather than T.

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
        (compressed_kv [1, 1, N * n, K], block_bias [1, 1, T, N * n]): each row's n entries, its padding windows
        included (never visible), so the entries differ from :func:`packed_compressor_forward`'s by those columns.

    Raises:
        ValueError: as :func:`packed_compressor_forward`.
    """
    _check(layer, hidden_states, bounds, position_ids, cache)
    segments = bounds.segments
    num_docs, longest = segments.num_docs, segments.max_seqlen
    dest_T = chunk_layout(segments, longest).dest  # token t -> row seq_idx[t], column = its in-document position

    def rows(x_1TC: torch.Tensor) -> torch.Tensor:  # [1, T, C] -> [N, L, C], zeros after each document
        buf = x_1TC.new_zeros((num_docs * longest, x_1TC.shape[-1])).index_copy(0, dest_T, x_1TC[0])
        return buf.view(num_docs, longest, -1)

    if position_ids is None:
        pos_NL = torch.arange(longest, device=hidden_states.device).expand(num_docs, -1)
    else:  # the caller's positions, which the entries' causal thresholds read
        pos_NL = rows(position_ids.reshape(1, -1, 1)).squeeze(-1)
    own_forward = type(layer).forward  # the class's forward: the instance's is deltapack's wrapper
    if getattr(layer, "indexer", None) is None:
        kv_N1nK, bias_N1Ln = own_forward(layer, rows(hidden_states), rows(q_residual), pos_NL, None, layer_idx)
    else:  # each document in a row of its own length, where the indexer's top-k breaks ties as alone
        kv_N1nK, bias_N1Ln = _per_document(layer, hidden_states, q_residual, pos_NL, bounds, layer_idx)
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


def _per_document(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    q_residual: torch.Tensor,
    pos_NL: torch.Tensor,
    bounds: Boundaries,
    layer_idx: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A CSA compressor's own forward run on each document alone (the indexer's top-k breaks exactly tied scores in
    an order that depends on the length of the row it searches: see :func:`_top_k_per_length`), its results laid
    out as the batched call lays them.

    Args:
        hidden_states: [1, T, D] and q_residual: [1, T, Q], the packed stream; pos_NL: [N, L] each document's
            positions laid into rows.

    Returns:
        (kv [N, 1, n, K], bias [N, 1, L, n]) with n = L // rate: document d's entries first in its row, zeros after
        them, and its queries' bias over them, -inf elsewhere.
    """
    segments = bounds.segments
    num_docs, longest = segments.num_docs, segments.max_seqlen
    cu = bounds.cu_seqlens_host
    entries = longest // layer.compress_rate
    kv_1nK_per_doc = []
    bias_N1Ln = hidden_states.new_full((num_docs, 1, longest, entries), float("-inf"))
    for d, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        pos_1S = pos_NL[d : d + 1, : b - a]
        kv_11nK, bias_11Sn = type(layer).forward(
            layer, hidden_states[:, a:b], q_residual[:, a:b], pos_1S, None, layer_idx
        )
        n = kv_11nK.shape[2]
        kv_1nK_per_doc.append(F.pad(kv_11nK[0], (0, 0, 0, entries - n)))
        if bias_11Sn is not None:  # None: a single query, which sees every entry
            bias_N1Ln[d, :, : b - a, :n] = bias_11Sn[0]
        else:
            bias_N1Ln[d, :, : b - a, :n] = 0.0
    kv_N1nK = torch.stack(kv_1nK_per_doc)
    return kv_N1nK, bias_N1Ln


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
