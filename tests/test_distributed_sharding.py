"""Context-parallel bookkeeping, in one process: which tokens each rank holds, where documents are cut, and the
exchanges of one rank whose two zigzag parts cut a document (world size 1, no process group needed).

The multi-process checks (2 ranks on gloo, model included) are in test_distributed_gloo.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deltapack
from deltapack.boundaries import Boundaries
from deltapack.distributed import ContextShard, enable_context_parallel, padded_total
from deltapack.distributed import ops as cp_ops
from deltapack.distributed.fsdp import FP32_PARAMETERS, apply_fsdp, plan_fsdp_groups
from deltapack.models.attention import CONTEXT_PARALLEL, attention_inputs
from deltapack.ops import reference


def _bounds(lengths: list[int]) -> Boundaries:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return Boundaries.from_cu_seqlens(cu, (1, cu[-1]))


def _shards(bounds: Boundaries, world: int, layout: str) -> list[ContextShard]:
    return [ContextShard.build(bounds, layout=layout, rank=r, world_size=world) for r in range(world)]


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[int], int, str]:
    world = draw(st.integers(1, 3))
    layout = draw(st.sampled_from(["contiguous", "zigzag"]))
    parts = world * (2 if layout == "zigzag" else 1)
    part_len = draw(st.integers(1, 12))
    total = parts * part_len
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), max_size=min(8, total - 1)))) if total > 1 else []
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    return lengths, world, layout


@settings(max_examples=40, deadline=None)
@given(streams())
def test_shards_cover_the_stream_and_cut_documents_at_part_boundaries(case: tuple[list[int], int, str]) -> None:
    lengths, world, layout = case
    bounds = _bounds(lengths)
    doc = bounds.seq_idx[0].long()
    pos = bounds.position_ids[0]
    shards = _shards(bounds, world, layout)
    index = torch.cat([s.local_index for s in shards])
    assert torch.equal(index.sort().values, torch.arange(bounds.total_tokens))  # every token on exactly one rank
    for shard in shards:
        local = shard.local
        idx = shard.local_index
        assert local.segments.shard is shard and local.batch_shape == (1, idx.numel())
        assert torch.equal(local.position_ids[0], pos[idx])  # global in-document positions (RoPE sees them)
        # a local piece starts exactly where the global document changes or a part starts
        part_start = torch.zeros(idx.numel(), dtype=torch.bool)
        part_start[:: shard.part_len] = True
        new_doc = torch.ones_like(part_start)
        new_doc[1:] = doc[idx[1:]] != doc[idx[:-1]]
        starts = torch.zeros_like(part_start)
        starts[list(local.cu_seqlens_host[:-1])] = True
        assert torch.equal(starts, part_start | new_doc)
        for part in shard.parts:
            first, last = part.start, part.end - 1
            assert part.context_before == int(pos[first])
            assert part.continues == (part.end < bounds.total_tokens and bool(doc[part.end] == doc[last]))
            doc_start = first - int(pos[first])
            assert part.parts_before == part.chain - doc_start // shard.part_len
            assert part.docs == tuple(range(int(doc[first]), int(doc[last]) + 1))
    assert shards[0].crosses_ranks == any(p.context_before > 0 for p in shards[0].chain)


@settings(max_examples=40, deadline=None)
@given(streams())
def test_bookkeeping_agrees_with_fla(case: tuple[list[int], int, str]) -> None:
    """Where FLA is installed (GPU machines): the same local offsets, conv context and chain flags as FLA's own
    context-parallel partition, which its kernels read."""
    context = pytest.importorskip("fla.ops.cp.context", reason="FLA (a GPU extra) is not installed")
    lengths, world, layout = case
    bounds = _bounds(lengths)
    for shard in _shards(bounds, world, layout):
        theirs = context.get_cp_cu_seqlens(
            bounds.cu_seqlens.cpu().long(), world_size=world, rank=shard.rank, layout=layout, conv1d_kernel_size=4
        )
        parts = shard.parts
        assert tuple(theirs.cu_seqlens_cpu.tolist()) == shard.local_cu_seqlens_host
        if layout == "contiguous":
            (part,) = parts
            assert theirs.pre_num_conv_tokens == part.context_before
            assert theirs.pre_num_ranks == part.parts_before and theirs.is_first_rank == (part.parts_before == 0)
            assert theirs.is_last_rank == (not part.continues)
        else:
            assert theirs.front_num_seqs == parts[0].num_pieces
            assert theirs.pre_num_conv_tokens_by_part == tuple(p.context_before for p in parts)
            assert theirs.pre_num_ranks_by_part == tuple(p.parts_before for p in parts)
            assert theirs.is_last_by_part == tuple(not p.continues for p in parts)


def test_zigzag_pairs_early_and_late_parts() -> None:
    shards = _shards(_bounds([40]), 4, "zigzag")
    assert [tuple(p.chain for p in s.parts) for s in shards] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert [shards[0].owner(c) for c in range(8)] == [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (2, 1), (1, 1), (0, 1)]
    # rank 0's buffer is [part 0; part 7] and its two parts stay separate pieces of the one document
    assert shards[0].local_cu_seqlens_host == (0, 5, 10)
    assert shards[0].local_index.tolist() == [0, 1, 2, 3, 4, 35, 36, 37, 38, 39]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layout="ring", rank=0, world_size=2), "layout"),
        (dict(layout="contiguous", rank=0, world_size=4), "multiple of 4"),
        (dict(layout="zigzag", rank=0, world_size=2), "pad the stream to 12"),
        (dict(layout="contiguous", rank=2, world_size=2), "0 <= rank < world_size"),
        (dict(layout="contiguous", rank=0), "both rank and world_size"),
    ],
)
def test_bad_sharding_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ContextShard.build(_bounds([3, 7]), **kwargs)


def test_padded_total() -> None:
    assert padded_total(10, 2, "contiguous") == 10
    assert padded_total(10, 2, "zigzag") == 12
    assert padded_total(13, 3, "zigzag") == 18


def test_shift_labels_across_parts_equals_one_device() -> None:
    bounds = _bounds([3, 9, 1, 3])
    shard = ContextShard.build(bounds, layout="zigzag", rank=0, world_size=1)
    labels = torch.arange(100, 100 + bounds.total_tokens).unsqueeze(0)
    expected = shard.shard(bounds.shift_labels(labels))
    assert torch.equal(shard.local.shift_labels(shard.shard(labels)), expected)
    # per piece on its own, the cut document (tokens 3..11, cut at 8) would lose the target of its token 7
    pieces = Boundaries.from_cu_seqlens(shard.local_cu_seqlens_host, (1, shard.num_local_tokens))
    assert not torch.equal(pieces.shift_labels(shard.shard(labels)), expected)


def _one_rank_two_parts() -> tuple[Boundaries, ContextShard]:
    # zigzag over one rank: parts [0, 24) and [24, 48); the 30-token document crosses from one to the other
    bounds = _bounds([5, 30, 1, 12])
    return bounds, ContextShard.build(bounds, layout="zigzag", rank=0, world_size=1)


@pytest.mark.parametrize("width", [2, 4])
def test_conv_hands_tokens_across_parts(width: int) -> None:
    bounds, shard = _one_rank_two_parts()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 48, 6, generator=gen, requires_grad=True)
    weight = torch.randn(6, width, generator=gen)
    ref = reference.causal_conv1d_ref(x, weight, None, "silu", segments=bounds.segments)
    x_local = shard.shard(x.detach()).requires_grad_()
    out = cp_ops.causal_conv1d(x_local, weight, None, "silu", shard=shard)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)  # one rank holds the stream in order
    cot = torch.randn(ref.shape, generator=gen)
    (ref * cot).sum().backward()
    (out * cot).sum().backward()
    assert torch.allclose(x_local.grad, x.grad, atol=1e-6, rtol=0)
    naive = reference.causal_conv1d_ref(x_local.detach(), weight, None, "silu", segments=shard.local.segments.pieces)
    assert (naive - ref).abs().max() > 1e-2


def test_token_shift_hands_the_previous_token_across_parts() -> None:
    from deltapack.ops.token_shift import token_shift, token_shift_ref

    bounds, shard = _one_rank_two_parts()
    x = torch.randn(1, 48, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ref = token_shift_ref(x, segments=bounds.segments)
    x_local = shard.shard(x.detach()).requires_grad_()
    out = token_shift(x_local, segments=shard.local.segments)  # through the shard's hook
    assert torch.equal(out, ref)  # one rank holds the stream in order
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    (ref * cot).sum().backward()
    (out * cot).sum().backward()
    assert torch.equal(x_local.grad, x.grad)
    naive = token_shift_ref(x_local.detach(), segments=shard.local.segments.pieces)
    assert not torch.equal(naive, ref.detach())  # the cut document's token 24 would read zeros


def test_gated_delta_rule_hands_state_across_parts() -> None:
    bounds, shard = _one_rank_two_parts()
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 48, 2, 8, generator=gen) for _ in range(2))
    v = torch.randn(1, 48, 4, 8, generator=gen)
    g = -torch.empty(1, 48, 4).uniform_(1e-3, 5e-2, generator=gen)
    beta = torch.rand(1, 48, 4, generator=gen)
    full = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
    local = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
    ref, _ = reference.gated_delta_rule_ref(*full, segments=bounds.segments)
    out, _ = cp_ops.gated_delta_rule(*local, shard=shard)
    assert float((out - ref).detach().norm() / ref.detach().norm()) <= 1e-5
    cot = torch.randn(ref.shape, generator=gen)
    (ref * cot).sum().backward()
    (out * cot).sum().backward()
    for mine, theirs in zip(local, full):
        assert float((mine.grad - theirs.grad).norm() / theirs.grad.norm()) <= 1e-4
    naive, _ = reference.gated_delta_rule_ref(q, k, v, g, beta, segments=shard.local.segments.pieces)
    assert float((naive - ref.detach()).norm() / ref.detach().norm()) > 1e-2


def test_context_parallel_attention_needs_its_implementation() -> None:
    bounds, shard = _one_rank_two_parts()
    assert attention_inputs(shard.local, CONTEXT_PARALLEL, torch.float32) == (None, {})
    with pytest.raises(ValueError, match="context-parallel shard"):
        attention_inputs(shard.local, "sdpa", torch.float32)
    with pytest.raises(ValueError, match="context-parallel shard"):
        attention_inputs(bounds, CONTEXT_PARALLEL, torch.float32)


def test_enable_context_parallel_needs_a_patched_model() -> None:
    from deltapack.tiny import tiny_model

    model = tiny_model("qwen3_5")
    with pytest.raises(ValueError, match="patched model"):
        enable_context_parallel(model)
    deltapack.patch(model)
    try:
        enable_context_parallel(model)
        assert model.config._attn_implementation == CONTEXT_PARALLEL
    finally:
        from deltapack.distributed import disable_context_parallel

        disable_context_parallel(deltapack.unpatch(model))
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe", "qwen3_next"])
@pytest.mark.parametrize("fp32_norms", [False, True])
def test_fsdp_plan_keeps_gdn_decay_in_fp32_groups(arch: str, fp32_norms: bool) -> None:
    from deltapack.tiny import tiny_model

    model = tiny_model(arch)
    groups = plan_fsdp_groups(model, fp32_norms=fp32_norms)
    owner: dict[str, tuple[str, bool]] = {}
    names = {p: n for n, p in model.named_parameters()}
    for i, group in enumerate(groups):
        # bottom-up: no later group lies inside an earlier one
        assert not any(group.module in set(earlier.module.modules()) for earlier in groups[:i])
        for p in group.module.parameters():
            owner.setdefault(names[p], (group.name, group.fp32))
    every = set(names.values())
    assert set(owner) == every  # every parameter in a group (the first, deepest, that reaches it)
    fp32 = {n for n, (_, is_fp32) in owner.items() if is_fp32}
    decay = {n for n in every if n.rsplit(".", 1)[-1] in FP32_PARAMETERS}
    conv = {n for n in every if ".conv1d." in n}
    norms = {n for n in every if n.endswith("norm.weight") and ".linear_attn.norm." not in n}
    assert decay and decay <= fp32 and conv <= fp32
    assert fp32 == decay | conv | (norms if fp32_norms else set())
    assert groups[-1].module is model and not groups[-1].fp32


def test_apply_fsdp_wants_fp32_master_weights() -> None:
    from deltapack.tiny import tiny_model

    with pytest.raises(ValueError, match="expected fp32 parameters"):
        apply_fsdp(tiny_model("qwen3_5").to(torch.bfloat16))


def test_context_parallel_ops_refuse_fla_where_it_cannot_run() -> None:
    """Asking for FLA's context-parallel kernels without CUDA raises and names the way out; the reference runs."""
    bounds = _bounds([5, 11])
    shard = ContextShard.build(bounds, None, layout="contiguous", rank=0, world_size=1)
    x, weight = torch.randn(1, 16, 6), torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        cp_ops.causal_conv1d(x, weight, shard=shard, backend="fla")
    q = k = torch.randn(1, 16, 2, 8)
    v, g, beta = torch.randn(1, 16, 2, 8), -torch.rand(1, 16, 2), torch.rand(1, 16, 2)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        cp_ops.gated_delta_rule(q, k, v, g, beta, shard=shard, backend="fla")
    out = cp_ops.causal_conv1d(x, weight, shard=shard, backend="reference")
    want = reference.causal_conv1d_ref(x, weight, segments=bounds.segments)
    assert torch.equal(out, want)
