"""patch / unpatch: the unpacked path untouched, idempotence, other entry classes, and errors at the model level."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3_5Config, Qwen3_5ForConditionalGeneration

import deltapack
from deltapack import Boundaries
from deltapack.tiny import set_long_memory, tiny_config, tiny_model
from helpers import EXACT, LEAK, alone_logits, cached_model, enable_checkpointing, patched, random_docs
from packing import build, max_doc_diff


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_unpacked_inputs_are_bit_identical(arch):
    model = cached_model(arch)
    ids = torch.randint(0, 128, (2, 9))
    calls = [
        {},
        {"attention_mask": torch.ones(2, 9, dtype=torch.long)},
        {"position_ids": torch.arange(9).expand(2, 9)},
        {"use_cache": False},
    ]
    with torch.no_grad():
        before = [model(ids, **kw).logits for kw in calls]
        gen_before = model.generate(ids, max_new_tokens=6, do_sample=False)
        mask = torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9])
        padded_gen_before = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        with patched(model):
            after = [model(ids, **kw).logits for kw in calls]
            gen_after = model.generate(ids, max_new_tokens=6, do_sample=False)
            padded_gen_after = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    # a 4-D mask the caller built: transformers' own path, untouched
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None, None].expand(2, 1, 9, 9)
    with torch.no_grad():
        custom = model(ids, attention_mask=causal, use_cache=False).logits
        with patched(model):
            assert torch.equal(model(ids, attention_mask=causal, use_cache=False).logits, custom)
    assert torch.equal(gen_before, gen_after)
    assert torch.equal(padded_gen_before, padded_gen_after)


def test_patch_is_idempotent_and_reversible():
    model = tiny_model("qwen3_5")
    assert deltapack.patch(model) is model
    forward = model.forward
    deltapack.patch(model)
    assert model.forward == forward and deltapack.is_patched(model)
    deltapack.unpatch(model)
    assert not deltapack.is_patched(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not any(k.startswith("_deltapack") for m in model.modules() for k in m.__dict__)
    deltapack.unpatch(model)  # a no-op


def test_unsupported_model_names_the_supported_architectures():
    llama = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    )
    llama.config.model_type = "toy_lm"  # a model type no family registers
    with pytest.raises(ValueError, match="does not support model_type 'toy_lm'.*qwen3_5, qwen3_5_moe"):
        deltapack.patch(llama)


def test_deepcopy_of_a_patched_model_is_patched_on_its_own():
    model = tiny_model("qwen3_5")
    deltapack.patch(model)
    twin = copy.deepcopy(model)
    assert deltapack.is_patched(twin) and twin.forward.__self__ is twin
    packed = build([random_docs([4, 6], seed=7)], "indexed_mask")
    with torch.no_grad():
        assert torch.equal(model(**packed.kwargs).logits, twin(**packed.kwargs).logits)


def test_prebuilt_boundaries_and_inputs_embeds():
    model = cached_model("qwen3_5")
    packed = build([random_docs([3, 5], seed=8), random_docs([6], seed=9)], "indexed_mask", extra_pad=1)
    alone = alone_logits(model, packed.docs)
    bounds = Boundaries.from_document_ids(packed.kwargs["attention_mask"])
    ids = packed.kwargs["input_ids"]
    with patched(model), torch.no_grad():
        by_ids = model(input_ids=ids, boundaries=bounds).logits
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), boundaries=bounds).logits
        with pytest.raises(ValueError, match="built for a batch of shape"):
            model(input_ids=ids[:1], boundaries=bounds)
    assert max_doc_diff(by_ids, packed, alone) <= EXACT
    assert max_doc_diff(by_embeds, packed, alone) <= EXACT


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"seq_idx": torch.tensor([[0, 0, 1, 1, 1, 1]]), "attention_mask": torch.tensor([[1, 1, 2, 2, 2, 2]])},
            "both seq_idx and an indexed attention_mask",
        ),
        (
            {"cu_seq_lens_q": torch.tensor([0, 2, 6]), "cu_seq_lens_k": torch.tensor([0, 3, 6])},
            "cu_seq_lens_k differs",
        ),
        (
            {"cu_seq_lens_q": torch.tensor([0, 2, 6]), "seq_idx": torch.tensor([[0, 0, 0, 1, 1, 1]])},
            "seq_idx disagrees",
        ),
        ({"attention_mask": torch.tensor([[1, 1, 3, 3, 3, 3]])}, "document id 3"),
        ({"position_ids": torch.tensor([[0, 1, 0, 2, 3, 4]])}, "jumps from 0 to 2"),
        ({"attention_mask": torch.tensor([[1, 2, 2, 2, 2, 2]]), "labels": torch.ones(1, 7).long()}, "labels has shape"),
        (
            {
                "attention_mask": torch.tensor([[1, 2, 2, 2, 2, 2]]),
                "labels": torch.ones(1, 6).long(),
                "shift_labels": torch.ones(1, 6).long(),
            },
            "labels and shift_labels were both given",
        ),
        ({"cu_seq_lens_q": torch.tensor([0, 2, 5])}, "cu_seq_lens_q ends at 5"),
        ({"attention_mask": torch.tensor([[1, 2, 2, 2, 2, 2]]), "use_cache": True}, "use_cache=True with packed"),
        (
            {
                "attention_mask": torch.tensor([[1, 2, 2, 2, 2, 2]]),
                "logits_to_keep": 1,
                "labels": torch.ones(1, 6).long(),
            },
            "logits_to_keep and labels",
        ),
    ],
)
def test_bad_packing_arguments_raise(kwargs, message):
    model = cached_model("qwen3_5")
    with patched(model), pytest.raises(ValueError, match=message):
        model(torch.randint(0, 128, (1, 6)), **kwargs)


def test_packed_inputs_with_a_cache_raise():
    model = cached_model("qwen3_5")
    ids = torch.randint(0, 128, (1, 6))
    with patched(model), torch.no_grad():
        cache = model(ids[:, :3], use_cache=True).past_key_values
        with pytest.raises(ValueError, match="an indexed attention_mask .*generate from each document on its own"):
            model(ids[:, 3:], attention_mask=torch.tensor([[1, 2, 2]]), past_key_values=cache)


def conditional_generation_model():
    torch.manual_seed(0)
    config = Qwen3_5Config(
        text_config=tiny_config("qwen3_5").to_dict(),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=64),
    )
    return set_long_memory(Qwen3_5ForConditionalGeneration(config).eval())


def test_conditional_generation_text_only_with_use_cache_in_config():
    model = conditional_generation_model()
    assert model.config.text_config.use_cache  # the default that hides packing from transformers' attention
    packed = build([random_docs([4, 7, 2], seed=10)], "position_ids")
    alone = alone_logits(model, packed.docs)
    with torch.no_grad():
        assert max_doc_diff(model(**packed.kwargs).logits, packed, alone) > LEAK
        with patched(model):
            assert max_doc_diff(model(**packed.kwargs).logits, packed, alone) <= EXACT
            with pytest.raises(ValueError, match="text-only"):
                model(**packed.kwargs, pixel_values=torch.zeros(1, 3))


def test_text_model_entry():
    """Patching the bare decoder stack: last_hidden_state per document equals the document alone."""
    model = cached_model("qwen3_5").model
    packed = build([random_docs([5, 3], seed=11)], "indexed_mask")
    with torch.no_grad():
        alone = [model(torch.tensor([d])).last_hidden_state[0] for d in packed.docs]
        leaky = model(**packed.kwargs, use_cache=False).last_hidden_state
        assert max_doc_diff(leaky, packed, alone) > LEAK
        with patched(model):
            out = model(**packed.kwargs).last_hidden_state
    assert max_doc_diff(out, packed, alone) <= EXACT


def test_gradient_checkpointing_keeps_packing():
    """Under activation checkpointing the recomputation sees the same boundaries: same gradients as without."""
    model = tiny_model("qwen3_5")
    model.train()
    packed = build([random_docs([5, 2, 6], seed=12)], "indexed_mask")
    labels = packed.kwargs["input_ids"]

    def grads():
        model.zero_grad(set_to_none=True)
        model(**packed.kwargs, labels=labels).loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])

    deltapack.patch(model)
    plain = grads()
    enable_checkpointing(model, use_reentrant=False)
    checkpointed = grads()
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)
    deltapack.unpatch(model)
    leaky = grads()  # unpatched, checkpointed: the leak is back
    assert ((leaky - plain).norm() / plain.norm()) > LEAK


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_moe_routing_is_unchanged_per_token(arch):
    """Every real token is routed exactly as when its document runs alone (router logits of every MoE layer)."""
    model = cached_model(arch)
    packed = build([random_docs([4, 6], seed=13), random_docs([5], seed=14)], "indexed_mask", extra_pad=2)
    with torch.no_grad():
        alone = [model(torch.tensor([d]), output_router_logits=True).router_logits for d in packed.docs]
        leaky = model(**packed.kwargs, output_router_logits=True, use_cache=False).router_logits
        with patched(model):
            routed = model(**packed.kwargs, output_router_logits=True).router_logits
    lengths = [len(d) for d in packed.docs]
    for layer, packed_logits in enumerate(routed):
        assert packed_logits.shape[0] == sum(lengths)  # one row per real token: no padding is routed
        per_doc = torch.split(packed_logits, lengths)
        assert max((p - a[layer]).abs().max().item() for p, a in zip(per_doc, alone)) <= EXACT
    # unpatched, the same tokens are routed differently (the leak reaches the router input)
    batch, width = packed.kwargs["input_ids"].shape
    r, c, n = packed.places[1]
    leaky_doc = leaky[-1].reshape(batch, width, -1)[r, c : c + n]
    assert (leaky_doc - alone[1][-1]).abs().max().item() > LEAK


def test_boundaries_on_another_device_than_the_inputs_raise():
    model = cached_model("qwen3_5")
    ids = torch.randint(0, 128, (1, 6))
    bounds = Boundaries.from_document_ids(torch.tensor([[1, 1, 2, 2, 2, 2]]), device="meta")
    with patched(model), pytest.raises(ValueError, match="expected both on one device"):
        model(input_ids=ids, boundaries=bounds)


def test_unpacked_call_checks_its_inputs_once(monkeypatch):
    """An unpacked call with a mask reads the mask on the host once (the entry model), not again in the decoder
    stack; a packed call, and the decoder stack called on its own, still check."""
    model = deltapack.patch(tiny_model("qwen3_5"))
    calls = []
    original = Boundaries.from_inputs
    counted = staticmethod(lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(Boundaries, "from_inputs", counted)
    ids = torch.randint(1, 128, (2, 9))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert len(calls) == 1
        model.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert len(calls) == 2
        doc_ids = torch.tensor([[1] * 4 + [2] * 5, [1] * 9])
        out = model(input_ids=ids, attention_mask=doc_ids).logits
        assert len(calls) == 3
        alone = model(input_ids=ids[:1, 4:]).logits
    assert (out[0, 4:] - alone[0]).abs().max() < EXACT
