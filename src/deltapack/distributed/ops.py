"""Exact context-parallel versions of the two GDN primitives (FLA's context-parallel kernels on GPUs, and the same
algebra written over the reference ops everywhere else), and of the token shift.

The public ops reach these through the rank's :class:`~deltapack.distributed.sharding.ShardSegments` (:func:`run`);
each is an :class:`~deltapack.ops.Op` of its own, so the backend is chosen as for every op (argument,
``DELTAPACK_BACKEND``, automatic; verified, logged once with the reason). On ``fla`` the conv runs FLA's
context-parallel conv (any dtype, parts of at least W - 1 tokens) and the delta rule FLA's context-parallel
``chunk_gated_delta_rule`` (bf16 / fp16, head dims <= 256), both through one ``fla.ops.cp.FLACPContext`` built per
batch (``build_cp_context`` with the global offsets, the group and the layout) and kept as the segments' plan with
its chunk indices. Inputs FLA does not take (fp32 delta rule, parts shorter than W - 1) run the reference algebra
below, which is exact; every rank decides the same way, since the verifiers read only the shard and dtypes all
ranks share.

Legend: T = this rank's tokens (its local buffer), P = ranks, C = parts of the stream along the chain (see
:mod:`deltapack.distributed.sharding`), D = conv channels, W = conv width, Hk / Hv = key / value heads,
K / V = key / value head dims, S = a recurrent state [K, V] per value head.

Causal conv1d: a part whose first document started earlier needs that document's last W - 1 input tokens before the
part. Every rank contributes the last W - 1 tokens of each of its parts to one all-gather; each part prepends what
precedes it (never across a document boundary: those rows get a document id of their own), runs the reference conv
and drops the prepended rows. The gradient of those rows flows back to their owner through the all-gather.

Token shift: each token reads its document's previous token; a part's first token reads it through the same
exchange as the conv (:func:`tokens_before_parts`, one token).

Gated delta rule: the state of a document is linear in the state it starts from. For a piece of a document, with
zero start the state ends at H; started at S_in it ends at M S_in + H, where M [K, K] is the piece's transition
(the product of exp(g_t) (I - beta_t k_t k_t^T)). Each rank runs the reference once over its tokens with K extra
value columns that carry the identity as initial state: their final state is M and their output at token t is
R_t = P_t^T q_t (P_t the transition up to t), so the effect of a start state on the outputs is R_t^T S_in. One
all-gather of every part's [H | M] (the piece that ends the part) lets each rank compose the state that enters its
parts along the chain (S_in(c) = M_{c-1} S_in(c-1) + H_{c-1} while the document goes on), and add R_t^T S_in to the
outputs of each part's first piece. Gradients flow through the same all-gather back to the ranks that made H and M.
This is the algebra of FLA's context parallelism (``fla.ops.cp``): one all-gather of per-rank state transitions.

Every rank runs the same exchanges in the same order; which ones run is decided from the chain, which all ranks
share, so the collectives (and their backward) always pair up.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from deltapack.distributed.collectives import all_gather
from deltapack.ops import fla, reference
from deltapack.ops.dispatch import Backend, Op
from deltapack.ops.segments import Segments

if TYPE_CHECKING:  # the shard's types only: the shard calls into this module (ShardSegments.run_op)
    from deltapack.distributed.sharding import ContextShard, ShardSegments

__all__ = [
    "CONTEXT_PARALLEL_OPS",
    "causal_conv1d",
    "gated_delta_rule",
    "in_document_positions",
    "run",
    "tokens_before_parts",
]


def _fla_contexts(segments: Segments) -> dict[int | None, tuple[Any, torch.Tensor]]:
    """This batch's FLA contexts with their chunk indices, by conv width (None: built by the delta rule)."""
    return {}


def _fla_plan(segments: ShardSegments, conv_width: int | None, device: torch.device) -> tuple[Any, torch.Tensor]:
    """(FLA's context for this rank, its chunk indices), built once per batch. ``conv_width`` None (the delta rule,
    which reads no conv metadata) takes the context the conv built."""
    contexts = segments.plan(_fla_contexts)
    if conv_width in contexts:
        return contexts[conv_width]
    if conv_width is None and contexts:
        return next(iter(contexts.values()))
    from fla.ops.cp import build_cp_context

    shard = segments.shard
    cu_host = torch.tensor(shard.global_bounds.cu_seqlens_host, dtype=torch.long)
    group = shard.group if shard.group is not None else dist.group.WORLD
    context = build_cp_context(
        cu_host.to(device), group, conv1d_kernel_size=conv_width, cu_seqlens_cpu=cu_host, layout=shard.layout
    )
    local = tuple(int(c) for c in context.cu_seqlens_cpu.tolist())
    if local != shard.local_cu_seqlens_host:
        raise RuntimeError(
            f"deltapack: FLA's context-parallel split {local} differs from this shard's pieces "
            f"{shard.local_cu_seqlens_host} (rank {shard.rank} of {shard.world_size}, {shard.layout}); expected the "
            "same split: is the shard built over the same process group?"
        )
    lengths = [b - a for a, b in zip(local[:-1], local[1:])]
    contexts[conv_width] = plan = (context, fla.chunk_indices(context.cu_seqlens, lengths, fla.CHUNK))
    return plan


def _fla_takes(shard: ContextShard) -> tuple[bool, str]:
    limit = fla.MAX_CHUNKS_PER_CALL * fla.CHUNK
    ok = shard.num_local_tokens <= limit
    return ok, f"{shard.num_local_tokens} tokens on this rank; FLA's context-parallel kernels take at most {limit}"


def _check_stream(name: str, x: torch.Tensor, shard: ContextShard) -> None:
    if x.dim() < 3 or x.shape[0] != 1 or x.shape[1] != shard.num_local_tokens:
        raise ValueError(
            f"deltapack: {name} has shape {tuple(x.shape)}; expected this rank's stream [1, {shard.num_local_tokens}, "
            "...] (the tokens ContextShard.shard gives it)"
        )


def _chain_order(shard: ContextShard, device: torch.device) -> torch.Tensor:
    """[C] index into a [P * slots] gather result (rank-major) of each chain part."""
    slots = len(shard.parts)
    order = [rank * slots + slot for rank, slot in (shard.owner(c) for c in range(len(shard.chain)))]
    return torch.tensor(order, device=device)


def _my_chains(shard: ContextShard, device: torch.device) -> torch.Tensor:
    return torch.tensor([p.chain for p in shard.parts], device=device)


# ---------------------------------------------------------------------------------------------- the halo exchange
def tokens_before_parts(x: Tensor, keep: int, shard: ContextShard) -> Tensor:
    """The ``keep`` tokens of the whole stream just before each of this rank's parts, whoever holds them.

    Args:
        x: [1, T, D] this rank's stream. keep: how many tokens (any number; a part shorter than ``keep`` passes
            on the tails of earlier parts). shard: this rank's :class:`ContextShard`.

    Returns:
        [slots, keep, D] in the dtype of x, one row block per local part (local-buffer order): zeros before the
        stream's start and wherever no document crosses a part boundary, since then nothing is exchanged. The rows
        may belong to other documents than the part's first one: the caller masks by document. A collective when a
        document crosses ranks (every rank calls it); gradients flow back to the owners of the rows.
    """
    _check_stream("x", x, shard)
    slots, part_len, channels = len(shard.parts), shard.part_len, x.shape[-1]
    if keep == 0 or not shard.crosses_ranks:
        return x.new_zeros(slots, keep, channels)
    tail = min(keep, part_len)
    tails = torch.stack([x[0, (i + 1) * part_len - tail : (i + 1) * part_len] for i in range(slots)])
    gathered = all_gather(tails, shard.group, shard.world_size)  # [P, slots, tail, D]
    chain_tails = gathered.reshape(-1, tail, channels).index_select(0, _chain_order(shard, x.device))  # [C, tail, D]
    # the `keep` tokens before each part's start; tails of consecutive parts are adjacent when tail < keep (whole
    # parts) and only the previous part's tail is read otherwise, so one zero-padded flat view serves both
    flat = torch.cat([chain_tails.new_zeros(keep, channels), chain_tails.reshape(-1, channels)])
    rows = torch.arange(len(shard.chain), device=x.device)[:, None] * tail + torch.arange(keep, device=x.device)
    halos = flat.index_select(0, rows.reshape(-1)).reshape(len(shard.chain), keep, channels)
    return halos.index_select(0, _my_chains(shard, x.device)).to(x.dtype)  # [slots, keep, D]


def in_document_positions(shard: ContextShard) -> Tensor:
    """[T] int64 position of each of this rank's tokens inside its whole document (as on one device), on the device
    of the boundaries."""
    from deltapack.ops.varlen import positions

    return positions(shard.global_bounds.segments).index_select(0, shard.local_index)


# ---------------------------------------------------------------------------------------------- causal conv1d
@functools.cache
def _halo_builder(keep: int) -> Any:
    """The segments of this rank's parts, each behind ``keep`` rows for the tokens before it (see
    :func:`_conv_reference`): rows that belong to no document of the part form a document of their own."""

    def build(segments: ShardSegments) -> Segments:
        offsets, base = [0], 0
        for part in segments.shard.parts:
            valid = min(keep, part.context_before)
            if keep > valid:
                offsets.append(base + keep - valid)
            offsets.extend(base + keep + p for p in part.pieces[1:])
            base += keep + part.length
        return Segments.from_cu_seqlens(offsets, segments.device)

    return build


def _conv_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None, *, segments: ShardSegments
) -> torch.Tensor:
    """The exact conv over this rank's tokens: one all-gather of each part's last W - 1 tokens (module docstring)."""
    shard = segments.shard
    keep = weight.shape[-1] - 1
    if keep == 0 or not shard.crosses_ranks:
        return reference.causal_conv1d_ref(x, weight, bias, activation, segments=segments.pieces)

    parts, part_len = shard.parts, shard.part_len
    halos = tokens_before_parts(x, keep, shard)
    pieces, keep_rows, base = [], [], 0
    for i in range(len(parts)):
        pieces += [halos[i], x[0, i * part_len : (i + 1) * part_len]]
        keep_rows.append(torch.arange(base + keep, base + keep + part_len, device=x.device))
        base += keep + part_len
    extended = torch.cat(pieces).unsqueeze(0)
    halo_segments = segments.plan(_halo_builder(keep))
    out = reference.causal_conv1d_ref(extended, weight, bias, activation, segments=halo_segments)
    return out.index_select(1, torch.cat(keep_rows))


def _verify_fla_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None, *, segments: ShardSegments
) -> tuple[bool, str]:
    ok, why = fla.verify_causal_conv1d(x, weight, bias, activation, segments=segments.pieces)
    keep = weight.shape[-1] - 1
    if ok and segments.shard.part_len < keep:
        ok, why = (
            False,
            f"parts of {segments.shard.part_len} tokens; FLA's context-parallel conv takes >= W - 1 = {keep}",
        )
    return (ok, why) if not ok else _fla_takes(segments.shard)


def _fla_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None, *, segments: ShardSegments
) -> torch.Tensor:
    context, chunk_indices = _fla_plan(segments, weight.shape[-1], x.device)
    return fla.causal_conv1d_cp(x, weight, bias, activation, cp_context=context, chunk_indices=chunk_indices)


def _load(fn: Any) -> Any:
    def load() -> Any:
        fla.kernels()
        from fla.ops.cp import build_cp_context  # noqa: F401

        return fn

    return load


_HINT = "install deltapack[gpu] on a CUDA machine or choose backend='reference'"
CONV = Op("context-parallel causal_conv1d", _conv_reference)
CONV.add_backend(Backend("fla", load=_load(_fla_conv), verify=_verify_fla_conv, package="fla", hint=_HINT))


def causal_conv1d(x: Tensor, weight: Tensor, *args: Any, shard: ContextShard, backend: str | None = None) -> Tensor:
    """Depthwise causal conv1d over this rank's tokens, reading the tokens a cut document has on earlier ranks.

    Args:
        x: [1, T, D] this rank's stream (local-buffer order). weight: [D, W].
        args: bias ([D] or None) and activation (None or "silu"), as the public op takes them.
        shard: this rank's :class:`ContextShard`.
        backend: "reference", "fla" or None (automatic).

    Returns:
        [1, T, D] in the dtype of x: equal to the conv over the whole stream, restricted to this rank's tokens.
    """
    _check_stream("x", x, shard)
    return CONV.run(x, weight, *args, segments=shard.local.segments, backend=backend)


# ---------------------------------------------------------------------------------------------- gated delta rule
def _compose_chain(hm: torch.Tensor, shard: ContextShard, head_v: int) -> torch.Tensor:
    """[C, Hv, K, V + K] per-part [H | M] (along the chain) -> [C, Hv, K, V] the state entering each part."""
    states = []
    zeros = hm.new_zeros(hm.shape[1:-1] + (head_v,))
    for c, part in enumerate(shard.chain):
        if part.parts_before == 0:
            states.append(zeros)
        elif part.parts_before == 1:  # the previous part holds the start of the document
            states.append(hm[c - 1, ..., :head_v])
        else:  # the previous part lies wholly inside the document: its state enters it and goes on
            states.append(hm[c - 1, ..., head_v:] @ states[c - 1] + hm[c - 1, ..., :head_v])
    return torch.stack(states)


def _gated_delta_rule_reference(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, segments: ShardSegments, **options: Any
) -> tuple[Tensor, None]:
    """The exact rule over this rank's tokens: one all-gather of per-part state transitions (module docstring)."""
    shard, pieces = segments.shard, segments.pieces
    if not shard.crosses_ranks:
        o, _ = reference.gated_delta_rule_ref(q, k, v, g, beta, segments=pieces, **options)
        return o, None

    num_v_heads, head_v = v.shape[-2:]
    head_k = q.shape[-1]
    num_pieces = pieces.num_docs
    # K extra value columns, zero input, identity start: their final state is M, their output R_t = P_t^T q_t
    v_aug = torch.cat([v.float(), v.new_zeros(*v.shape[:-1], head_k, dtype=torch.float32)], dim=-1)
    eye = torch.eye(head_k, device=q.device).expand(num_pieces, num_v_heads, head_k, head_k)
    start = torch.cat([eye.new_zeros(num_pieces, num_v_heads, head_k, head_v), eye], dim=-1)
    out, final = reference.gated_delta_rule_ref(
        q.float(),
        k.float(),
        v_aug,
        g.float(),
        beta.float(),
        segments=pieces,
        initial_state=start,
        output_final_state=True,
        **options,
    )
    o, response = out[..., :head_v], out[..., head_v:]  # [1, T, Hv, V], [1, T, Hv, K]

    # [H | M] of the piece that ends each local part, gathered from every rank and put along the chain
    piece_of_part_end = [shard.parts[0].num_pieces - 1]
    if len(shard.parts) == 2:
        piece_of_part_end.append(num_pieces - 1)
    hm_local = final.index_select(0, torch.tensor(piece_of_part_end, device=q.device))  # [slots, Hv, K, V + K]
    gathered = all_gather(hm_local, shard.group, shard.world_size)
    hm = gathered.reshape(-1, *hm_local.shape[1:]).index_select(0, _chain_order(shard, q.device))
    entering = _compose_chain(hm, shard, head_v).index_select(0, _my_chains(shard, q.device))  # [slots, Hv, K, V]

    rows, part_len = [], shard.part_len
    for i, part in enumerate(shard.parts):
        lo, first_end = i * part_len, i * part_len + part.pieces[1]
        carried = torch.einsum("thk,hkv->thv", response[0, lo:first_end], entering[i])
        rows += [o[0, lo:first_end] + carried, o[0, first_end : lo + part_len]]
    return torch.cat(rows).unsqueeze(0).to(q.dtype), None


def _verify_fla_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, segments: ShardSegments, **options: Any
) -> tuple[bool, str]:
    ok, why = fla.verify_gated_delta_rule(q, k, v, g, beta, segments=segments.pieces)
    return (ok, why) if not ok else _fla_takes(segments.shard)


def _fla_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, segments: ShardSegments, **options: Any
) -> tuple[Tensor, None]:
    context, chunk_indices = _fla_plan(segments, None, q.device)
    return fla.gated_delta_rule_cp(q, k, v, g, beta, cp_context=context, chunk_indices=chunk_indices, **options), None


GATED_DELTA_RULE = Op("context-parallel gated_delta_rule", _gated_delta_rule_reference)
GATED_DELTA_RULE.add_backend(
    Backend("fla", load=_load(_fla_gated_delta_rule), verify=_verify_fla_gated_delta_rule, package="fla", hint=_HINT)
)


def gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, shard: ContextShard, **options: Any
) -> tuple[Tensor, None]:
    """Gated delta rule over this rank's tokens, with the state of a cut document handed over from earlier ranks.

    Args:
        q, k: [1, T, Hk, K]. v: [1, T, Hv, V]. g: [1, T, Hv] log-decay. beta: [1, T, Hv].
        shard: this rank's :class:`ContextShard`.
        options: ``scale``, ``use_qk_l2norm`` as in the reference; ``backend``: "reference", "fla" or None (automatic).

    Returns:
        (o [1, T, Hv, V] in the dtype of q, None): equal to the rule over the whole stream on this rank's tokens.
        Final states are not returned under context parallelism.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_stream(name, t, shard)
    return GATED_DELTA_RULE.run(q, k, v, g, beta, segments=shard.local.segments, **options)


# ---------------------------------------------------------------------------------------------- from the public ops
def _run_gated_delta_rule(
    shard: ContextShard,
    *args: torch.Tensor,
    backend: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if initial_state is not None or output_final_state:
        raise ValueError(
            "deltapack: gated_delta_rule with an initial state or output_final_state under context parallelism; "
            "expected neither (states are handed across ranks inside the op)"
        )
    return gated_delta_rule(*args, shard=shard, backend=backend, **kwargs)


def _run_causal_conv1d(shard: ContextShard, *args: Any, backend: str | None = None, **kwargs: Any) -> torch.Tensor:
    return causal_conv1d(*args, shard=shard, backend=backend, **kwargs)


def _run_token_shift(shard: ContextShard, x: Tensor, *, backend: str | None = None) -> Tensor:
    """token_shift on this rank's tokens: a part whose first document started earlier reads that document's token
    before the part (one halo exchange); zeros at every document start."""
    _check_stream("x", x, shard)
    halos, part_len = tokens_before_parts(x, 1, shard), shard.part_len
    rows = [t for i in range(len(shard.parts)) for t in (halos[i], x[0, i * part_len : (i + 1) * part_len - 1])]
    cut = set(shard.local_cu_seqlens_host[:-1]) - {
        i * part_len for i, part in enumerate(shard.parts) if part.context_before > 0
    }
    starts = torch.tensor(sorted(cut), dtype=torch.long, device=x.device)
    return torch.cat(rows).unsqueeze(0).index_fill(1, starts, 0)


CONTEXT_PARALLEL_OPS = {
    "causal_conv1d": _run_causal_conv1d,
    "gated_delta_rule": _run_gated_delta_rule,
    "token_shift": _run_token_shift,
    # the exchanges themselves, for a layer below this package that needs them (zaya's grouped conv)
    "tokens_before_parts": lambda shard, x, keep, backend=None: tokens_before_parts(x, keep, shard),
    "in_document_positions": lambda shard, backend=None: in_document_positions(shard),
}


def run(op: str, segments: ShardSegments, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
    """Op ``op`` of :mod:`deltapack.ops` on one rank's shard (what :meth:`ShardSegments.run_op` calls).

    Raises:
        ValueError: for an op with no context-parallel version (it would treat the pieces of documents cut by rank
            boundaries as whole documents).
    """
    if op not in CONTEXT_PARALLEL_OPS:
        raise ValueError(
            f"deltapack: {op} has no context-parallel version; expected one of {sorted(CONTEXT_PARALLEL_OPS)} under "
            "context parallelism (or run the model on one device)"
        )
    return CONTEXT_PARALLEL_OPS[op](segments.shard, *args, backend=backend, **kwargs)
