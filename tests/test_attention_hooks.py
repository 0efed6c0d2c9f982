"""The mask-registry hooks keep attention inside documents for any attention model, and change nothing outside
a packing scope.

Each model runs the packed stream [1, total] with per-document positions, as a patched model does, inside a
packing scope made here from the batch's boundaries; each document's logits must equal the document run alone.
Without the scope the same stream leaks (with row positions for every model; gpt_oss, whose mask builder never
sees positions, even with per-document positions).
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from deltapack.audit import shrink
from deltapack.boundaries import Boundaries
from deltapack.models import attention_hooks
from deltapack.models.scope import packing_scope

LENGTHS = (7, 10, 5, 1, 8)
ATOL = 1e-5

# (model type, attention implementation, config overrides): windows and chunks shorter than the documents
CASES = (
    ("llama", "sdpa", {}),
    ("mistral", "sdpa", {"sliding_window": 3}),
    ("gemma3_text", "eager", {"sliding_window": 3}),
    ("gemma2", "eager", {"sliding_window": 3}),
    ("llama4_text", "sdpa", {"attention_chunk_size": 3}),
    ("gpt_oss", "eager", {"sliding_window": 3}),
    ("bloom", "eager", {}),
    ("opt", "sdpa", {}),
)


@functools.cache
def _model(arch: str, impl: str, overrides: tuple[tuple[str, int], ...]) -> torch.nn.Module:
    config, _ = shrink.shrink_config(AutoConfig.for_model(arch), arch)
    for key, value in overrides:
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()


def _stream(model: torch.nn.Module) -> tuple[list[torch.Tensor], torch.Tensor, Boundaries]:
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, min(vocab, 1000), (n,), generator=gen) for n in LENGTHS]
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return docs, torch.cat(docs)[None], Boundaries.from_position_ids(positions)


def _worst(logits: torch.Tensor, alone: list[torch.Tensor]) -> float:
    offsets = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    return max((logits[0, offsets[i] : offsets[i + 1]] - a).abs().max().item() for i, a in enumerate(alone))


@pytest.fixture(autouse=True)
def _hooks():
    attention_hooks.install()
    yield


@pytest.mark.parametrize("arch,impl,overrides", CASES, ids=[c[0] for c in CASES])
def test_scope_keeps_documents_apart(arch: str, impl: str, overrides: dict[str, int]):
    model = _model(arch, impl, tuple(sorted(overrides.items())))
    docs, ids, bounds = _stream(model)
    with torch.no_grad():
        alone = [model(d[None], use_cache=False).logits[0] for d in docs]
        with packing_scope(bounds):
            packed = model(ids, position_ids=bounds.position_ids, use_cache=False).logits
        leaked_rows = model(ids, use_cache=False).logits  # no scope, row positions
        leaked_docs = model(ids, position_ids=bounds.position_ids, use_cache=False).logits
    assert _worst(packed, alone) <= ATOL
    assert _worst(leaked_rows, alone) > 100 * ATOL
    if arch == "gpt_oss":  # its masks are built without positions: nothing but the scope separates documents
        assert _worst(leaked_docs, alone) > 100 * ATOL


def test_gradients_inside_the_scope():
    model = _model("mistral", "sdpa", (("sliding_window", 3),))
    docs, ids, bounds = _stream(model)
    model.zero_grad()
    for d in docs:
        model(d[None], use_cache=False).logits.square().sum().backward()
    alone = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with packing_scope(bounds):
        model(ids, position_ids=bounds.position_ids, use_cache=False).logits.square().sum().backward()
    packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    num = sum((a - b).square().sum() for a, b in zip(alone, packed)).sqrt()
    assert float(num / sum(a.square().sum() for a in alone).sqrt()) <= 1e-4


@pytest.mark.parametrize("arch,impl,overrides", CASES[:3] + CASES[5:6], ids=["llama", "mistral", "gemma3", "gpt_oss"])
def test_outside_a_scope_bit_identical(arch: str, impl: str, overrides: dict[str, int]):
    model = _model(arch, impl, tuple(sorted(overrides.items())))
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        hooked = model(ids, attention_mask=mask).logits
        gen_hooked = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        attention_hooks.uninstall()
        try:
            plain = model(ids, attention_mask=mask).logits
            gen_plain = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        finally:
            attention_hooks.install()
    assert torch.equal(hooked, plain)
    assert torch.equal(gen_hooked, gen_plain)


def test_mask_for_another_shape_inside_a_scope_raises():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    _, _, bounds = _stream(_model("llama", "sdpa", ()))
    with packing_scope(bounds), pytest.raises(ValueError, match="packed stream"):
        ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](batch_size=2, q_length=4, kv_length=4)


# ------------------------------------------------------------------------------------------------ the GPU plan
def test_mask_kind_reads_the_model_mask_function():
    from transformers.masking_utils import (
        causal_mask_function,
        chunked_causal_mask_function,
        sliding_window_causal_mask_function,
    )

    from deltapack.models.attention_plan import mask_kind

    assert mask_kind(causal_mask_function, None, 40, "cpu") == ("causal", None)
    assert mask_kind(sliding_window_causal_mask_function(5), 5, 40, "cpu") == ("window", 5)
    assert mask_kind(sliding_window_causal_mask_function(50), 50, 40, "cpu") == ("causal", None)  # never binds
    assert mask_kind(chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)), 4, 40, "cpu")[0] == "general"


@pytest.mark.parametrize("arch,impl,overrides", CASES[:2], ids=["llama", "mistral"])
def test_packed_mask_plan_exact(monkeypatch, arch: str, impl: str, overrides: dict[str, int]):
    """The GPU plan's mask object and its dense fallback, exercised on the CPU."""
    from deltapack.models import attention_plan

    model = _model(arch, impl, tuple(sorted(overrides.items())))
    monkeypatch.setattr(attention_plan, "PLAN_DEVICES", ("cuda", "cpu"))
    seen: list[str] = []
    real = attention_plan.run_packed_attention

    def spy(original, module, query, key, value, mask, **kw):
        seen.append(mask.kind)
        return real(original, module, query, key, value, mask, **kw)

    monkeypatch.setattr(attention_plan, "run_packed_attention", spy)
    assert attention_plan.register_model(model)
    try:
        docs, ids, bounds = _stream(model)
        with torch.no_grad():
            alone = [model(d[None], use_cache=False).logits[0] for d in docs]
            with packing_scope(bounds):
                packed = model(ids, position_ids=bounds.position_ids, use_cache=False).logits
    finally:
        attention_plan.unregister_model(model)
    assert _worst(packed, alone) <= ATOL
    assert seen and set(seen) == {"window" if overrides else "causal"}


@pytest.mark.parametrize("dims", [(16, 16), (24, 16), (16, 24)], ids=["same", "mla", "wide_v"])
def test_varlen_plan_head_sizes(dims: tuple[int, int]):
    """The varlen plan (reference kernel on the CPU) with value heads of their own size, as in MLA."""
    from transformers.masking_utils import causal_mask_function

    from deltapack.models.attention_plan import PackedMask, _varlen

    dq, dv = dims
    bounds = Boundaries.from_position_ids(torch.cat([torch.arange(n) for n in LENGTHS])[None])
    gen = torch.Generator().manual_seed(0)
    total = bounds.total_tokens
    q, k = torch.randn(1, 4, total, dq, generator=gen), torch.randn(1, 2, total, dq, generator=gen)
    v = torch.randn(1, 2, total, dv, generator=gen)
    mask = PackedMask(bounds, causal_mask_function, "causal", None, lambda: None)
    out = _varlen(q, k, v, mask, 0.3)
    assert out.shape == (1, total, 4, dv)
    offsets = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    for a, b in zip(offsets[:-1], offsets[1:]):
        qq, kk, vv = (t[0, :, a:b].transpose(0, 1).repeat_interleave(2 if t is not q else 1, 1) for t in (q, k, v))
        want = torch.nn.functional.scaled_dot_product_attention(
            qq.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), is_causal=True, scale=0.3
        ).transpose(0, 1)
        assert (out[0, a:b] - want).abs().max() <= 1e-5


def test_attention_without_a_mask_in_a_scope_stays_inside_documents():
    """An attention call that reaches the registry with no mask inside a packing scope (a model that built none) is
    causal within each document, not over the stream."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _, _, bounds = _stream(_model("llama", "sdpa", ()))
    gen = torch.Generator().manual_seed(0)
    total = bounds.total_tokens
    q, k, v = (torch.randn(1, 2, total, 8, generator=gen) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 1, False
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with packing_scope(bounds):
        packed, _ = sdpa(module, q, k, v, None, scaling=0.5)
    leaked, _ = sdpa(module, q, k, v, None, scaling=0.5)
    offsets = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    for a, b in zip(offsets[:-1], offsets[1:]):
        alone, _ = sdpa(module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, scaling=0.5)
        assert (packed[:, a:b] - alone).abs().max() <= 1e-6
    assert (leaked - packed).abs().max() > 1e-2


def test_verify_flex_refuses_what_flex_cannot_compile(monkeypatch):
    from deltapack.models import attention_plan

    monkeypatch.setattr(attention_plan, "FLEX_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention_plan._flex_failure, "reason", "")

    def qkv(dq=16, dv=16, heads=(4, 2), dtype=torch.float32):
        return torch.zeros(1, heads[0], 5, dq, dtype=dtype), *(
            torch.zeros(1, heads[1], 5, d, dtype=dtype) for d in (dq, dv)
        )

    assert attention_plan.verify_flex(*qkv()) == (True, "")
    assert attention_plan.verify_flex(*qkv(dq=32, dv=16, dtype=torch.bfloat16))[0]
    for args, why in (
        (qkv(dq=8, dv=8), "at least 16"),
        (qkv(dq=16, dv=8), "at least 16"),
        (qkv(dtype=torch.float64), "fp16, bf16, fp32"),
        (qkv(heads=(3, 2)), "multiple"),
        ((torch.zeros(1, 4, 5, 16), torch.zeros(1, 2, 5, 32), torch.zeros(1, 2, 5, 16)), "head dim"),
    ):
        ok, reason = attention_plan.verify_flex(*args)
        assert not ok and why in reason
    monkeypatch.setattr(attention_plan, "FLEX_DEVICES", ("cuda",))
    assert "on cpu" in attention_plan.verify_flex(*qkv())[1]


def _force_flex(monkeypatch, model) -> list[int]:
    """The plan on the CPU with the flex route open, flex itself a stand-in that raises; returns its call count."""
    from transformers.integrations import flex_attention

    from deltapack.models import attention_plan

    monkeypatch.setattr(attention_plan, "PLAN_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention_plan, "FLEX_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention_plan, "_flex_available", lambda: True)
    monkeypatch.setattr(attention_plan, "_logged", set())
    monkeypatch.setattr(attention_plan._flex_failure, "reason", "")
    monkeypatch.setattr(attention_plan.PackedMask, "block_mask", lambda self: None)  # flex's own compile: seconds
    calls: list[int] = []

    def broken_flex(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("LoweringException: NoValidChoicesError (stand-in)")

    monkeypatch.setattr(flex_attention, "flex_attention_forward", broken_flex)
    assert attention_plan.register_model(model)
    return calls


def _packed_alone_leaked(model):
    docs, ids, bounds = _stream(model)
    with torch.no_grad():
        alone = [model(d[None], use_cache=False).logits[0] for d in docs]
        runs = []
        for _ in range(2):
            with packing_scope(bounds):
                runs.append(model(ids, position_ids=bounds.position_ids, use_cache=False).logits)
        leaked = model(ids, use_cache=False).logits
    return runs, alone, leaked


def test_flex_failure_is_caught_once_and_recomputed_exactly(monkeypatch, caplog):
    """A flex call that raises (inductor failing to lower it) is logged once, refused for the process, and that
    call and every later one take the exact dense plan."""
    from deltapack.models import attention_plan

    model = _model("mistral", "sdpa", (("sliding_window", 3),))
    calls = _force_flex(monkeypatch, model)
    try:
        with caplog.at_level("INFO", logger="deltapack"):
            runs, alone, leaked = _packed_alone_leaked(model)
    finally:
        attention_plan.unregister_model(model)
    assert len(calls) == 1  # the first layer's call; refused from then on
    failures = [r for r in caplog.records if "flex attention failed" in r.getMessage()]
    assert (
        len(failures) == 1 and failures[0].levelname == "WARNING" and "NoValidChoicesError" in failures[0].getMessage()
    )
    assert attention_plan._flex_failure
    plans = [r.getMessage() for r in caplog.records if "runs packed attention on" in r.getMessage()]
    assert len(plans) == 1 and "on the dense plan" in plans[0] and "RuntimeError" in plans[0]  # never "flex"
    for packed in runs:
        assert _worst(packed, alone) <= ATOL
    assert _worst(leaked, alone) > 100 * ATOL


def test_flex_refused_by_its_verifier_takes_the_dense_plan(monkeypatch, caplog):
    """Head dims below flex's minimum: the window layers run the exact dense plan, with the reason logged once."""
    from deltapack.models import attention_plan

    model = _model("mistral", "sdpa", (("head_dim", 8), ("sliding_window", 3)))
    calls = _force_flex(monkeypatch, model)
    try:
        with caplog.at_level("INFO", logger="deltapack"):
            runs, alone, leaked = _packed_alone_leaked(model)
    finally:
        attention_plan.unregister_model(model)
    assert not calls and not attention_plan._flex_failure
    refused = [r.getMessage() for r in caplog.records if "on the dense plan" in r.getMessage()]
    assert len(refused) == 1 and "at least 16" in refused[0]
    for packed in runs:
        assert _worst(packed, alone) <= ATOL
    assert _worst(leaked, alone) > 100 * ATOL
