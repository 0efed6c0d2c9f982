"""The Mamba families (SSD: mamba2, nemotron_h, bamba, falcon_h1, granitemoehybrid, zamba2; selective scan: mamba,
falcon_mamba, jamba, zamba): packed documents give each document's logits and gradients alone, for every input
format; the unpatched model leaks on the same input; the unpacked path, generate() included, is untouched.

Layer level: each packed mixer equals the transformers mixer's own torch path on one document, and on a packed
stream equals that mixer run on each document alone.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from deltapack.boundaries import Boundaries
from deltapack.models.layers import packed_layer_of
from deltapack.tiny import tiny_model
from helpers import (
    EXACT,
    assert_packed_grads_equal_alone,
    assert_packed_logits_equal_alone,
    assert_padding_only_exact,
    assert_routing_is_each_document_alone,
    assert_unpacked_bit_identical,
    random_docs,
)
from packing import build

SSD = ("mamba2", "nemotron_h", "bamba", "falcon_h1", "granitemoehybrid", "zamba2")
SCAN = ("mamba", "falcon_mamba", "jamba", "zamba")
ARCHS = SSD + SCAN
MIXERS = ARCHS
ATTENTION_FREE = ("mamba2", "mamba", "falcon_mamba")
MOE = ("jamba", "granitemoehybrid", "nemotron_h")


@functools.lru_cache(maxsize=32)
def model_of(arch: str, attn: str = "sdpa"):
    return tiny_model(arch, attn_implementation=attn)


def cases():
    """(arch, attention, format, padding side, rows of document lengths) with length-1 documents and B > 1."""
    rng = random.Random(0)
    out = []
    for arch in ARCHS:
        attns = ("sdpa",) if arch in ATTENTION_FREE else ("sdpa", "eager")
        for i, fmt in enumerate(("position_ids", "indexed_mask", "cu_seqlens")):
            rows = [[rng.randint(1, 12) for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(1, 3))]
            rows[0] = [1, *rows[0], rng.randint(2, 20)]  # a length-1 document and a row with several
            out.append(pytest.param(arch, attns[i % len(attns)], fmt, i % 2 == 1, rows, id=f"{arch}-{fmt}"))
    return out


@pytest.mark.parametrize(("arch", "attn", "fmt", "pad_left", "rows"), cases())
def test_packed_logits_equal_alone(arch, attn, fmt, pad_left, rows):
    model = model_of(arch, attn)
    assert_packed_logits_equal_alone(model, rows, fmt, seed=len(rows), pad_left=pad_left, extra_pad=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_gradient_equals_sum_of_alone(arch):
    model = model_of(arch)
    rows = [random_docs([6, 1, 9], seed=3), random_docs([4, 8], seed=4)]
    packed = build(rows, "indexed_mask", pad_left=arch in SCAN, extra_pad=2)
    assert_packed_grads_equal_alone(model, packed)


@pytest.mark.parametrize("arch", ARCHS)
def test_unpacked_path_is_bit_identical_with_generate(arch):
    ids = torch.tensor([random_docs([9], seed=7)[0], random_docs([9], seed=8)[0]])
    # no left-padded generation: transformers 5.17's falcon_h1 fails it unpatched (a mask of the wrong length)
    assert_unpacked_bit_identical(model_of(arch), ids, left_padded=False)


@pytest.mark.parametrize("arch", MOE)
def test_moe_routing_is_each_document_alone(arch):
    """Every real token is routed as in its document alone (router logits equal token by token, none for padding)."""
    model = model_of(arch)
    docs = random_docs([5, 1, 11, 4], seed=9)
    assert_routing_is_each_document_alone(model, docs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pad_left", [False, True])
def test_padding_only_is_exact(arch, pad_left):
    """One document per row with padding on either side: exact (transformers' own path is exact here too)."""
    model = model_of(arch)
    assert_padding_only_exact(model, random_docs([7, 3, 11], seed=2), pad_left)


@pytest.mark.parametrize("arch", MIXERS)
def test_packed_mixer_equals_the_transformers_mixer(arch):
    """One document: the packed mixer equals the mixer's own torch path; several: each document alone."""
    model = model_of(arch)
    layer = next(m for m in model.modules() if packed_layer_of(m) is not None)
    lengths = [13, 1, 30, 7]
    hidden = torch.randn(1, sum(lengths), model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    with torch.no_grad():
        one = Boundaries.from_cu_seqlens(cu[[0, -1]], batch_shape=(1, sum(lengths)))
        own = layer(hidden)
        assert (packed_layer_of(layer).forward(layer, hidden, one) - own).abs().max() <= EXACT
        many = Boundaries.from_cu_seqlens(cu, batch_shape=(1, sum(lengths)))
        packed = packed_layer_of(layer).forward(layer, hidden, many)
        # (transformers 5.17's Falcon-H1 mixer drops the length dim of a one-token input: reshape)
        alone = torch.cat(
            [layer(hidden[:, a:b]).reshape(1, b - a, -1) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1
        )
    assert (packed - alone).abs().max() <= EXACT
    assert (own - alone).abs().max() > 1e-6  # the stream as one document differs: the comparison can tell


def test_every_listed_type_is_supported():
    from deltapack.models.layers import supported_model_types

    assert set(ARCHS) <= set(supported_model_types())
