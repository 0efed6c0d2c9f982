"""torch.compile on patched models: compiled equals eager (fp32: logits <= 1e-5, gradients relative <= 1e-4) and
every packed document still equals the document alone; no graph break inside a decoder layer (each layer compiles
with ``fullgraph=True``); no recompilation when the same tokens are split into other documents.

The compiler backend is ``aot_eager`` (dynamo's graphs and AOT autograd's forward / backward split, without code
generation, so that a test takes seconds); one slow test runs inductor on a decoder layer
(``DELTAPACK_INDUCTOR_TESTS=1``; tests/gpu/test_compile_gpu.py runs inductor on CUDA).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import AutoConfig, AutoModelForCausalLM

import deltapack
from deltapack import ops
from deltapack.audit import shrink
from deltapack.data import PackedCollator, pack_dataset
from deltapack.ops import Segments, opaque
from deltapack.ops.attention import varlen_attention
from deltapack.tiny import tiny_model
from helpers import (
    EXACT,
    LEAK,
    PAD,
    checkpointing_arg,
    documents,
    one_step_args,
    padded_unpacked,
    random_docs,
    rel,
    sgd_step,
    update_rel,
)

GRAD_RTOL = 1e-4
# the same 40 tokens split into documents three ways (the third has one more document)
SPLITS = ((10, 20, 10), (5, 30, 5), (3, 7, 20, 10))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        config, _ = shrink.shrink_config(AutoConfig.for_model(arch), arch)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().train()
    return tiny_model(arch).train()


def _batch(split: tuple[int, ...]) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Documents of these lengths in one row: (documents, input_ids [1, T], indexed attention_mask [1, T])."""
    docs = random_docs(split, vocab=100, seed=len(split))
    ids = torch.tensor([sum(docs, [])])
    mask = torch.tensor([[n + 1 for n, d in enumerate(docs) for _ in d]])
    return docs, ids, mask


def _step(model: torch.nn.Module, params: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    """Logits [1, T, V] and the gradients of the loss by parameter name (``params``: where the parameters live)."""
    params.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}


def _assert_close(got, want) -> None:
    (logits, grads), (logits_ref, grads_ref) = got, want
    assert (logits - logits_ref).abs().max().item() <= EXACT
    assert grads.keys() == grads_ref.keys() and grads
    for name, g in grads_ref.items():
        assert (grads[name] - g).norm() <= GRAD_RTOL * g.norm() + 1e-12, name


def _alone_diff(model: torch.nn.Module, docs: list[list[int]], logits: torch.Tensor) -> float:
    """max |packed logits - each document alone| (the eager unpatched model alone is the reference)."""
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([d])).logits[0] for d in docs])
    return (logits[0] - alone).abs().max().item()


@pytest.mark.parametrize("arch", ["qwen3_5", "llama", "mamba2"])
def test_compiled_model_equals_eager_without_recompiling(arch: str):
    """torch.compile(model) after patch: the one place that breaks the graph is the entry, where the batch's
    documents are read on the host (none in a layer); one compiled frame for every split of the same tokens."""
    model = _model(arch)
    eager = copy.deepcopy(model)
    docs, ids, mask = _batch(SPLITS[0])
    with torch.no_grad():
        assert _alone_diff(model, docs, model(input_ids=ids, attention_mask=mask).logits) > LEAK  # unpatched leaks
    deltapack.patch(model)
    deltapack.patch(eager)
    compiled = torch.compile(model, backend=(counter := CompileCounterWithBackend("aot_eager")))
    frames = None
    for split in SPLITS:
        docs, ids, mask = _batch(split)
        got = _step(compiled, model, ids, mask)
        _assert_close(got, _step(eager, eager, ids, mask))
        assert _alone_diff(eager, docs, got[0]) <= EXACT
        frames = counter.frame_count if frames is None else frames
        assert counter.frame_count == frames, f"recompiled for the split {split}"
    breaks = list(counters["graph_break"])
    assert breaks and all("_read_batch" in reason for reason in breaks), breaks


@pytest.mark.parametrize("arch", ["qwen3_5", "llama"])
def test_each_decoder_layer_compiles_as_one_graph(arch: str):
    """As torchtitan compiles: every decoder layer on its own with fullgraph=True (a graph break would raise), for
    packed batches and for an unpacked one."""
    model = _model(arch)
    deltapack.patch(model)
    splits = [_batch(split) for split in SPLITS]
    want = [_step(model, model, ids, mask) for _, ids, mask in splits]
    _, one_ids, one_mask = _batch((sum(SPLITS[0]),))  # one document: unpacked, the layers' own path
    want_unpacked = _step(model, model, one_ids, one_mask)
    counter = CompileCounterWithBackend("aot_eager")
    layers = model.get_decoder().layers
    for layer in layers:
        layer.compile(backend=counter, fullgraph=True)
    frames = None
    for (_, ids, mask), expected in zip(splits, want):
        got = _step(model, model, ids, mask)
        _assert_close(got, expected)
        frames = counter.frame_count if frames is None else frames
        assert counter.frame_count == frames
    assert frames >= 1
    _assert_close(_step(model, model, one_ids, one_mask), want_unpacked)  # also one graph per layer
    deltapack.unpatch(model)
    for layer in layers:
        layer._compiled_call_impl = None
    docs, ids, mask = splits[0]
    with torch.no_grad():  # the same layers unpatched mix the documents
        assert _alone_diff(model, docs, model(input_ids=ids, attention_mask=mask).logits) > LEAK


def _gdn_inputs(split: tuple[int, ...], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(split)
    q, k = (torch.randn(1, total, 2, 8, generator=gen) for _ in range(2))
    v = torch.randn(1, total, 4, 8, generator=gen)
    g = -torch.rand(1, total, 4, generator=gen)
    beta = torch.rand(1, total, 4, generator=gen)
    x = torch.randn(1, total, 6, generator=gen)
    w = torch.randn(6, 4, generator=gen)
    offsets = [0]
    for n in split:
        offsets.append(offsets[-1] + n)
    return [t.requires_grad_() for t in (q, k, v, g, beta, x, w)], Segments.from_cu_seqlens(offsets)


def _three_ops(q, k, v, g, beta, x, w, segments):
    y = ops.causal_conv1d(x, w, None, "silu", segments=segments)
    o, final = ops.gated_delta_rule(q, k, v, g, beta, segments=segments, output_final_state=True)
    attn = varlen_attention(q[0], k[0], v[0, :, :2], segments=segments, scale=0.3)
    return o.square().sum() + final.square().sum() + y.square().sum() + attn.square().sum()


def test_ops_are_one_opaque_node_each():
    """The conv, the delta rule and varlen attention inside fullgraph=True: each a deltapack::op node, gradients equal
    to eager, one compile for every split of the stream (documents of one token included)."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_three_ops, backend=counter, fullgraph=True)
    for split in ((30, 34, 6), (1, 62, 7), (1, 1, 1, 67), (69, 1)):
        inputs, segments = _gdn_inputs(split)
        want = torch.autograd.grad(_three_ops(*inputs, segments), inputs)
        got = torch.autograd.grad(compiled(*inputs, segments), inputs)
        for a, b in zip(got, want):
            assert (a - b).norm() <= GRAD_RTOL * b.norm()
    assert counter.frame_count <= 2  # the first split, then once more with the number of documents symbolic
    first = [str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function"]
    assert first.count("deltapack.op") == 3, first


def _op_case(name: str, total: int, gen: torch.Generator) -> tuple[list[torch.Tensor], dict]:
    """Small fp32 inputs of the op ``name`` (a stream of ``total`` tokens) and its constant keyword arguments."""

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def decay(*shape: int) -> torch.Tensor:
        return -torch.rand(*shape, generator=gen) * 0.1

    def unit(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    t = total
    cases = {
        "kda": ([r(1, t, 2, 8), r(1, t, 2, 8), r(1, t, 2, 8), decay(1, t, 2, 8), unit(1, t, 2)], {}),
        "ssd": ([r(1, t, 4, 8), r(1, t, 4), decay(4), r(1, t, 2, 8), r(1, t, 2, 8)], {"dt_softplus": True}),
        "selective_scan": ([r(1, t, 8), r(1, t, 8), decay(8, 4), r(1, t, 2, 4), r(1, t, 2, 4)], {}),
        "lightning_attention": ([r(1, t, 2, 8), r(1, t, 2, 8), r(1, t, 2, 4), unit(2) + 0.1], {}),
        "rg_lru_scan": ([r(1, t, 8), decay(1, t, 8)], {}),
        "mlstm": ([r(1, t, 2, 8), r(1, t, 2, 8), r(1, t, 2, 4), r(1, t, 2), r(1, t, 2)], {}),
        "wkv": ([decay(6) - 0.5, r(6), r(1, t, 6), r(1, t, 6)], {}),
        "token_shift": ([r(1, t, 6)], {}),
    }
    inputs, options = cases[name]
    return [x.requires_grad_() for x in inputs], options


@pytest.mark.parametrize(
    "name", ["kda", "ssd", "selective_scan", "lightning_attention", "rg_lru_scan", "mlstm", "wkv", "token_shift"]
)
def test_every_op_with_a_meta_is_an_opaque_node(name: str):
    """The other ops with a meta function, each alone in fullgraph=True: output and gradients equal to eager on two
    splits of the stream, a deltapack::op node, one compile for both splits."""
    fn = opaque.PUBLIC[name][0]
    counter = CompileCounterWithBackend("aot_eager")

    def run(inputs: list[torch.Tensor], segments: Segments, options: dict) -> torch.Tensor:
        out = fn(*inputs, segments=segments, **options)
        return sum(o.square().sum() for o in (out if isinstance(out, tuple) else (out,)) if o is not None)

    compiled = torch.compile(run, backend=counter, fullgraph=True)
    for split in ((9, 1, 14), (3, 1, 1, 12, 7)):
        inputs, options = _op_case(name, sum(split), torch.Generator().manual_seed(len(split)))
        segments = Segments.from_cu_seqlens(torch.tensor([0, *split]).cumsum(0))
        want_out = run(inputs, segments, options)
        want = torch.autograd.grad(want_out, inputs)
        got_out = compiled(inputs, segments, options)
        got = torch.autograd.grad(got_out, inputs)
        assert (got_out - want_out).abs() <= 1e-5 * want_out.abs()
        for a, b in zip(got, want):
            assert (a - b).norm() <= GRAD_RTOL * b.norm()
    assert counter.frame_count == 1
    nodes = [str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function"]
    assert nodes.count("deltapack.op") == 1, nodes


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DELTAPACK_INDUCTOR_TESTS"),
    reason="inductor's C++ build of one layer takes minutes on 2 cores; set DELTAPACK_INDUCTOR_TESTS=1",
)
def test_inductor_compiled_gdn_layer_equals_eager():
    """Inductor (generated code, fused element-wise work) on a GDN decoder layer of qwen3_5, forward and backward."""
    model = deltapack.patch(_model("qwen3_5"))
    _, ids, mask = _batch(SPLITS[2])
    want = _step(model, model, ids, mask)
    layer = model.get_decoder().layers[0]
    assert model.config.layer_types[0] == "linear_attention"
    layer.compile(fullgraph=True)
    _assert_close(_step(model, model, ids, mask), want)


def test_trainer_torch_compile_with_checkpointing_equals_padded_step(tmp_path):
    """TrainingArguments(torch_compile=True) and activation checkpointing on a patched model: one SGD step on packed
    rows equals the step on the documents one per row, padded, through the unpatched model; the only graph break
    is the entry's."""
    datasets = pytest.importorskip("datasets")
    from transformers import Trainer, TrainingArguments

    initial = tiny_model("qwen3_5")
    _, params_ref, step_ref = sgd_step(copy.deepcopy(initial), padded_unpacked(documents()))
    train = pack_dataset(datasets.Dataset.from_dict({"input_ids": documents()}), 40)
    model = deltapack.patch(copy.deepcopy(initial))
    compile_args = {"torch_compile": True, "torch_compile_backend": "aot_eager", checkpointing_arg(): True}
    args = one_step_args(TrainingArguments, tmp_path, len(train), remove_unused_columns=False, **compile_args)
    Trainer(model=model, args=args, train_dataset=train, data_collator=PackedCollator(pad_token_id=PAD)).train()
    start = dict(initial.named_parameters())
    after = dict(model.named_parameters())
    step = {n: after[n].detach() - start[n].detach() for n in step_ref}
    assert max(rel(after[n].detach(), params_ref[n]) for n in params_ref) <= 1e-5
    assert update_rel(step, step_ref) <= 1e-5
    breaks = list(counters["graph_break"])
    assert breaks and all("_read_batch" in reason for reason in breaks), breaks


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_attention_backend_choice_inside_a_compiled_region(backend: str):
    """A whole compiled model decides its attention backend inside the graph (on CUDA, once per batch): that choice
    builds its probe segments on the host, which must run eagerly, not be traced (traced, ``repeat_interleave``'s
    data-dependent size failed inductor on an H200 and ``maybe_mark_dynamic`` fails aot_eager)."""
    from deltapack.ops import attention

    def choose(q: torch.Tensor) -> torch.Tensor:
        return q * 2 if attention.resolve_attention_backend(None, q) == "reference" else q

    q = torch.randn(4, 1, 8)
    attention._probe_segments.cache_clear()  # the first choice of the process, as in a fresh training run
    torch._dynamo.reset()
    try:
        assert torch.equal(torch.compile(choose, backend=backend)(q), choose(q))
    finally:
        torch._dynamo.reset()
