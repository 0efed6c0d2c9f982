"""torch.compile (inductor) on patched tiny models on CUDA, through the fast kernels: compiled equals eager, the
documents stay apart, each decoder layer compiles with fullgraph=True, and other splits of the same tokens reuse
the compiled code (tests/test_compile.py is the CPU version)."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from gpu_helpers import rel_err, requires_cuda
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import AutoConfig, AutoModelForCausalLM

import deltapack
from deltapack.audit import shrink
from deltapack.ops import opaque
from deltapack.tiny import tiny_model

pytestmark = [pytest.mark.gpu, requires_cuda]

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative L2, compiled vs eager (inductor reorders sums)
SPLITS = ((300, 200, 524), (1, 63, 64, 65, 831), (1024,), (500, 500, 24))  # 1024 tokens, split four ways


def _model(arch: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        config, _ = shrink.shrink_config(AutoConfig.for_model(arch), arch)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    else:
        model = tiny_model(arch)
    return model.to("cuda", dtype).train()


def _batch(split: tuple[int, ...], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(len(split))
    ids = torch.randint(1, vocab, (1, sum(split)), generator=gen)
    mask = torch.cat([torch.full((n,), d + 1) for d, n in enumerate(split)])[None]
    return ids.cuda(), mask.cuda()


def _step(model, params, ids, mask):
    params.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in params.parameters() if p.grad is not None])
    return out.logits.detach().float(), grads


def _compile(model, mode: str, backend):
    if mode == "layers":  # as torchtitan compiles
        for layer in model.get_decoder().layers:
            layer.compile(backend=backend, fullgraph=True)
        return model
    return torch.compile(model, backend=backend)


@pytest.mark.parametrize("mode", ["layers", "model"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["qwen3_5", "llama", "mamba2"])
def test_compiled_equals_eager_on_gpu(arch, dtype, mode):
    torch._dynamo.reset()
    counters.clear()
    base = _model(arch, dtype)
    unpatched = copy.deepcopy(base)
    model = deltapack.patch(base)
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("inductor")
    compiled = _compile(model, mode, counter)
    unpatched_compiled = _compile(unpatched, mode, "inductor")
    frames = []
    for split in SPLITS:
        ids, mask = _batch(split, model.config.vocab_size)
        logits, grads = _step(compiled, model, ids, mask)
        if len(split) > 1:
            logits_ref, grads_ref = _step(eager, eager, ids, mask)
        else:  # one document: the model's own path, which deltapack leaves alone. On it compiled and eager differ by
            # the model's own kernels under inductor (FLA's fp32 kernels: 5e-4), so the reference is the unpatched
            # model compiled the same way
            logits_ref, grads_ref = _step(unpatched_compiled, unpatched, ids, mask)
        errors = {"logits": rel_err(logits, logits_ref), "grads": rel_err(grads, grads_ref)}
        assert max(errors.values()) <= TOL[dtype], (split, errors)
        frames.append(counter.frame_count)
    breaks = [reason.splitlines()[0] for reason in counters["graph_break"]]
    print(f"{arch} {dtype} {mode}: frames after each split {frames}; graph breaks: {breaks}")
    # layers: fullgraph=True raised on any break in a layer. One document (1024,) is unpacked input (the model's own
    # path); the other splits share the first compile
    assert frames[1] == frames[0] and frames[3] == frames[2], frames


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inductor_runs_each_op_forward_once_per_step(monkeypatch, dtype):
    """qwen3_5's decoder layers compiled by inductor: in a training step each op's forward runs once (its backward
    reuses the forward's tape: inductor's partitioner kept every buffer the tape saved), twice on the recompute path
    (the count can fail); no tape is left after the backward."""
    torch._dynamo.reset()
    model = deltapack.patch(_model("qwen3_5", dtype))
    for layer in model.get_decoder().layers:
        layer.compile(backend="inductor", fullgraph=True)
    runs: Counter = Counter()
    for name, (fn, op) in list(opaque.PUBLIC.items()):

        def counted(*args, _fn=fn, _name=name, **kwargs):
            runs[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setitem(opaque.PUBLIC, name, (counted, op))
    opaque._decode.cache_clear()
    ids, mask = _batch(SPLITS[0], model.config.vocab_size)
    per_step = {}
    for recompute in (False, True, False):  # the first step compiles
        monkeypatch.setattr(opaque, "RECOMPUTE", recompute)
        runs.clear()
        _step(model, model, ids, mask)
        per_step[recompute] = dict(runs)
        assert not opaque._TAPES
    opaque._decode.cache_clear()
    print(f"{dtype}: op runs per step, tape {per_step[False]}, recompute {per_step[True]}")
    assert per_step[False] and all(2 * n == per_step[True][name] for name, n in per_step[False].items()), per_step


@pytest.mark.parametrize("mode", ["layers", "model"])
def test_windowed_attention_plans_compile_on_gpu(mode, monkeypatch, caplog):
    """A tiny gemma3 (a sliding-window layer, window 24, and a full-attention layer), bf16, compiled by inductor:
    the full layer on the varlen plan (torch's varlen_attn), the sliding one on flex (its BlockMask built in the
    layer's graph), compiled equals eager, no recompilation across packed splits; tests/test_compile_varlen.py is
    the CPU version with a stand-in varlen kernel."""
    import logging

    from transformers.integrations import flex_attention

    from deltapack.models import attention_plan
    from deltapack.ops.attention import VARLEN_ATTENTION

    torch._dynamo.reset()
    config, _ = shrink.shrink_config(AutoConfig.for_model("gemma3_text"), "gemma3_text")
    config.num_hidden_layers, config.layer_types = 2, ["sliding_attention", "full_attention"]
    config.sliding_window = 24
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to("cuda", torch.bfloat16).train()
    model = deltapack.patch(base)
    eager = copy.deepcopy(model)
    flex_calls: list[int] = []
    real = flex_attention.flex_attention_forward

    def counted(module, query, *args, **kwargs):
        flex_calls.append(query.shape[-2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(flex_attention, "flex_attention_forward", counted)
    monkeypatch.setattr(attention_plan, "_logged", set())
    counter = CompileCounterWithBackend("inductor")
    compiled = _compile(model, mode, counter)
    frames = []
    for split in (SPLITS[0], SPLITS[1], SPLITS[3]):  # packed splits only
        ids, mask = _batch(split, model.config.vocab_size)
        VARLEN_ATTENTION.ran.clear()
        flex_calls.clear()
        with caplog.at_level(logging.INFO, logger="deltapack"):
            logits, grads = _step(compiled, model, ids, mask)
        assert flex_calls == [sum(split)], flex_calls  # the sliding layer, once a forward
        assert VARLEN_ATTENTION.ran["torch_varlen"] >= 1, dict(VARLEN_ATTENTION.ran)
        logits_ref, grads_ref = _step(eager, eager, ids, mask)
        errors = {"logits": rel_err(logits, logits_ref), "grads": rel_err(grads, grads_ref)}
        assert max(errors.values()) <= TOL[torch.bfloat16], (split, errors)
        frames.append(counter.frame_count)
    plans = {r.getMessage() for r in caplog.records if "packed attention on the" in r.getMessage()}
    print(f"gemma3 {mode}: frames {frames}; plans {plans}")
    assert any("varlen plan" in p for p in plans) and any("flex plan" in p for p in plans), plans
    assert frames[0] == frames[1] == frames[2], frames
