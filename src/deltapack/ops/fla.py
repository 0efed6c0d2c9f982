"""FLA Triton kernels behind deltapack's two varlen primitives (CUDA only).

Importable everywhere: without FLA (or without CUDA) ``AVAILABLE`` is False and :mod:`deltapack.ops.dispatch` keeps
the reference. The functions here take the arguments of the public primitives in ``dispatch`` and return the same
shapes and dtypes.

What runs, and why it is exact per document:

- conv: FLA's varlen ``causal_conv1d`` (Triton). Every 64-token chunk loads only taps inside its own document, so a
  document's outputs and gradients do not depend on its neighbours.
- gated delta rule (bf16 / fp16; fp32 runs the exact reference): FLA's ``chunk_gated_delta_rule`` with
  ``cu_seqlens``: the state starts at zero for every document, with native grouped value heads (q and k stay at
  Hk heads, v at Hv = r * Hk). The q/k L2 norm runs in the kernel (``use_qk_l2norm_in_kernel``), as the
  transformers layers call it on GPU; beta's sigmoid and the decay stay outside, in PyTorch, as the model computes
  them: FLA's in-kernel sigmoid returns fp32 where the model rounds beta to the activation dtype, and its in-kernel
  gate uses its own softplus, so either would change the arithmetic for a saving of a few microseconds per layer.

Per batch, the index tensors FLA needs (``chunk_indices`` for 64-token chunks, the offsets on the host) are built
once from the boundaries' host offsets, on the device without any host sync, and kept in the batch's
``Boundaries.cache``; every layer reuses them.

Launch-grid limit: FLA launches one program per 64-token chunk along grid axis y, which CUDA caps at 65535. A
stream with more chunks than that (many tiny documents: every document is at least one chunk) is split at
document boundaries into calls of at most :data:`MAX_CHUNKS_PER_CALL` chunks each.

Legend: T = tokens of the packed stream, D = conv channels, W = conv width, N = documents, Hk / Hv = key / value
heads, K / V = head dims.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deltapack.ops import reference

try:  # FLA is an optional extra (deltapack[gpu]); its import also needs triton
    from fla.modules.causal_conv1d import causal_conv1d as _fla_causal_conv1d
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk_gated_delta_rule

    AVAILABLE = torch.cuda.is_available()
except Exception:  # noqa: BLE001 - any import failure means: not available, use the reference
    _fla_causal_conv1d = _fla_chunk_gated_delta_rule = None
    AVAILABLE = False

__all__ = [
    "AVAILABLE",
    "CHUNK",
    "MAX_CHUNKS_PER_CALL",
    "causal_conv1d",
    "causal_conv1d_cp",
    "chunk_indices",
    "gated_delta_rule",
    "gated_delta_rule_cp",
    "prepare",
    "runs_causal_conv1d",
    "runs_gated_delta_rule",
]

CHUNK = 64  # FLA's chunk length for both kernels (the conv's BT and the delta rule's chunk_size)
MAX_CHUNKS_PER_CALL = 65535  # CUDA's grid-axis-y limit; FLA puts the chunk index there
_MAX_HEAD_DIM = 256  # FLA's state kernels support K, V <= 256
_ACTIVATIONS = (None, "silu", "swish")
_FAST_DTYPES = (torch.bfloat16, torch.float16)  # for the delta rule; the conv accumulates in fp32 for any dtype
_CACHE_KEY = "fla"


@dataclass(frozen=True)
class _Part:
    """One kernel call: documents ``docs`` of the stream, tokens ``start:end``.

    cu_seqlens: [n + 1] int32 on the device, offsets relative to ``start``; cu_seqlens_cpu: the same on the host
    (int64, as FLA takes it); chunk_indices: [chunks, 2] (document, chunk within it), dtype of cu_seqlens.
    """

    start: int
    end: int
    cu_seqlens: torch.Tensor
    cu_seqlens_cpu: torch.Tensor
    chunk_indices: torch.Tensor


@dataclass(frozen=True)
class _Plan:
    host: tuple[int, ...]
    parts: tuple[_Part, ...]


def chunk_indices(cu_seqlens: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """[chunks, 2] (document, chunk index inside it) on the device of ``cu_seqlens``, without a host sync."""
    chunks = sum(-(-n // CHUNK) for n in lengths)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    counts = (lens + CHUNK - 1) // CHUNK
    docs = torch.arange(len(lengths), device=cu_seqlens.device)
    doc_of_chunk = docs.repeat_interleave(counts, output_size=chunks)
    first = counts.cumsum(0) - counts
    within = torch.arange(chunks, device=cu_seqlens.device) - first[doc_of_chunk]
    return torch.stack([doc_of_chunk, within], 1).to(cu_seqlens.dtype)


def _split_points(host: Sequence[int], max_chunks: int) -> list[int]:
    """Document indices where the stream is cut so that no call has more than ``max_chunks`` chunks."""
    cuts, acc = [0], 0
    for i, (a, b) in enumerate(zip(host[:-1], host[1:])):
        need = -(-(b - a) // CHUNK)
        if need > max_chunks:
            raise ValueError(
                f"deltapack: a document of {b - a} tokens needs {need} chunks of {CHUNK}; expected at most "
                f"{max_chunks} ({max_chunks * CHUNK} tokens per document) for the FLA kernels"
            )
        if acc + need > max_chunks:
            cuts.append(i)
            acc = 0
        acc += need
    cuts.append(len(host) - 1)
    return cuts


def prepare(cu_seqlens: torch.Tensor, cu_seqlens_host: Sequence[int], cache: dict[str, Any] | None = None) -> _Plan:
    """The per-batch FLA index tensors for these offsets, built once and kept in ``cache`` (a Boundaries.cache).

    Args:
        cu_seqlens: [N + 1] int32 document offsets on the device. cu_seqlens_host: the same as host ints.
        cache: the batch's scratch dict, or None (then nothing is kept).
    """
    host = tuple(int(c) for c in cu_seqlens_host)
    if cache is not None:
        plan = cache.get(_CACHE_KEY)
        if plan is not None and (plan.host is host or plan.host == host):
            return plan
    cuts = _split_points(host, MAX_CHUNKS_PER_CALL)
    parts = []
    for first, last in zip(cuts[:-1], cuts[1:]):
        start, end = host[first], host[last]
        cu = cu_seqlens if len(cuts) == 2 else cu_seqlens[first : last + 1] - start
        rel = [c - start for c in host[first : last + 1]]
        lengths = [b - a for a, b in zip(rel[:-1], rel[1:])]
        cu_cpu = torch.tensor(rel, dtype=torch.long)
        parts.append(_Part(start, end, cu, cu_cpu, chunk_indices(cu, lengths)))
    plan = _Plan(host, tuple(parts))
    if cache is not None:
        cache[_CACHE_KEY] = plan
    return plan


def _host_offsets(cu_seqlens: torch.Tensor, cu_seqlens_host: Sequence[int] | None) -> Sequence[int]:
    # a caller without host offsets pays one sync here; the patched model always passes them
    return cu_seqlens_host if cu_seqlens_host is not None else cu_seqlens.tolist()


def _slices(plan: _Plan, *tensors: torch.Tensor | None) -> list[tuple[_Part, list[torch.Tensor | None]]]:
    if len(plan.parts) == 1:
        return [(plan.parts[0], list(tensors))]
    return [(p, [None if t is None else t[:, p.start : p.end] for t in tensors]) for p in plan.parts]


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    *,
    cu_seqlens: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens_host: Sequence[int] | None = None,
    cache: dict[str, Any] | None = None,
) -> torch.Tensor:
    """FLA varlen depthwise causal conv1d. x: [1, T, D] -> [1, T, D] in the dtype of x (see dispatch)."""
    if not runs_causal_conv1d(activation):
        return reference.causal_conv1d_ref(x, weight, bias, activation, seq_idx=seq_idx)
    plan = prepare(cu_seqlens, _host_offsets(cu_seqlens, cu_seqlens_host), cache)
    outs = []
    for part, (xs,) in _slices(plan, x):
        y, _ = _fla_causal_conv1d(
            xs,
            weight,
            bias,
            activation=activation,
            cu_seqlens=part.cu_seqlens,
            cu_seqlens_cpu=part.cu_seqlens_cpu,
            chunk_indices=part.chunk_indices,
        )
        outs.append(y)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def runs_causal_conv1d(activation: str | None) -> bool:
    """Whether FLA's conv takes this activation (it fuses silu only; anything else runs the exact reference)."""
    return activation in _ACTIVATIONS


def runs_gated_delta_rule(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether FLA's delta rule takes these inputs (else the exact reference runs).

    fp32 takes the reference: FLA's fp32 path failed our fp32 checks on an H200 (1e-3 against the reference, 1e-5
    packed vs alone on the tiny models); its Triton dots default to tf32, the likely cause.
    """
    return q.shape[-1] <= _MAX_HEAD_DIM and v.shape[-1] <= _MAX_HEAD_DIM and q.dtype in _FAST_DTYPES


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor,
    cu_seqlens_host: Sequence[int] | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    output_final_state: bool = False,
    cache: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FLA chunked gated delta rule, state reset per document (arguments and results as in dispatch)."""
    if not runs_gated_delta_rule(q, v):
        return reference.gated_delta_rule_ref(
            q,
            k,
            v,
            g,
            beta,
            cu_seqlens=cu_seqlens,
            cu_seqlens_host=cu_seqlens_host,
            scale=scale,
            use_qk_l2norm=use_qk_l2norm,
            output_final_state=output_final_state,
        )
    plan = prepare(cu_seqlens, _host_offsets(cu_seqlens, cu_seqlens_host), cache)
    outs, finals = [], []
    for part, (qs, ks, vs, gs, bs) in _slices(plan, q, k, v, g, beta):
        o, final = _fla_chunk_gated_delta_rule(
            qs,
            ks,
            vs,
            gs,
            bs,
            scale=scale,
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm,
            cu_seqlens=part.cu_seqlens,
            cu_seqlens_cpu=part.cu_seqlens_cpu,
            chunk_indices=part.chunk_indices,
        )
        outs.append(o)
        finals.append(final)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    final = None if not output_final_state else (finals[0] if len(finals) == 1 else torch.cat(finals, dim=0))
    return o, final


# ---------------------------------------------------------------------------------------------- context parallelism
# FLA's document-aware context parallelism (``fla.ops.cp``): the caller builds one ``FLACPContext`` per batch (this
# rank's pieces, how many ranks the first and last document span) with ``build_cp_context`` and passes it here; the
# conv exchanges the W - 1 tail tokens of a document cut by a rank boundary, the delta rule one all-gather of per-rank
# state transitions. deltapack.distributed.ops decides when these run and keeps the context in the batch's cache.
def causal_conv1d_cp(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    *,
    cp_context: Any,
    chunk_indices: torch.Tensor,
) -> torch.Tensor:
    """FLA's context-parallel conv. x: [1, T_local, D] this rank's tokens -> [1, T_local, D] in the dtype of x."""
    y, _ = _fla_causal_conv1d(
        x, weight, bias, activation=activation, cp_context=cp_context, chunk_indices=chunk_indices
    )
    return y


def gated_delta_rule_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    cp_context: Any,
    chunk_indices: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """FLA's context-parallel chunked delta rule over this rank's tokens (shapes as in :func:`gated_delta_rule`;
    bf16 / fp16 only, see :func:`runs_gated_delta_rule`). Returns o [1, T_local, Hv, V]."""
    o, _ = _fla_chunk_gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
        cp_context=cp_context,
        chunk_indices=chunk_indices,
    )
    return o
