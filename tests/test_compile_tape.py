"""Under torch.compile an op's forward runs once per training step: the backward of a ``deltapack::op`` node reuses
the autograd graph its forward kept (a tape), instead of running the op again. The tape is freed with the graph that
holds its handle (a backward, or the graph dropped without one); inference keeps none; a second backward with
``retain_graph`` recomputes; the batch's Segments is rebuilt once per batch, not per node.

Every count below is also checked against the recompute path (``opaque.RECOMPUTE``, the behaviour before tapes),
which runs each op twice per step: the counts can fail.
"""

from __future__ import annotations

import gc
from collections import Counter

import pytest
import torch

import deltapack
from deltapack.ops import opaque
from test_compile import _batch, _gdn_inputs, _model, _three_ops

OPS = ("causal_conv1d", "gated_delta_rule", "varlen_attention")
GRAD_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def runs(monkeypatch) -> Counter:
    """How many times each op of OPS runs eagerly (inside its node, forward or backward)."""
    counts: Counter = Counter()
    for name in OPS:
        fn, op = opaque.PUBLIC[name]

        def counted(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setitem(opaque.PUBLIC, name, (counted, op))
    opaque._decode.cache_clear()  # it caches what a key runs
    yield counts
    opaque._decode.cache_clear()


def _rel(got, want) -> float:
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(got, want))


@pytest.mark.parametrize("recompute", [False, True], ids=["tape", "recompute"])
def test_each_op_runs_once_per_compiled_step(runs, monkeypatch, recompute):
    """conv, gated delta rule and varlen attention compiled (fullgraph): gradients equal eager's, each op's forward
    runs once in a forward + backward (twice with the recompute path), and no tape is left after the backward."""
    monkeypatch.setattr(opaque, "RECOMPUTE", recompute)
    compiled = torch.compile(_three_ops, backend="aot_eager", fullgraph=True)
    inputs, segments = _gdn_inputs((30, 34, 6))
    want = torch.autograd.grad(_three_ops(*inputs, segments), inputs)
    compiled(*inputs, segments)  # compile (fake runs do not count, the first real run does)
    runs.clear()
    got = torch.autograd.grad(compiled(*inputs, segments), inputs)
    assert _rel(got, want) <= GRAD_RTOL
    assert runs == Counter({name: 2 if recompute else 1 for name in OPS}), runs
    assert not opaque._TAPES


def test_tapes_are_freed_without_a_backward_and_inference_keeps_none(runs):
    """A training graph's output dropped without a backward frees its tapes; no_grad runs (an inference graph) and
    inputs that need no gradient keep none."""
    compiled = torch.compile(_three_ops, backend="aot_eager", fullgraph=True)
    inputs, segments = _gdn_inputs((5, 60, 5))
    out = compiled(*inputs, segments)
    assert len(opaque._TAPES) == len(OPS)  # the test can fail: a training graph keeps one tape per node
    del out
    gc.collect()
    assert not opaque._TAPES
    with torch.no_grad():
        compiled(*inputs, segments)
    assert not opaque._TAPES
    compiled(*(t.detach() for t in inputs), segments)
    assert not opaque._TAPES


def test_retain_graph_recomputes_and_double_backward_raises(runs):
    """A second backward of the same graph finds no tape and recomputes (the same gradients); a double backward
    raises instead of returning a wrong second derivative."""
    compiled = torch.compile(_three_ops, backend="eager", fullgraph=True)  # aot_eager refuses retain_graph itself
    inputs, segments = _gdn_inputs((30, 34, 6))
    want = torch.autograd.grad(_three_ops(*inputs, segments), inputs)
    out = compiled(*inputs, segments)
    first = torch.autograd.grad(out, inputs, retain_graph=True)
    runs.clear()
    second = torch.autograd.grad(out, inputs)
    assert runs == Counter(dict.fromkeys(OPS, 1))  # recomputed once each
    assert _rel(first, want) <= GRAD_RTOL and _rel(second, want) <= GRAD_RTOL
    grads = torch.autograd.grad(compiled(*inputs, segments), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="op_backward"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)
    gc.collect()
    assert not opaque._TAPES


def test_a_saved_buffer_the_backward_does_not_get_is_recomputed(runs):
    """The tape's graph saved the conv's input; a backward that gets another buffer for it (as when the compiled
    graph recomputed that input and reused its memory) does not trust the tape: it recomputes, and is exact."""
    x = torch.randn(1, 20, 6, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    segments = deltapack.ops.Segments.from_cu_seqlens([0, 7, 20])
    key = opaque._key("causal_conv1d", ((0, "tensor", 0), (1, "tensor", 1), (2, "const", None), (3, "const", "silu")))
    parts = (segments.cu_seqlens, segments.seq_idx, segments.cu_seqlens_cpu)
    grad_y = torch.randn(1, 20, 6)
    want = torch.autograd.grad(deltapack.ops.causal_conv1d(x, w, None, "silu", segments=segments), (x, w), grad_y)
    for same, count in ((True, 1), (False, 2)):
        runs.clear()
        with torch.no_grad():
            y, handle = torch.ops.deltapack.op(key, [x, w], *parts, True)
        assert len(opaque._TAPES) == 1
        given = [x if same else x.detach().clone(), w]
        got = torch.ops.deltapack.op_backward(key, given, *parts, [y], handle, [grad_y, None])
        assert runs["causal_conv1d"] == count
        assert _rel(got, want) <= GRAD_RTOL
        assert not opaque._TAPES


@pytest.mark.parametrize("reentrant", [False, True], ids=["hooks", "reentrant"])
def test_checkpoint_around_a_compiled_function_is_exact(runs, reentrant):
    """A checkpoint around compiled ops: the recomputed forward keeps the tapes the backward uses (the op's saved
    tensors do not go to a non-reentrant checkpoint's hooks, which drop the first forward's handles, so its tapes go
    at once; a reentrant one's first forward runs without grad and keeps none), gradients equal eager's."""
    compiled = torch.compile(_three_ops, backend="aot_eager", fullgraph=True)
    inputs, segments = _gdn_inputs((30, 34, 6))
    want = torch.autograd.grad(_three_ops(*inputs, segments), inputs)
    compiled(*inputs, segments)
    runs.clear()
    out = torch.utils.checkpoint.checkpoint(compiled, *inputs, segments, use_reentrant=reentrant)
    gc.collect()
    assert not opaque._TAPES  # the checkpoint keeps no handle: the first forward's tapes are freed at once
    out.backward()  # a reentrant checkpoint refuses autograd.grad
    got = [t.grad for t in inputs]
    assert _rel(got, want) <= GRAD_RTOL
    assert runs == Counter(dict.fromkeys(OPS, 2))  # the checkpoint's recompute, then the tape
    gc.collect()
    assert not opaque._TAPES


def test_segments_are_rebuilt_once_per_batch(monkeypatch):
    """Every node of a batch (forward, and backward on the recompute path) gets the same Segments object, so its
    per-batch plans are built once; a new batch with equal offsets in new tensors gets a new one."""
    seen: list[int] = []
    rebuild = opaque._segments

    def recorded(*tensors):
        segments = rebuild(*tensors)
        seen.append(id(segments))
        return segments

    monkeypatch.setattr(opaque, "_segments", recorded)
    monkeypatch.setattr(opaque, "RECOMPUTE", True)
    model = deltapack.patch(_model("qwen3_5"))
    for layer in model.get_decoder().layers:
        layer.compile(backend="aot_eager", fullgraph=True)
    _, ids, mask = _batch((10, 20, 10))
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert len(seen) >= 4 and len(set(seen)) == 1, seen  # forward and backward nodes of every layer
    parts = _gdn_inputs((3, 4))[1]
    same = rebuild(parts.cu_seqlens, parts.seq_idx, parts.cu_seqlens_cpu)
    assert rebuild(parts.cu_seqlens, parts.seq_idx, parts.cu_seqlens_cpu) is same
    other = (parts.cu_seqlens.clone(), parts.seq_idx.clone(), parts.cu_seqlens_cpu.clone())
    assert rebuild(*other) is not same and rebuild(*other).cu_seqlens_host == same.cu_seqlens_host
