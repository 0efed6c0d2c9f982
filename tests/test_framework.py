"""The family registry and the packing scope that every patched model runs under."""

import pytest
import torch

import deltapack
from deltapack.models.layers import Family, family_of, register_family, supported_model_types
from deltapack.models.scope import active_boundaries, packing_scope
from deltapack.tiny import tiny_model


def test_the_gdn_family_is_registered():
    assert {"qwen3_5", "qwen3_5_moe", "qwen3_next"} <= set(supported_model_types())
    assert family_of("qwen3_5_text").name == "gated_deltanet"


def test_a_model_type_claimed_twice_raises():
    with pytest.raises(ValueError, match="claimed by"):
        register_family(Family("another", ("qwen3_5",)))
    assert family_of("qwen3_5").name == "gated_deltanet"


def test_packing_scope_nests_and_resets():
    bounds = deltapack.Boundaries.from_document_ids(torch.tensor([[1, 1, 2]]))
    assert active_boundaries() is None
    with packing_scope(bounds):
        assert active_boundaries() is bounds
        with packing_scope(None):
            assert active_boundaries() is None
        assert active_boundaries() is bounds
    assert active_boundaries() is None


def test_the_layers_see_the_scope_during_a_packed_call_only():
    model = deltapack.patch(tiny_model("qwen3_5"))
    seen = []
    layer = model.model.layers[0]
    layer.register_forward_pre_hook(lambda *_: seen.append(active_boundaries()))
    ids = torch.randint(0, 128, (1, 6))
    model(ids, attention_mask=torch.tensor([[1, 1, 1, 2, 2, 2]]))
    model(ids)
    assert seen[0] is not None and seen[0].num_docs == 2
    assert seen[1] is None
