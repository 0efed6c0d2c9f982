"""FLA Triton kernels behind deltapack's GDN ops (CUDA only): the ``fla`` backend of ``causal_conv1d`` and
``gated_delta_rule``, each with its verifier (:mod:`deltapack.ops.dispatch` decides with them).

Importable everywhere: FLA itself is imported on first use (``load``), and the verifiers refuse inputs off CUDA
before that. ``AVAILABLE`` says whether FLA is installed on a machine with CUDA (for skipping GPU tests).

What runs, and why it is exact per document:

- conv: FLA's varlen ``causal_conv1d`` (Triton). Every 64-token chunk loads only taps inside its own document, so a
  document's outputs and gradients do not depend on its neighbours. Any dtype; silu or no activation.
- gated delta rule (bf16 / fp16, head dims <= 256; anything else runs the exact reference, and the log says why):
  FLA's ``chunk_gated_delta_rule`` with ``cu_seqlens``: the state starts at zero for every document, with native
  grouped value heads (q and k stay at Hk heads, v at Hv = r * Hk). The q/k L2 norm runs in the kernel
  (``use_qk_l2norm_in_kernel``), as the transformers layers call it on GPU; beta's sigmoid and the decay stay
  outside, in PyTorch, as the model computes them: FLA's in-kernel sigmoid returns fp32 where the model rounds beta
  to the activation dtype, and its in-kernel gate uses its own softplus, so either would change the arithmetic for a
  saving of a few microseconds per layer.

Per batch, the index tensors FLA needs (``chunk_indices`` for 64-token chunks, the offsets on the host) are built
once from the segments' host offsets, on the device without any host sync, as the segments' plan
(:func:`plan_of`); every layer reuses them.

Launch-grid limit: FLA launches one program per 64-token chunk along grid axis y, which CUDA caps at 65535. A
stream with more chunks than that (many tiny documents: every document is at least one chunk) is split at
document boundaries into calls of at most :data:`MAX_CHUNKS_PER_CALL` chunks each.

Legend: T = tokens of the packed stream, D = conv channels, W = conv width, N = documents, Hk / Hv = key / value
heads, K / V = head dims.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from deltapack.ops.dispatch import fla_backend
from deltapack.ops.segments import Segments, chunk_indices

__all__ = [
    "AVAILABLE",
    "CHUNK",
    "CONV_BACKEND",
    "GATED_DELTA_RULE_BACKEND",
    "MAX_CHUNKS_PER_CALL",
    "causal_conv1d_cp",
    "chunk_indices",
    "gated_delta_rule_cp",
    "kernels",
    "plan_of",
]

AVAILABLE = torch.cuda.is_available() and importlib.util.find_spec("fla") is not None
CHUNK = 64  # FLA's chunk length for both kernels (the conv's BT and the delta rule's chunk_size)
MAX_CHUNKS_PER_CALL = 65535  # CUDA's grid-axis-y limit; FLA puts the chunk index there
MAX_HEAD_DIM = 256  # FLA's state kernels support K, V <= 256
ACTIVATIONS = (None, "silu", "swish")
FAST_DTYPES = (torch.bfloat16, torch.float16)  # for the delta rule; the conv accumulates in fp32 for any dtype


@functools.cache
def kernels() -> SimpleNamespace:
    """FLA's kernels (imported once; raises whatever the import raises)."""
    from fla.modules.causal_conv1d import causal_conv1d
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return SimpleNamespace(causal_conv1d=causal_conv1d, chunk_gated_delta_rule=chunk_gated_delta_rule)


def on_cuda(x: torch.Tensor) -> bool:
    """Whether ``x`` is where FLA's kernels run (a function, so tests can stand in for a GPU)."""
    return x.is_cuda


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
class Plan:
    """FLA's per-batch index tensors: one :class:`_Part` per kernel call (one unless the grid limit splits)."""

    parts: tuple[_Part, ...]


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


def build_plan(segments: Segments) -> Plan:
    host = segments.cu_seqlens_host
    cuts = _split_points(host, MAX_CHUNKS_PER_CALL)
    if len(cuts) == 2:
        cu_cpu = torch.tensor(host, dtype=torch.long)
        part = _Part(0, host[-1], segments.cu_seqlens, cu_cpu, segments.chunk_indices(CHUNK))
        return Plan((part,))
    parts = []
    for first, last in zip(cuts[:-1], cuts[1:]):
        start, end = host[first], host[last]
        cu = segments.cu_seqlens[first : last + 1] - start
        rel = [c - start for c in host[first : last + 1]]
        lengths = [b - a for a, b in zip(rel[:-1], rel[1:])]
        parts.append(_Part(start, end, cu, torch.tensor(rel, dtype=torch.long), chunk_indices(cu, lengths, CHUNK)))
    return Plan(tuple(parts))


def plan_of(segments: Segments) -> Plan:
    """The FLA index tensors of these segments, built once per batch (on the device, without a host sync)."""
    return segments.plan(build_plan)


def _too_long(segments: Segments) -> str:
    """Why the longest document does not fit one kernel call, or ''."""
    need = -(-segments.max_seqlen // CHUNK)
    if need <= MAX_CHUNKS_PER_CALL:
        return ""
    return (
        f"a document of {segments.max_seqlen} tokens needs {need} chunks of {CHUNK}; FLA's kernels take at most "
        f"{MAX_CHUNKS_PER_CALL} ({MAX_CHUNKS_PER_CALL * CHUNK} tokens per document)"
    )


def _slices(plan: Plan, *tensors: torch.Tensor) -> list[tuple[_Part, list[torch.Tensor]]]:
    if len(plan.parts) == 1:
        return [(plan.parts[0], list(tensors))]
    return [(p, [t[:, p.start : p.end] for t in tensors]) for p in plan.parts]


def verify_chunked(q: Tensor, k: Tensor, v: Tensor, segments: Segments, kernel: str) -> tuple[bool, str]:
    """Whether FLA's chunked ``kernel`` (one call over the whole stream) keeps these inputs within bounds: CUDA, q, k
    and v all bf16 / fp16 (fp32 takes the reference, as for the delta rule: FLA's Triton dots default to tf32), head
    dims up to :data:`MAX_HEAD_DIM`, at most :data:`MAX_CHUNKS_PER_CALL` chunks of :data:`CHUNK` tokens."""
    if not q.is_cuda:
        return False, f"q is on {q.device.type}; FLA runs on CUDA"
    if q.dtype not in FAST_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False, f"q, k, v are {q.dtype}, {k.dtype}, {v.dtype}; {kernel} is within bounds for bf16 / fp16"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return False, f"head dims {q.shape[-1]}, {v.shape[-1]}; {kernel} takes at most {MAX_HEAD_DIM}"
    chunks = sum(-(-n // CHUNK) for n in segments.doc_lengths)
    if chunks > MAX_CHUNKS_PER_CALL:
        return False, f"{chunks} chunks of {CHUNK} tokens; FLA launches at most {MAX_CHUNKS_PER_CALL} per call"
    return True, ""


# ---------------------------------------------------------------------------------------------- causal conv1d
def verify_causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None, *, segments: Segments
) -> tuple[bool, str]:
    """Whether FLA's conv keeps these inputs exact (arguments of :func:`deltapack.ops.causal_conv1d`)."""
    if not on_cuda(x):
        return False, f"x is on {x.device.type}; FLA's kernels run on CUDA"
    if activation not in ACTIVATIONS:
        return False, f"activation {activation!r}; FLA's conv fuses silu or none"
    too_long = _too_long(segments)
    return not too_long, too_long


def _causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None, *, segments: Segments
) -> Tensor:
    """FLA varlen depthwise causal conv1d. x: [1, T, D] -> [1, T, D] in the dtype of x."""
    conv = kernels().causal_conv1d
    outs = []
    for part, (xs,) in _slices(plan_of(segments), x):
        y, _ = conv(
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


def _load(fn: Callable[..., Any]) -> Callable[[], Callable[..., Any]]:
    def load() -> Callable[..., Any]:
        kernels()
        return fn

    return load


CONV_BACKEND = fla_backend(_load(_causal_conv1d), verify_causal_conv1d)


# ---------------------------------------------------------------------------------------------- gated delta rule
def verify_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, segments: Segments, **options: Any
) -> tuple[bool, str]:
    """Whether FLA's chunked delta rule keeps these inputs exact (arguments of
    :func:`deltapack.ops.gated_delta_rule`).

    fp32 takes the reference: FLA's fp32 path failed deltapack's fp32 checks on a GPU (figures in
    ``benchmarks/RESULTS.md``); its Triton dots default to tf32, the likely cause.
    """
    if not on_cuda(q):
        return False, f"q is on {q.device.type}; FLA's kernels run on CUDA"
    if q.dtype not in FAST_DTYPES:
        return False, f"q is {q.dtype}; FLA's delta rule is exact to our checks in bf16 / fp16 only"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return False, f"head dims K={q.shape[-1]}, V={v.shape[-1]}; FLA's state kernels take at most {MAX_HEAD_DIM}"
    if options.get("initial_state") is not None:
        return False, "an initial state; deltapack checks FLA's delta rule from zero states only"
    too_long = _too_long(segments)
    return not too_long, too_long


def _gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, segments: Segments, **options: Any
) -> tuple[Tensor, Tensor | None]:
    """FLA chunked gated delta rule, state reset per document (arguments and results as the public op; the
    verifier has seen to ``initial_state`` being None)."""
    rule = kernels().chunk_gated_delta_rule
    output_final_state = options.get("output_final_state", False)
    outs, finals = [], []
    for part, (qs, ks, vs, gs, bs) in _slices(plan_of(segments), q, k, v, g, beta):
        o, final = rule(
            qs,
            ks,
            vs,
            gs,
            bs,
            scale=options.get("scale"),
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=options.get("use_qk_l2norm", True),
            cu_seqlens=part.cu_seqlens,
            cu_seqlens_cpu=part.cu_seqlens_cpu,
            chunk_indices=part.chunk_indices,
        )
        outs.append(o)
        finals.append(final)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    final = None if not output_final_state else (finals[0] if len(finals) == 1 else torch.cat(finals, dim=0))
    return o, final


GATED_DELTA_RULE_BACKEND = fla_backend(_load(_gated_delta_rule), verify_gated_delta_rule)


# ---------------------------------------------------------------------------------------------- context parallelism
# FLA's document-aware context parallelism (``fla.ops.cp``): the caller builds one ``FLACPContext`` per batch (this
# rank's pieces, how many ranks the first and last document span) with ``build_cp_context`` and passes it here; the
# conv exchanges the W - 1 tail tokens of a document cut by a rank boundary, the delta rule one all-gather of per-rank
# state transitions. deltapack.distributed.ops decides when these run and keeps the context as the shard's plan.
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
    y, _ = kernels().causal_conv1d(
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
    bf16 / fp16 only, see :func:`verify_gated_delta_rule`). Returns o [1, T_local, Hv, V]."""
    o, _ = kernels().chunk_gated_delta_rule(
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
