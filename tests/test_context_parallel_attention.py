"""Attention-only families on a context-parallel shard: exact, or refused.

One rank holding both zigzag parts (world size 1: the exchanges run without a process group;
``tests/test_distributed_gloo.py`` runs llama on two ranks): the rank's logits and gradients equal the whole stream's
and each document's alone, with rotary positions continued across the part boundary; the same pieces run as
independent documents (no exchange) differ where a document crosses the boundary, so the test can fail. A windowed
layer, soft-capping or sinks, and a model type not verified, raise a ValueError instead of running wrong.
"""

from __future__ import annotations

import pytest
import torch

import deltapack
from deltapack import Boundaries
from deltapack.audit.core import ATOL, GRAD_RTOL
from deltapack.distributed import (
    CONTEXT_PARALLEL_MODEL_TYPES,
    ContextShard,
    disable_context_parallel,
    enable_context_parallel,
)
from deltapack.distributed.attention import context_parallel_attention
from deltapack.tiny import tiny_model
from helpers import tiny_attention_model

# plain causal (llama), rotary with a window off (mistral), q/k biases (qwen2), q/k norms (qwen3), MoE (qwen3_moe),
# fused qkv (phi3)
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3"]
# GDN hybrids beside qwen3_5 (tests/test_distributed_gloo.py runs qwen3_5 on two ranks): their conv and recurrence read
# the shard from the boundaries, their full-attention layers take the context-parallel attention
GDN_HYBRIDS = ["qwen3_next", "olmo_hybrid"]
STREAMS = [
    [0, 5, 30, 31, 40],  # a document across the part boundary (20), a one-token one after it
    [0, 19, 20, 21, 40],  # a one-token document ending at the boundary, one starting exactly at it
    [0, 1, 2, 40],  # one-token documents, then one that covers both parts
]


def _bounds(cu: list[int]) -> Boundaries:
    return Boundaries.from_cu_seqlens(torch.tensor(cu, dtype=torch.int32), (1, cu[-1]))


def _rel(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    if want is None:
        return 0.0 if got is None else float(got.abs().max())
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


@pytest.mark.parametrize("cu", STREAMS)
@pytest.mark.parametrize("arch", FAMILIES + GDN_HYBRIDS)
def test_shard_equals_whole_stream_and_each_document_alone(arch: str, cu: list[int]) -> None:
    if arch in GDN_HYBRIDS:
        pytest.importorskip(f"transformers.models.{arch}")
        model = deltapack.patch(tiny_model(arch).float().eval())
    else:
        model = tiny_attention_model(arch)
    total = cu[-1]
    bounds = _bounds(cu)
    ids = torch.randint(3, 100, (1, total), generator=torch.Generator().manual_seed(3))
    cot = torch.randn(1, total, model.config.vocab_size, generator=torch.Generator().manual_seed(4))
    params = [p for p in model.parameters() if p.requires_grad]

    whole = model(input_ids=ids, boundaries=bounds).logits
    whole_grads = torch.autograd.grad((whole * cot).sum(), params, allow_unused=True)
    alone_grads: list[torch.Tensor | None] = [None] * len(params)
    alone = []
    for a, b in zip(cu[:-1], cu[1:]):
        logits = model(input_ids=ids[:, a:b]).logits
        grads = torch.autograd.grad((logits * cot[:, a:b]).sum(), params, allow_unused=True)
        alone_grads = [g if s is None else (s if g is None else s + g) for s, g in zip(alone_grads, grads)]
        alone.append(logits.detach())
    alone_logits = torch.cat(alone, dim=1)

    shard = ContextShard.build(bounds, layout="zigzag", rank=0, world_size=1)
    enable_context_parallel(model)
    try:
        local = model(input_ids=shard.shard(ids), boundaries=shard.local).logits
        local_grads = torch.autograd.grad((local * shard.shard(cot)).sum(), params, allow_unused=True)
        if shard.crosses_ranks and arch not in GDN_HYBRIDS:  # its own loss shifts labels: no next part's target
            with pytest.raises(ValueError, match="token_mean_loss"):
                model(input_ids=shard.shard(ids), labels=shard.shard(ids), boundaries=shard.local)
    finally:
        disable_context_parallel(model)
    assert (local.detach() - shard.shard(whole.detach())).abs().max() <= ATOL
    assert (shard.unshard(local.detach()) - alone_logits).abs().max() <= ATOL
    assert max(_rel(got, want) for got, want in zip(local_grads, whole_grads)) <= GRAD_RTOL
    assert max(_rel(got, want) for got, want in zip(local_grads, alone_grads)) <= GRAD_RTOL

    with torch.no_grad():  # the same pieces as independent documents: wrong wherever one crosses the boundary
        pieces = _bounds(list(shard.local_cu_seqlens_host))
        naive = model(input_ids=shard.shard(ids), boundaries=pieces).logits
    naive_diff = float((naive - shard.shard(whole.detach())).abs().max())
    assert naive_diff > 1e-2 if shard.crosses_ranks else naive_diff == 0.0


def test_a_windowed_layer_is_refused_on_a_shard() -> None:
    """mistral with a window shorter than its documents: the context-parallel attention has none, so it raises."""
    model = tiny_attention_model("mistral", sliding_window=3)
    shard = ContextShard.build(_bounds([0, 30, 40]), layout="zigzag", rank=0, world_size=1)
    enable_context_parallel(model)
    try:
        with pytest.raises(ValueError, match="sliding_window=3"):
            model(input_ids=torch.randint(3, 100, (1, 40)), boundaries=shard.local)
    finally:
        disable_context_parallel(model)


@pytest.mark.parametrize("name,value", [("softcap", 50.0), ("s_aux", torch.zeros(2)), ("sinks", torch.zeros(2))])
def test_soft_capping_and_sinks_are_refused(name: str, value: object) -> None:
    shard = ContextShard.build(_bounds([0, 30, 40]), layout="zigzag", rank=0, world_size=1)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    with pytest.raises(ValueError, match=name):
        context_parallel_attention(None, q, k, v, boundaries=shard.local, **{name: value})


@pytest.mark.parametrize("arch", ["bloom", "gpt_oss", "llama4_text"])  # ALiBi, sinks, chunked attention
def test_a_model_type_not_verified_is_refused(arch: str) -> None:
    pytest.importorskip(f"transformers.models.{arch.removesuffix('_text')}")
    assert arch not in CONTEXT_PARALLEL_MODEL_TYPES
    model = tiny_attention_model(arch)
    with pytest.raises(ValueError, match=f"not verified for model type '{arch}'"):
        enable_context_parallel(model)
    assert model.config._attn_implementation != "deltapack_context_parallel"
