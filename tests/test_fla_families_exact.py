"""Whole tiny models of the KDA, short-conv and GDN-variant families: packed documents give the logits and
gradients of each document alone after ``deltapack.patch``, for every input format, B > 1 with padding on either
side, sdpa and eager; the unpatched model leaks (or raises) on the same input; without packing information the
patched model is bit-identical to the unpatched one, ``generate()`` included; ``deltapack audit`` exits 0."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from transformers import __version__

from deltapack.audit import audit
from deltapack.tiny import available, tiny_model
from helpers import (
    assert_packed_docs_exact,
    assert_packed_grads_equal_alone,
    assert_packed_logits_equal_alone,
    assert_padding_only_exact,
    assert_routing_is_each_document_alone,
    assert_unpacked_bit_identical,
    packed_examples,
    patched,
)
from helpers import installed as buildable
from packing import build

available()  # the families register their tiny configs
ALL_ARCHS = ("kimi_linear", "bailing_hybrid", "olmo_hybrid", "lara_mini", "qwen4_exp", "lfm2", "lfm2_moe", "lfm3")


def installed(arch: str) -> bool:
    """Whether the installed transformers has this model type and takes its tiny config (older releases lack some
    types, and 5.17's qwen4_exp has no indexed_attention layers: CI also runs 5.17)."""
    return bool(buildable((arch,)))


ARCHS = tuple(a for a in ALL_ARCHS if installed(a))
PARAMS = [
    pytest.param(a, marks=pytest.mark.skipif(not installed(a), reason=f"transformers {__version__} has no {a}"))
    for a in ALL_ARCHS
]
EXACT = 1e-5  # max |logit diff| in fp32 on the CPU (the contract)
LEAK = 1e-3  # what the unpatched model must at least show on the same input


@functools.lru_cache(maxsize=32)
def model_of(arch: str, attn: str = "sdpa"):
    return tiny_model(arch, attn_implementation=attn)


def random_docs(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=gen).tolist() for n in lengths]  # 0-2: pad, bos, eos


@settings(max_examples=21)
@given(**packed_examples(ARCHS, max_length=10))
def test_packed_logits_equal_alone(rows, arch, attn, fmt, pad_left, extra_pad, seed):
    model = model_of(arch, attn)
    assert_packed_logits_equal_alone(model, rows, fmt, seed=seed, pad_left=pad_left, extra_pad=extra_pad)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", PARAMS)
def test_every_arch_is_exact_with_padding_on_both_sides(arch, attn):
    """Each arch and attention at least once, deterministically: B = 2, one-token documents, left and right pad."""
    model = model_of(arch, attn)
    rows = [random_docs([6, 1, 9], seed=1), random_docs([1, 4, 8], seed=2)]
    for fmt, pad_left in (("indexed_mask", True), ("position_ids", False)):
        assert_packed_docs_exact(model, rows, fmt, pad_left=pad_left, extra_pad=2)


@pytest.mark.parametrize("arch", PARAMS)
def test_packed_gradient_equals_sum_of_alone(arch):
    model = model_of(arch)
    packed = build([random_docs([6, 1, 9], seed=3), random_docs([4, 8], seed=4)], "indexed_mask", extra_pad=2)
    assert_packed_grads_equal_alone(model, packed)


@pytest.mark.parametrize("arch", PARAMS)
def test_unpacked_calls_are_bit_identical_generate_included(arch):
    ids = torch.tensor([random_docs([7], seed=5)[0], random_docs([7], seed=6)[0]])
    assert_unpacked_bit_identical(model_of(arch), ids)


@pytest.mark.parametrize("arch", PARAMS)
def test_audit_is_exact_after_patching(arch):
    report = audit(arch, gradient=False)
    assert report.audited == "patched", report.patch_error
    assert report.verdict() == "exact" and report.exit_code() == 0
    assert report.states["unpatched"].formats  # and the unpatched model was audited on the same inputs


@pytest.mark.skipif(not installed("qwen4_exp"), reason="transformers without qwen4_exp")
def test_qwen4_exp_ngram_layers_refuse_packed_inputs():
    """qwen4_exp with per-layer n-gram embeddings (ple_layer_ids): packed inputs raise, unpacked ones run as before."""
    fields = dict(ple_layer_ids=[2], ple_embed_dim=64, ngram_vocab_size_base=1000, heads_per_ngram=2)
    fields["make_ngram_vocab_size_divisible_by"] = 8
    model = tiny_model("qwen4_exp", **fields)
    packed = build([random_docs([5, 3], seed=7)], "indexed_mask")
    ids = packed.kwargs["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
        with patched(model):
            with pytest.raises(ValueError, match="ple_layer_ids"):
                model(**packed.kwargs)
            assert torch.equal(model(ids).logits, logits)


MOE = [p for p in PARAMS if p.values[0] in ("kimi_linear", "bailing_hybrid", "lara_mini", "qwen4_exp", "lfm2_moe")]


@pytest.mark.parametrize("arch", MOE)
def test_moe_routing_is_each_document_alone(arch):
    """Every real token is routed as in its document alone (router logits equal token by token, none for padding)."""
    model = model_of(arch)
    docs = random_docs([5, 1, 11, 4], seed=9)
    assert_routing_is_each_document_alone(model, docs)


@pytest.mark.parametrize("arch", [p for p in PARAMS if p.values[0] in ("kimi_linear", "olmo_hybrid", "lfm2")])
def test_training_with_gradient_checkpointing_is_exact(arch):
    """Train mode, activation checkpointing (layers replayed in the backward): packed gradients = sum over alone."""
    model = tiny_model(arch).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed = build([random_docs([6, 1, 9], seed=9), random_docs([4, 8], seed=10)], "indexed_mask", extra_pad=2)
    assert_packed_grads_equal_alone(model, packed, use_cache=False)


@pytest.mark.parametrize("pad_left", [False, True])
@pytest.mark.parametrize("arch", PARAMS)
def test_padding_only_is_exact(arch, pad_left):
    """One document per row with padding on either side: exact (transformers' own path is exact here too)."""
    model = model_of(arch)
    assert_padding_only_exact(model, random_docs([7, 3, 11], seed=2), pad_left)
