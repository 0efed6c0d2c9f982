"""torch.compile on the varlen route that batches take on CUDA, run on the CPU with a stand-in varlen kernel.

On CUDA a patched model's full-attention layers run a varlen kernel (no [T, T] mask): qwen3_5's patched
full-attention modules through the backend chosen once per batch (``Boundaries.choices``), and the models whose
masks become a ``PackedMask`` through the per-layer plan (:mod:`deltapack.models.attention_plan`). The stand-in
(:func:`cpu_varlen`) is a varlen backend that accepts CPU tensors and runs the exact reference, and lets CPU batches
take those routes; every test counts its calls, so that it shows the varlen route ran. Compiled equals eager with
the tolerances of tests/test_compile.py, each packed document equals the document alone, and the unpatched model
leaks on the same input.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import deltapack
from deltapack.audit import shrink
from deltapack.models import attention as full_attention
from deltapack.models import attention_plan
from deltapack.ops.attention import VARLEN_ATTENTION, varlen_attention_ref
from deltapack.ops.dispatch import Backend
from helpers import EXACT, LEAK
from test_compile import SPLITS, _alone_diff, _assert_close, _batch, _model, _step

STAND_IN = "cpu_varlen"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def cpu_varlen(monkeypatch) -> list[int]:
    """A varlen attention backend for CPU tensors whose kernel is the exact reference, registered after the CUDA
    backends (so the automatic choice takes it on the CPU), and CPU batches taking the varlen routes of CUDA ones.
    Yields the list of its calls (tokens of each call)."""
    calls: list[int] = []

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segments, **options) -> torch.Tensor:
        calls.append(q.shape[0])
        return varlen_attention_ref(q, k, v, segments=segments, **options)

    def verify(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, segments, **options) -> tuple[bool, str]:
        return q.device.type == "cpu", f"q is on {q.device.type}; the stand-in runs CPU tensors"

    monkeypatch.setitem(VARLEN_ATTENTION.backends, STAND_IN, Backend(STAND_IN, load=lambda: kernel, verify=verify))
    monkeypatch.setitem(VARLEN_ATTENTION._loaded, STAND_IN, kernel)
    monkeypatch.setattr(full_attention, "VARLEN_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention_plan, "PLAN_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention_plan, "_logged", set())  # the plans of this test are logged afresh
    return calls


def _full_attention_layers(model: torch.nn.Module) -> int:
    types = getattr(model.config.get_text_config(), "layer_types", None)
    return sum(t == "full_attention" for t in types) if types else model.config.get_text_config().num_hidden_layers


@pytest.mark.parametrize("arch", ["qwen3_5", "llama", "gemma3_text"])
def test_compiled_model_on_the_varlen_route_equals_eager(cpu_varlen: list[int], arch: str):
    """torch.compile(model) with every full-attention layer on the varlen kernel: compiled equals eager, each
    document equals the document alone, no recompilation across splits, graph breaks only at the batch entry
    (gemma3: its sliding-window layer's mask, built in the graph, takes the dense plan on the CPU)."""
    model = _windowed_model() if arch == "gemma3_text" else _model(arch)
    eager = copy.deepcopy(model)
    docs, ids, mask = _batch(SPLITS[0])
    with torch.no_grad():
        assert _alone_diff(model, docs, model(input_ids=ids, attention_mask=mask).logits) > LEAK  # unpatched leaks
    deltapack.patch(model)
    deltapack.patch(eager)
    compiled = torch.compile(model, backend=(counter := CompileCounterWithBackend("aot_eager")))
    layers = _full_attention_layers(model)
    frames = None
    for split in SPLITS:
        docs, ids, mask = _batch(split)
        cpu_varlen.clear()
        got = _step(compiled, model, ids, mask)
        assert cpu_varlen == [sum(split)] * layers, cpu_varlen  # the forward of each full-attention layer
        cpu_varlen.clear()
        want = _step(eager, eager, ids, mask)
        assert cpu_varlen == [sum(split)] * layers, cpu_varlen
        _assert_close(got, want)
        assert _alone_diff(eager, docs, got[0]) <= EXACT
        frames = counter.frame_count if frames is None else frames
        assert counter.frame_count == frames, f"recompiled for the split {split}"
    breaks = list(counters["graph_break"])
    assert breaks and all("_read_batch" in reason for reason in breaks), breaks


@pytest.mark.parametrize("arch", ["qwen3_5", "llama"])
def test_each_decoder_layer_on_the_varlen_route_compiles_as_one_graph(cpu_varlen: list[int], arch: str):
    """As torchtitan compiles (every decoder layer with fullgraph=True), with the full-attention layers on the
    varlen kernel (qwen3_5: the backend chosen once per batch; llama: the per-layer plan): equal to eager, no
    recompilation across splits."""
    model = deltapack.patch(_model(arch))
    splits = [_batch(split) for split in SPLITS]
    want = [_step(model, model, ids, mask) for _, ids, mask in splits]
    counter = CompileCounterWithBackend("aot_eager")
    for layer in model.get_decoder().layers:
        layer.compile(backend=counter, fullgraph=True)
    layers = _full_attention_layers(model)
    frames = None
    for (_, ids, mask), expected in zip(splits, want):
        cpu_varlen.clear()
        _assert_close(_step(model, model, ids, mask), expected)
        assert cpu_varlen == [ids.shape[1]] * layers, cpu_varlen
        frames = counter.frame_count if frames is None else frames
        assert counter.frame_count == frames
    assert frames >= 1


def _windowed_model() -> torch.nn.Module:
    """A tiny gemma3 with a sliding-window layer (window 3) and a full-attention layer, sdpa (a PackedMask family)."""
    if "gemma3_text" not in CONFIG_MAPPING_NAMES:
        pytest.skip("no gemma3_text in this transformers")
    config, _ = shrink.shrink_config(AutoConfig.for_model("gemma3_text"), "gemma3_text")
    config.num_hidden_layers, config.layer_types, config.sliding_window = 2, ["sliding_attention", "full_attention"], 3
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().train()


def test_each_layer_of_a_packed_mask_family_compiles_as_one_graph(monkeypatch, caplog, cpu_varlen: list[int]):
    """Every decoder layer compiled with fullgraph=True while the full-attention layer takes the varlen plan (the
    sliding-window layer the dense one on the CPU): no graph break (the layer's backend choice and its plan's log
    line happen while the graph is traced, not in it), equal to eager, no recompilation across splits; the
    unpacked path compiles to one graph too and stays the model's own."""
    model = _windowed_model()
    docs, ids, mask = _batch(SPLITS[0])
    with torch.no_grad():
        assert _alone_diff(model, docs, model(input_ids=ids, attention_mask=mask).logits) > LEAK  # unpatched leaks
    _, one_ids, one_mask = _batch((sum(SPLITS[0]),))  # one document: unpacked, the layers' own path
    unpatched_one = _step(model, model, one_ids, one_mask)
    deltapack.patch(model)
    splits = [_batch(split) for split in SPLITS]
    cpu_varlen.clear()
    want = [_step(model, model, ids, mask) for _, ids, mask in splits]
    assert cpu_varlen == [sum(split) for split in SPLITS], cpu_varlen  # the full-attention layer, once a batch
    for (docs, _, _), (logits, _) in zip(splits, want):
        assert _alone_diff(model, docs, logits) <= EXACT
    counter = CompileCounterWithBackend("aot_eager")
    layers = model.get_decoder().layers
    for layer in layers:
        layer.compile(backend=counter, fullgraph=True)
    monkeypatch.setattr(attention_plan, "_logged", set())  # the first compiled step logs each layer's plan
    caplog.clear()
    frames = None
    for (_, ids, mask), expected in zip(splits, want):
        cpu_varlen.clear()
        with caplog.at_level(logging.INFO, logger="deltapack"):
            _assert_close(_step(model, model, ids, mask), expected)
        assert cpu_varlen == [ids.shape[1]], cpu_varlen
        frames = counter.frame_count if frames is None else frames
        assert counter.frame_count == frames
    assert frames >= len(layers)
    plans = [r.getMessage() for r in caplog.records if "packed attention on the" in r.getMessage()]
    assert len(plans) == 2 and any("varlen plan (causal mask)" in p for p in plans), plans
    cpu_varlen.clear()
    assert torch.equal(_step(model, model, one_ids, one_mask)[0], unpatched_one[0])
    assert not cpu_varlen  # unpacked: the model's own attention


def test_flex_plan_in_layers_compiled_as_one_graph(monkeypatch, cpu_varlen: list[int]):
    """The sliding-window layer on the flex plan (flex attention let run on the CPU, forward only: flex has no CPU
    backward), the full-attention layer on the varlen plan, every decoder layer compiled with fullgraph=True: the
    flex BlockMask is built inside the layer's graph (create_block_mask's own compile cannot nest in a trace), the
    output equals eager and each document alone, no recompilation across splits."""
    flex_attention = pytest.importorskip("transformers.integrations.flex_attention")
    monkeypatch.setattr(attention_plan, "FLEX_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention_plan, "_flex_available", lambda: True)
    monkeypatch.setattr(attention_plan._flex_failure, "reason", "")
    flex_calls: list[int] = []
    real = flex_attention.flex_attention_forward

    def counted(module, query, *args, **kwargs):
        flex_calls.append(query.shape[-2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(flex_attention, "flex_attention_forward", counted)
    model = _windowed_model().eval()
    splits = [_batch(split) for split in SPLITS]
    with torch.no_grad():
        docs, ids, mask = splits[0]
        assert _alone_diff(model, docs, model(input_ids=ids, attention_mask=mask).logits) > LEAK  # unpatched leaks
        deltapack.patch(model)
        want = [model(input_ids=ids, attention_mask=mask).logits for _, ids, mask in splits]
        assert flex_calls == cpu_varlen == [sum(split) for split in SPLITS], (flex_calls, cpu_varlen)
        for (docs, _, _), logits in zip(splits, want):
            assert _alone_diff(model, docs, logits) <= EXACT
        counter = CompileCounterWithBackend("aot_eager")
        for layer in model.get_decoder().layers:
            layer.compile(backend=counter, fullgraph=True)
        frames = None
        for (_, ids, mask), expected in zip(splits, want):
            flex_calls.clear()
            cpu_varlen.clear()
            got = model(input_ids=ids, attention_mask=mask).logits
            assert (got - expected).abs().max().item() <= EXACT
            assert flex_calls == cpu_varlen == [ids.shape[1]], (flex_calls, cpu_varlen)
            frames = counter.frame_count if frames is None else frames
            assert counter.frame_count == frames
    assert not attention_plan._flex_failure
