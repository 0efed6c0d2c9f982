"""Every op as one opaque node of a ``torch.compile`` graph: no graph break, no recompilation per batch.

Inside a compiled region, a public op (:func:`deltapack.ops.dispatch.public_function`) does not trace its backend
choice, its checks or its kernels: those read host offsets, loop over documents or chunks, log, and would break
the graph or bake one batch's document lengths into it. It calls the custom op ``deltapack::op`` instead, whose
inputs are the op's tensors and the segments' three tensors (``cu_seqlens``, ``seq_idx``, the CPU offsets
``cu_seqlens_cpu``), so the graph is the same for every split of the same tokens. Its implementation runs the
public op eagerly (the same dispatch, checks and backends as without compile) on the batch's :class:`Segments`,
rebuilt from the three tensors once per batch. Its shapes come from the op's ``meta`` function (``op.meta``: the
reference's signature, new empty tensors of the output's shapes, the number of documents read as
``segments.num_docs``).

The backward (``deltapack::op_backward``) reuses the forward's autograd graph. When the graph was traced with grad
mode on and a floating input that requires grad (a training graph; a constant of the node), the forward runs the
op under autograd and keeps that graph in a side table (a *tape*) under a handle, an extra int64 CPU output that
the backward receives: the backward pops the tape and runs ``torch.autograd.grad`` on it, so each op's forward
runs once per step, as in eager. The tape lives as long as the handle's storage (a graph freed without a backward,
an exception, an eval under grad mode free it); inference graphs keep nothing. The backward falls back to running
the op again under autograd (as activation checkpointing would) when there is no tape (a second backward with
``retain_graph``, ``DELTAPACK_OPAQUE_RECOMPUTE=1``) or when a buffer that the tape's graph saved may have been
reused by the compiled graph: a tensor the tape saved that shares memory with an input or output of the node must
reach the backward as the same memory (the compiled forward returned it for the backward, so its buffer was not
reused), else the tape is dropped.

The non-tensor arguments (scale, activation, flags, ``backend=``) are constants of the graph, written into the
node's ``key`` string (JSON) with the op's name, which a graph read back from torch's compile cache in a new
process looks up among the ops registered there.
"""

from __future__ import annotations

import array
import functools
import itertools
import json
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deltapack.ops.segments import Segments

__all__ = ["PUBLIC", "call", "delta_rule_outputs", "like", "like_first", "like_value", "register", "supports"]

# op name -> (what a node of the op runs eagerly: its public function, else the Op itself; the Op)
PUBLIC: dict[str, tuple[Callable[..., Any], Any]] = {}

# True: every backward runs its op's forward again (no tape kept between forward and backward: less memory, more
# compute, as activation checkpointing). Read when a forward node runs.
RECOMPUTE = os.environ.get("DELTAPACK_OPAQUE_RECOMPUTE", "0") == "1"


def register(fn: Callable[..., Any], op: Any) -> None:
    """Make ``fn`` (the public function of the :class:`~deltapack.ops.dispatch.Op` ``op``, or the Op) what a
    ``deltapack::op`` node naming ``op`` runs, eagerly: outside torch.compile ``fn`` takes its eager path."""
    PUBLIC[op.name] = (fn, op)


_CONSTANTS = (bool, int, float, str)


def like(position: int) -> Callable[..., Tensor]:
    """The meta of an op whose output has the shape and dtype of its positional argument ``position``."""

    def meta(*args: Any, **kwargs: Any) -> Tensor:
        return args[position].new_empty(args[position].shape)

    return meta


like_first = like(0)


def like_value(q: Tensor, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """The meta of an op of (q, k, v, ...) whose output has the shape of v and the dtype of q."""
    return v.new_empty(v.shape, dtype=q.dtype)


def delta_rule_outputs(
    q: Tensor, k: Tensor, v: Tensor, *args: Any, segments: Segments, output_final_state: bool = False, **kwargs: Any
) -> tuple[Tensor, Tensor | None]:
    """The meta of the delta rules (gated, KDA): o [1, T, Hv, V] in the dtype of q, and the final states
    [N, Hv, K, V] fp32 when asked for (else None)."""
    final = None
    if output_final_state:
        final = v.new_empty((segments.num_docs, v.shape[2], q.shape[3], v.shape[3]), dtype=torch.float32)
    return v.new_empty(v.shape, dtype=q.dtype), final


def _constant(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(isinstance(v, _CONSTANTS) for v in value)
    return value is None or isinstance(value, _CONSTANTS)


def supports(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether these arguments can cross the custom op: tensors, None, constants and one plain :class:`Segments`
    (not a context-parallel shard, whose exchange runs collectives)."""
    segments = kwargs.get("segments")
    if not isinstance(segments, Segments) or segments.is_shard:
        return False
    values = [*args, *(v for k, v in kwargs.items() if k != "segments")]
    return all(isinstance(v, Tensor) or _constant(v) for v in values)


def call(name: str, meta: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The public op ``name`` on these arguments as one ``deltapack::op`` node (traced by dynamo).

    ``meta``: the op's meta function, traced here for the structure of the output (which leaves are None).
    """
    segments: Segments = kwargs["segments"]
    tensors: list[Tensor | None] = []
    # (position or keyword, "tensor" | "const" | "tuple", index or value)
    layout: list[tuple[str | int, str, Any]] = []
    named = [*enumerate(args), *((k, v) for k, v in kwargs.items() if k != "segments")]
    for where, value in named:
        if isinstance(value, Tensor):
            layout.append((where, "tensor", len(tensors)))
            tensors.append(value)
        else:
            layout.append((where, "tuple" if isinstance(value, tuple) else "const", value))
    key = _key(name, tuple(layout))
    structure = meta(*args, **kwargs)
    # a constant of the graph: dynamo guards on grad mode and on requires_grad, so this graph runs only where a
    # backward may follow (a training graph) or where none can (an inference graph)
    tape = torch.is_grad_enabled() and any(t is not None and t.requires_grad and _floating(t) for t in tensors)
    outs = torch.ops.deltapack.op(key, tensors, segments.cu_seqlens, segments.seq_idx, segments.cu_seqlens_cpu, tape)
    return _unflatten(structure, iter(outs[:-1]))  # the last output is the tape's handle


@torch._dynamo.assume_constant_result
def _key(name: str, layout: tuple[tuple[str | int, str, Any], ...]) -> str:
    return json.dumps({"op": name, "layout": [list(x) for x in layout]})


@functools.cache
def _decode(key: str) -> tuple[Callable[..., Any], Any, tuple[tuple[str | int, str, Any], ...]]:
    """(what the node runs, the Op, the argument layout) of a node's key."""
    spec = json.loads(key)
    if spec["op"] not in PUBLIC:  # a graph read from torch's compile cache before the op's module was imported
        raise RuntimeError(
            f"deltapack: a compiled graph calls the op {spec['op']!r}, which this process has not registered; "
            "expected deltapack.patch(model) (which imports the ops of its families) before running the graph"
        )
    fn, op = PUBLIC[spec["op"]]
    return fn, op, tuple(tuple(x) for x in spec["layout"])


def _arguments(
    layout: tuple[tuple[str | int, str, Any], ...], tensors: list[Tensor | None], segments: Segments
) -> tuple[list[Any], dict[str, Any]]:
    args: list[Any] = []
    kwargs: dict[str, Any] = {"segments": segments}
    for where, kind, value in layout:
        if kind == "tensor":
            value = tensors[value]
        elif kind == "tuple":
            value = tuple(value)
        if isinstance(where, int):
            args.append(value)
        else:
            kwargs[where] = value
    return args, kwargs


_SEGMENTS = "_deltapack_opaque_segments"  # on the CPU offsets tensor: the Segments rebuilt from it


def _segments(cu_seqlens: Tensor, seq_idx: Tensor, cu_seqlens_cpu: Tensor) -> Segments:
    """The batch's Segments for a node's three tensors: built on the first node of the batch, then the same object
    (with its per-batch plans) for every node, forward and backward, that gets the same CPU offsets tensor object
    and the same device tensors.

    It hangs on the CPU offsets tensor itself (an attribute: it lives and dies with that tensor, whose memory a new
    batch may reuse under a new tensor object) and holds an alias of it, not the tensor object, so no reference
    cycle keeps it alive."""
    found = getattr(cu_seqlens_cpu, _SEGMENTS, None)
    # the same memory (the backward may get an alias of seq_idx): the Segments holds its tensors, so no other tensor
    # can be in their memory while it lives
    if found is not None and (_where(found.cu_seqlens), _where(found.seq_idx)) == (_where(cu_seqlens), _where(seq_idx)):
        return found
    host = tuple(cu_seqlens_cpu.tolist())
    lengths = [b - a for a, b in zip(host[:-1], host[1:])]
    segments = Segments(cu_seqlens, host, seq_idx, max(lengths), cu_seqlens_cpu=cu_seqlens_cpu.detach())
    setattr(cu_seqlens_cpu, _SEGMENTS, segments)
    return segments


def _leaves(out: Any) -> list[Tensor]:
    """The tensors of an op's output (a tensor or a tuple of tensors and None), in order."""
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, Tensor)]


def _unflatten(structure: Any, outs: Any) -> Any:
    if isinstance(structure, (tuple, list)):
        return type(structure)(None if s is None else next(outs) for s in structure)
    return next(outs)


def _fresh(out: Tensor, inputs: list[Tensor | None]) -> Tensor:
    """A custom op's output may not alias its inputs, and its strides must be those of the meta's empty tensors."""
    if any(t is not None and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for t in inputs):
        return out.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


def _autograd_dispatch() -> Any:
    """Autograd back on inside a custom op's implementation (PyTorch runs it with autograd's dispatch keys excluded):
    the backward runs the op under autograd, and a backend's first-use check compares gradients too. Whether a graph
    is recorded is still up to grad mode (off in the forward)."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView):
        excluded = excluded - torch._C.DispatchKeySet(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


# ------------------------------------------------------------------ tapes: a forward's autograd graph for its backward
@dataclass(eq=False)
class _Tape:
    """What one forward node keeps for its backward: the op's inputs (detached, the floating ones requiring grad), its
    outputs (with their autograd graph), and ``shared``: (index in :func:`_visible`, where) of the node's tensors whose
    memory that graph saved, which the backward must get as the very same buffers."""

    inputs: list[Tensor | None]
    outputs: list[Tensor]
    shared: list[tuple[int, tuple[Any, ...]]]


_TAPES: dict[int, _Tape] = {}
_HANDLES = itertools.count(1)


def _handle(number: int) -> Tensor:
    """[1] int64 CPU tensor holding ``number``, whose memory is a Python buffer: once the last tensor on that memory
    is freed (the graph that saved the handle, the caller's outputs), the buffer dies and drops tape ``number``."""
    buffer = array.array("q", [number])
    if number:
        weakref.finalize(buffer, _TAPES.pop, number, None)
    return torch.frombuffer(buffer, dtype=torch.int64)


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _where(t: Tensor) -> tuple[Any, ...]:
    """The memory a tensor reads: (device, dtype, storage address, offset, shape, strides)."""
    return (t.device, t.dtype, _storage(t), t.storage_offset(), tuple(t.shape), t.stride())


def _visible(tensors: list[Tensor | None], segment_tensors: tuple[Tensor, ...], outputs: list[Tensor]) -> list[Tensor]:
    """The node's tensors the compiled graph owns (inputs, the segments' tensors, outputs), in a fixed order."""
    return [t for t in (*tensors, *segment_tensors, *outputs) if t is not None]


def _record(
    fn: Callable[..., Any], layout: Any, tensors: list[Tensor | None], segments: Segments
) -> tuple[_Tape, set[int]]:
    """The op run under autograd on detached inputs: its tape (``shared`` left for the caller) and the storage
    addresses of every tensor its graph saved."""
    saved: set[int] = set()

    def pack(t: Tensor) -> Tensor:
        saved.add(_storage(t))
        return t

    # our own hooks also keep those of an enclosing non-reentrant checkpoint from taking the op's saved tensors
    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack), torch.enable_grad():
        inputs = [t.detach().requires_grad_() if _floating(t) else t for t in tensors]
        args, kwargs = _arguments(layout, inputs, segments)
        outputs = _leaves(fn(*args, **kwargs))
    return _Tape(inputs, outputs, []), saved


def _unpack(t: Tensor) -> Tensor:
    return t


@torch.library.custom_op("deltapack::op", mutates_args=())
def _op(
    key: str, tensors: list[Tensor | None], cu_seqlens: Tensor, seq_idx: Tensor, cu_seqlens_cpu: Tensor, tape: bool
) -> list[Tensor]:
    """The op's outputs (fresh tensors) and the handle [1] int64 of its tape (0: none kept)."""
    fn, _, layout = _decode(key)
    segments = _segments(cu_seqlens, seq_idx, cu_seqlens_cpu)
    with _autograd_dispatch():
        if tape and not RECOMPUTE and torch._C._autograd._saved_tensors_hooks_is_enabled():
            kept, saved = _record(fn, layout, tensors, segments)
            outputs = [_fresh(t.detach(), tensors) for t in kept.outputs]
            visible = _visible(tensors, (cu_seqlens, seq_idx, cu_seqlens_cpu), outputs)
            kept.shared = [(i, _where(t)) for i, t in enumerate(visible) if _storage(t) in saved]
            number = next(_HANDLES)
            _TAPES[number] = kept
            return [*outputs, _handle(number)]
        args, kwargs = _arguments(layout, tensors, segments)
        return [*(_fresh(t, tensors) for t in _leaves(fn(*args, **kwargs))), _handle(0)]


@_op.register_fake
def _op_fake(
    key: str, tensors: list[Tensor | None], cu_seqlens: Tensor, seq_idx: Tensor, cu_seqlens_cpu: Tensor, tape: bool
) -> list[Tensor]:
    _, op, layout = _decode(key)
    shapes_only = Segments(cu_seqlens, (), seq_idx, 0, cu_seqlens_cpu=cu_seqlens_cpu)
    args, kwargs = _arguments(layout, tensors, shapes_only)
    # fresh contiguous tensors (new_empty), like _fresh's outputs; then the handle
    return [*_leaves(op.meta(*args, **kwargs)), cu_seqlens_cpu.new_empty((1,), dtype=torch.int64)]


@torch.library.custom_op("deltapack::op_backward", mutates_args=())
def _op_backward(
    key: str,
    tensors: list[Tensor | None],
    cu_seqlens: Tensor,
    seq_idx: Tensor,
    cu_seqlens_cpu: Tensor,
    outputs: list[Tensor],
    handle: Tensor,
    grads: list[Tensor | None],
) -> list[Tensor]:
    """The gradients of the op's floating-point tensor inputs, in order (zeros where an input does not reach the
    outputs): from the forward's tape when it is there and intact, else the op runs again under autograd."""
    kept = _TAPES.pop(int(handle[0]), None)
    if kept is not None:
        visible = _visible(tensors, (cu_seqlens, seq_idx, cu_seqlens_cpu), outputs)
        if any(_where(visible[i]) != where for i, where in kept.shared):
            kept = None  # a buffer the tape's graph saved may have been reused since: recompute
    with _autograd_dispatch(), torch.enable_grad():
        if kept is None:
            fn, _, layout = _decode(key)
            inputs = [t.detach().requires_grad_() if _floating(t) else t for t in tensors]
            args, kwargs = _arguments(layout, inputs, _segments(cu_seqlens, seq_idx, cu_seqlens_cpu))
            kept = _Tape(inputs, _leaves(fn(*args, **kwargs)), [])
        pairs = [(o, g) for o, g in zip(kept.outputs, grads) if g is not None and o.requires_grad]
        wanted = [t for t in kept.inputs if _floating(t)]
        found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
    return [
        torch.zeros_like(t, memory_format=torch.contiguous_format) if g is None else g.contiguous()
        for t, g in zip(wanted, found)
    ]


@_op_backward.register_fake
def _op_backward_fake(key: str, tensors: list[Tensor | None], *segments_outputs_grads: Any) -> list[Tensor]:
    """The gradients' shapes: one per floating-point input (the segments and incoming gradients do not matter)."""
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors if _floating(t)]


def _floating(t: Tensor | None) -> bool:
    return t is not None and t.is_floating_point()


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    key, tensors, cu_seqlens, seq_idx, cu_seqlens_cpu, _ = inputs
    ctx.key = key
    ctx.present = [t is not None for t in tensors]
    ctx.outputs = len(output) - 1
    # the outputs too: a buffer the tape's graph saved must stay the compiled graph's until the backward
    ctx.save_for_backward(*(t for t in tensors if t is not None), cu_seqlens, seq_idx, cu_seqlens_cpu, *output)


def _backward(ctx: Any, grads: list[Tensor | None]) -> tuple[Any, ...]:
    *saved, handle = ctx.saved_tensors
    given = iter(saved[: len(saved) - ctx.outputs - 3])
    cu_seqlens, seq_idx, cu_seqlens_cpu, *outputs = saved[len(saved) - ctx.outputs - 3 :]
    tensors = [next(given) if present else None for present in ctx.present]
    found = torch.ops.deltapack.op_backward(
        ctx.key, tensors, cu_seqlens, seq_idx, cu_seqlens_cpu, outputs, handle, list(grads[: ctx.outputs])
    )
    found = iter(found)
    per_input = [next(found) if _floating(t) else None for t in tensors]
    return None, per_input, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)
