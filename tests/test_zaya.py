"""ZAYA after ``deltapack.patch``: its CCA projection (q/k through two stacked causal convs, half of each value head
from the previous token) gives each packed document what it gives the document alone, forward and gradient, with
the unpatched projection leaking on the same input; the whole model is exact in every input format; the unpacked
path, generate() included, is bit-identical."""

from __future__ import annotations

import pytest
import torch

from deltapack import Boundaries
from deltapack.audit.core import ATOL, GRAD_RTOL
from deltapack.tiny import tiny_model
from helpers import assert_exact_in_every_format, assert_unpacked_bit_identical, checkpointed_grads, norm_rel

pytest.importorskip("transformers.models.zaya.modeling_zaya")
from deltapack.models.families.zaya import packed_cca_projection  # noqa: E402

LENGTHS = [5, 1, 9, 2, 1, 7]


def _projection(cca_time0: int, cca_time1: int, attention_bias: bool) -> torch.nn.Module:
    model = tiny_model("zaya", cca_time0=cca_time0, cca_time1=cca_time1, attention_bias=attention_bias)
    proj = model.model.layers[0].self_attn.qkv_proj
    with torch.no_grad():  # biases away from zero, so a tap that reads the wrong fill shows
        for name, p in proj.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return proj


def _bounds(lengths: list[int]) -> Boundaries:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return Boundaries.from_cu_seqlens(cu, (1, sum(lengths)))


def _grads(proj: torch.nn.Module, x: torch.Tensor, outs: tuple, weights: tuple) -> list[torch.Tensor]:
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    return list(torch.autograd.grad(loss, [x, *proj.parameters()]))


@pytest.mark.parametrize("widths,bias", [((3, 2), False), ((2, 2), True), ((2, 4), True)])
def test_cca_projection_packed_equals_each_document_alone(widths: tuple[int, int], bias: bool):
    proj = _projection(*widths, bias)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, sum(LENGTHS), proj.hidden_size, generator=gen, requires_grad=True)
    packed = packed_cca_projection(proj, x, _bounds(LENGTHS))
    weights = tuple(torch.randn(o.shape, generator=gen) for o in packed)
    packed_grads = _grads(proj, x, packed, weights)

    alone, alone_grads = [], None
    for a, b in zip(_bounds(LENGTHS).cu_seqlens_host[:-1], _bounds(LENGTHS).cu_seqlens_host[1:]):
        piece = x.detach()[:, a:b].clone().requires_grad_()
        outs = proj(piece, None)
        grads = _grads(proj, piece, outs, tuple(w[:, a:b] for w in weights))
        alone.append([o.detach() for o in outs])
        if alone_grads is None:
            alone_grads = [torch.zeros_like(x), *grads[1:]]
        else:
            alone_grads[1:] = [g0 + g for g0, g in zip(alone_grads[1:], grads[1:])]
        alone_grads[0][:, a:b] = grads[0]
    alone = [torch.cat(parts, dim=1) for parts in zip(*alone)]

    for got, want in zip(packed, alone):
        assert got.shape == want.shape
        assert (got.detach() - want).abs().max() <= ATOL
    for got, want in zip(packed_grads, alone_grads):
        assert float((got - want).norm() / want.norm()) <= GRAD_RTOL
    with torch.no_grad():  # the projection's own forward over the stream reads across documents: the test can fail
        leaked = proj(x.detach(), None)
    assert max(float((got - want).abs().max()) for got, want in zip(leaked, alone)) > 1e-2


def test_cca_projection_rejects_a_stream_of_the_wrong_length():
    proj = _projection(3, 2, False)
    with pytest.raises(ValueError, match="unpadded stream"):
        packed_cca_projection(proj, torch.randn(1, sum(LENGTHS) + 1, proj.hidden_size), _bounds(LENGTHS))


def test_zaya_packed_equals_alone_in_every_format():
    model = tiny_model("zaya")
    assert_exact_in_every_format(model, "zaya")


def test_zaya_unpacked_path_bit_identical_with_generate():
    model = tiny_model("zaya")
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(3))
    assert_unpacked_bit_identical(model, ids)


def test_zaya_gradient_checkpointing_keeps_documents_apart():
    """Training mode with transformers' gradient checkpointing: the CCA projection replayed in the backward pass
    still sees the batch's documents; gradients equal the sum of each document's gradients alone."""
    model = tiny_model("zaya")
    gen = torch.Generator().manual_seed(5)
    rows = [[torch.randint(3, 100, (n,), generator=gen).tolist() for n in (6, 1, 9)], [[5, 6, 7, 8]]]
    alone, packed, leaked = checkpointed_grads(model, rows)
    assert norm_rel(packed, alone) <= GRAD_RTOL
    assert norm_rel(leaked, alone) > 100 * GRAD_RTOL


def _context_parallel_logits(model: torch.nn.Module, ids: torch.Tensor, shard) -> torch.Tensor:
    """[1, local tokens, vocab] logits of one rank's tokens of ``ids`` [1, total] under context parallelism."""
    from deltapack.distributed import disable_context_parallel, enable_context_parallel

    enable_context_parallel(model)
    try:
        logits = model(input_ids=shard.shard(ids), boundaries=shard.local).logits
    finally:
        disable_context_parallel(model)
    return logits


@pytest.mark.parametrize(
    "cu",
    [
        [0, 5, 30, 31, 40],  # a document across the part boundary (20), a one-token one after it
        [0, 19, 20, 21, 40],  # a one-token document ending at the boundary, one starting exactly at it
        [0, 1, 2, 40],  # one-token documents, then one that covers both parts
    ],
)
def test_context_parallel_shard_equals_whole_stream_and_each_document_alone(cu: list[int]):
    """One rank holding both zigzag parts (world size 1: the exchanges run without a process group; the gloo test
    runs two ranks): the rank's logits and gradients equal the whole stream's and each document's alone; the same
    pieces run as independent documents (no exchange) differ where a document crosses the part boundary, and equal
    it where none does."""
    import deltapack
    from deltapack.distributed import ContextShard

    model = deltapack.patch(tiny_model("zaya", layer_types=["hybrid", "hybrid"]))
    with torch.no_grad():  # convs of order one and a key scale (zero at init: uniform attention) that lets q and k
        # matter, so a wrong tap across the part boundary shows in the logits, not only in the gradients
        for name, p in model.named_parameters():
            if ".qkv_proj.conv_" in name or name.endswith("qk_norm.temp"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    total = cu[-1]
    bounds = _bounds([b - a for a, b in zip(cu[:-1], cu[1:])])
    ids = torch.randint(3, 100, (1, total), generator=torch.Generator().manual_seed(3))
    cot = torch.randn(1, total, model.config.vocab_size, generator=torch.Generator().manual_seed(4))
    params = [p for p in model.parameters() if p.requires_grad]

    whole = model(input_ids=ids, boundaries=bounds).logits
    whole_grads = torch.autograd.grad((whole * cot).sum(), params, allow_unused=True)
    shard = ContextShard.build(bounds, layout="zigzag", rank=0, world_size=1)
    local = _context_parallel_logits(model, ids, shard)
    local_grads = torch.autograd.grad((local * shard.shard(cot)).sum(), params, allow_unused=True)
    assert (local.detach() - shard.shard(whole.detach())).abs().max() <= ATOL
    for got, want in zip(local_grads, whole_grads):
        if want is not None:
            assert float((got - want).norm() / want.norm().clamp(min=1e-30)) <= GRAD_RTOL

    with torch.no_grad():
        alone = torch.cat([model(input_ids=ids[:, a:b]).logits for a, b in zip(cu[:-1], cu[1:])], dim=1)
        assert (shard.unshard(local.detach()) - alone).abs().max() <= ATOL
        pieces = Boundaries.from_cu_seqlens(
            torch.tensor(shard.local_cu_seqlens_host, dtype=torch.int32), (1, shard.num_local_tokens)
        )
        naive = model(input_ids=shard.shard(ids), boundaries=pieces).logits
    naive_diff = float((naive - shard.shard(whole.detach())).abs().max())
    assert naive_diff > 1e-2 if shard.crosses_ranks else naive_diff == 0.0


def test_context_parallel_refuses_a_sliding_window_layer():
    """The context-parallel attention has no window: zaya's windowed layers raise rather than attend too far."""
    import deltapack
    from deltapack.distributed import ContextShard

    model = deltapack.patch(tiny_model("zaya"))
    assert "hybrid_sliding" in model.config.layer_types
    bounds = _bounds([30, 10])
    shard = ContextShard.build(bounds, layout="zigzag", rank=0, world_size=1)
    with pytest.raises(ValueError, match="sliding_window"):
        _context_parallel_logits(model, torch.randint(3, 100, (1, 40)), shard)
