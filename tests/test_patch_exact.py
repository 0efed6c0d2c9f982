"""Packed documents give the logits and gradients of each document alone, for every input format.

Every test also runs the unpatched model on the same input and checks that it leaks (or raises), so a no-op
patch fails these tests. The one exception is a batch that only pads (one document per row): transformers is
exact there already, which ``test_padding_only_is_exact`` states and checks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import (
    ARCHS,
    EXACT,
    LEAK,
    alone_logits,
    assert_packed_grads_equal_alone,
    assert_packed_logits_equal_alone,
    assert_padding_only_exact,
    cached_model,
    doc_loss_sum,
    packed_examples,
    patched,
    random_docs,
)
from packing import build, max_doc_diff


@given(**packed_examples(ARCHS), conv_width=st.integers(2, 4), ratio=st.integers(1, 2))
def test_packed_logits_equal_alone(rows, fmt, arch, attn, conv_width, ratio, pad_left, extra_pad, seed):
    model = cached_model(arch, attn, conv_width, ratio)
    assert_packed_logits_equal_alone(model, rows, fmt, seed=seed, pad_left=pad_left, extra_pad=extra_pad)


@pytest.mark.parametrize("arch", ARCHS)
def test_position_ids_with_default_use_cache(arch):
    """transformers' auto-created cache turns its packed-sequence detection off; patched, the default is exact."""
    model = cached_model(arch)
    packed = build([random_docs([5, 1, 9, 4], seed=1)], "position_ids")
    alone = alone_logits(model, packed.docs)
    with torch.no_grad():
        leaky = model(**packed.kwargs).logits  # use_cache left at its default
    assert max_doc_diff(leaky, packed, alone) > LEAK
    with patched(model), torch.no_grad():
        assert max_doc_diff(model(**packed.kwargs).logits, packed, alone) <= EXACT


@pytest.mark.parametrize("pad_left", [False, True])
def test_padding_only_is_exact(pad_left):
    """One document per row with padding: unpadded by deltapack, exact; transformers is exact here too."""
    model = cached_model("qwen3_5")
    assert_padding_only_exact(model, random_docs([7, 3, 11], seed=2), pad_left)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", ["indexed_mask", "position_ids"])
def test_packed_gradient_equals_sum_of_alone(arch, fmt):
    model = cached_model(arch)
    rows = [random_docs([6, 1, 9], seed=3), random_docs([4, 8], seed=4)]
    packed = build(rows, fmt, pad_left=False, extra_pad=2)
    assert_packed_grads_equal_alone(model, packed)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_loss_does_not_predict_across_documents(arch):
    """With labels, the patched model's loss is the token mean over each document's own next-token targets."""
    model = cached_model(arch)
    packed = build([random_docs([5, 7, 3], seed=5)], "indexed_mask")
    labels = packed.kwargs["input_ids"].clone()
    with torch.no_grad():
        alone = [model(torch.tensor([d])).logits[0] for d in packed.docs]
        expected = sum(doc_loss_sum(a, d) for a, d in zip(alone, packed.docs)) / sum(len(d) - 1 for d in packed.docs)
        leaky = model(**packed.kwargs, labels=labels, use_cache=False).loss
        assert abs(leaky.item() - expected.item()) > LEAK
        with patched(model):
            loss = model(**packed.kwargs, labels=labels).loss
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
