"""Context parallelism and FSDP2 across 2 processes on the gloo backend (CPU), against one process.

One spawn runs every check (processes cost ~15 s each to start); each rank writes what it measured to a JSON file
and the tests below assert on it. The stream (192 tokens, documents of 10, 150, 1 and 31 tokens) has documents that
cross the rank boundary, documents wholly on one rank, and one longer than a rank's share (96 tokens contiguous,
48 per part zigzag); a second one puts document starts exactly on part boundaries, a third has parts shorter than
the conv's W - 1 = 3 tokens of context.

Every exactness check comes with its naive twin, each rank treating its tokens as independent documents (no conv
tokens, no state, no keys from the other rank), which must be far off: a no-op would fail.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import deltapack
from deltapack.boundaries import Boundaries
from deltapack.distributed import (
    ContextShard,
    disable_context_parallel,
    enable_context_parallel,
    num_targets,
    token_mean_loss,
)
from deltapack.distributed import ops as cp_ops
from deltapack.distributed.collectives import all_reduce_sum
from deltapack.distributed.fsdp import apply_fsdp, plan_fsdp_groups
from deltapack.ops import reference
from deltapack.tiny import tiny_model
from multirank import run_ranks

WORLD = 2
TOL = 1e-4  # fp32, relative
NAIVE_MIN = 1e-2  # how far the naive split must be, at least
STREAMS = {
    "mixed": [0, 10, 160, 161, 192],  # crosses every part boundary; one 150-token document
    "aligned": [0, 48, 49, 96, 156, 192],  # starts on part boundaries (contiguous: nothing crosses)
    "short_parts": [0, 7, 8],  # zigzag parts of 2 tokens: the conv context spans several parts
}
LAYOUTS = ("contiguous", "zigzag")
MODEL_ARCHS = ("qwen3_5", "qwen3_5_moe")
ATTENTION_ARCHS = ("llama",)  # attention only (the others: one rank holding both zigzag parts, in their own test)
ZAYA = importlib.util.find_spec("transformers.models.zaya") is not None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------- checks (per rank)
def _ops_checks(cu: list[int], layout: str) -> dict[str, float]:
    """The two primitives, CP vs the reference over the whole stream: outputs, input and weight gradients."""
    total = cu[-1]
    bounds = Boundaries.from_cu_seqlens(cu, (1, total))
    shard = ContextShard.build(bounds, None, layout=layout)
    gen = torch.Generator().manual_seed(1)
    out: dict[str, float] = {}

    x, cot = torch.randn(1, total, 6, generator=gen), torch.randn(1, total, 6, generator=gen)
    weight, bias = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    full = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = reference.causal_conv1d_ref(*full, "silu", segments=bounds.segments)
    (y * cot).sum().backward()
    local = [shard.shard(x).detach().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    y_local = cp_ops.causal_conv1d(*local, "silu", shard=shard)
    (y_local * shard.shard(cot)).sum().backward()
    out["conv.out"] = _rel(y_local, shard.shard(y))
    out["conv.dx"] = _rel(local[0].grad, shard.shard(full[0].grad))
    out["conv.dweight"] = _rel(all_reduce_sum(local[1].grad, None, WORLD), full[1].grad)
    out["conv.dbias"] = _rel(all_reduce_sum(local[2].grad, None, WORLD), full[2].grad)
    naive = reference.causal_conv1d_ref(shard.shard(x), weight, bias, "silu", segments=shard.local.segments.pieces)
    out["conv.naive"] = _rel(naive, shard.shard(y))

    q, k = (torch.randn(1, total, 2, 8, generator=gen) for _ in range(2))
    v = torch.randn(1, total, 4, 8, generator=gen)
    g = -torch.empty(1, total, 4).uniform_(1e-3, 5e-2, generator=gen)  # long memory: a lost state shows
    beta = torch.rand(1, total, 4, generator=gen)
    cot = torch.randn(1, total, 4, 8, generator=gen)
    full = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
    o, _ = reference.gated_delta_rule_ref(*full, segments=bounds.segments)
    (o * cot).sum().backward()
    local = [shard.shard(t).detach().requires_grad_() for t in (q, k, v, g, beta)]
    o_local, _ = cp_ops.gated_delta_rule(*local, shard=shard)
    (o_local * shard.shard(cot)).sum().backward()
    out["gdn.out"] = _rel(o_local, shard.shard(o))
    for name, mine, ref in zip(("dq", "dk", "dv", "dg", "dbeta"), local, full):
        out[f"gdn.{name}"] = _rel(mine.grad, shard.shard(ref.grad))
    naive, _ = reference.gated_delta_rule_ref(
        *(shard.shard(t) for t in (q, k, v, g, beta)), segments=shard.local.segments.pieces
    )
    out["gdn.naive"] = _rel(naive, shard.shard(o))
    return out


def _model_checks(
    arch: str, layouts: tuple[str, ...], checkpointing: bool = False, stream: str = "mixed", **config: object
) -> dict[str, float]:
    """A patched tiny model: CP=2 vs one process on the same packed batch (logits, loss, every gradient)."""
    if arch in ATTENTION_ARCHS:
        from helpers import tiny_attention_model

        model = tiny_attention_model(arch, **config)
    else:
        model = deltapack.patch(tiny_model(arch, **config))
    cu = STREAMS[stream]
    total = cu[-1]
    bounds = Boundaries.from_cu_seqlens(cu, (1, total))
    ids = torch.randint(0, model.config.vocab_size, (1, total), generator=torch.Generator().manual_seed(3))
    ref = model(input_ids=ids, labels=ids, boundaries=bounds)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref_logits, ref_loss = ref.logits.detach(), ref.loss.detach()
    out: dict[str, float] = {}
    if checkpointing:
        model.train()
        model.gradient_checkpointing_enable()
    for layout in layouts:
        model.zero_grad(set_to_none=True)
        enable_context_parallel(model)
        shard = ContextShard.build(bounds, None, layout=layout)
        logits = model(input_ids=shard.shard(ids), boundaries=shard.local).logits
        shift = shard.shift_labels(shard.shard(ids))
        loss = token_mean_loss(logits, shift, shard)
        loss.backward()
        key = (
            f"{arch}.{layout}"
            + (".checkpointing" if checkpointing else "")
            + ("" if stream == "mixed" else f".{stream}")
        )
        out[f"{key}.logits"] = _rel(logits, shard.shard(ref_logits))
        out[f"{key}.unshard"] = _rel(shard.unshard(logits.detach()), ref_logits)
        out[f"{key}.loss"] = _rel(all_reduce_sum(loss, None, WORLD), ref_loss)
        out[f"{key}.grads"] = max(
            _rel(all_reduce_sum(p.grad, None, WORLD), ref_grads[n])
            for n, p in model.named_parameters()
            if n in ref_grads
        )
        missing = [n for n, p in model.named_parameters() if n in ref_grads and p.grad is None]
        out[f"{key}.missing_grads"] = float(len(missing))
        with torch.no_grad():  # the transformers loss with labels: shifted across ranks, global token count
            try:
                hf = model(
                    input_ids=shard.shard(ids),
                    labels=shard.shard(ids),
                    boundaries=shard.local,
                    num_items_in_batch=num_targets(shift, shard),
                ).loss
                out[f"{key}.hf_loss"] = _rel(all_reduce_sum(hf, None, WORLD), ref_loss)
            except ValueError as error:  # a model whose own loss shifts the labels cannot see the next rank's
                out[f"{key}.hf_loss_refused"] = float("token_mean_loss" in str(error))
        disable_context_parallel(model)
        pieces = Boundaries.from_cu_seqlens(shard.local_cu_seqlens_host, (1, shard.num_local_tokens))
        with torch.no_grad():
            naive = model(input_ids=shard.shard(ids), boundaries=pieces).logits
        out[f"{key}.naive"] = _rel(naive, shard.shard(ref_logits))
    return out


def _fsdp_checks(rank: int, checkpoint_dir: str) -> dict[str, float]:
    """FSDP2 with bf16 compute: the same loss and reduced gradients as one process computing with the same dtypes
    (projections in bf16, A_log / dt_bias / conv weight in fp32), and not those of all-bf16 or all-fp32 compute."""
    model = deltapack.patch(tiny_model("qwen3_5"))
    taken: set[torch.nn.Parameter] = set()
    names = {p: n for n, p in model.named_parameters()}
    fp32_names: set[str] = set()
    for group in plan_fsdp_groups(model):
        params = [p for p in group.module.parameters() if p not in taken]
        taken |= set(params)
        if group.fp32:
            fp32_names |= {names[p] for p in params}
    cu = [0, 10, 60, 61, 96]
    bounds = Boundaries.from_cu_seqlens(cu, (1, cu[-1]))
    batches = [torch.randint(0, 128, (1, cu[-1]), generator=torch.Generator().manual_seed(5 + r)) for r in range(WORLD)]

    def one_process(keep_fp32: set[str] | None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Each rank's batch on a copy with the compute dtypes of FSDP; gradients averaged in fp32 as FSDP does."""
        losses, grads = [], {}
        for ids in batches:
            copy_ = copy.deepcopy(model)
            with torch.no_grad():
                for n, p in copy_.named_parameters():
                    if keep_fp32 is not None and n not in keep_fp32:
                        p.data = p.data.to(torch.bfloat16)
            result = copy_(input_ids=ids, labels=ids, boundaries=bounds)
            result.loss.backward()
            losses.append(result.loss.detach().float())
            for n, p in copy_.named_parameters():
                grads[n] = grads.get(n, 0) + p.grad.float() / WORLD
        return losses, grads

    expected = one_process(fp32_names)
    all_bf16 = one_process(set())
    all_fp32 = one_process(None)
    apply_fsdp(model)
    ids = batches[rank]
    result = model(input_ids=ids, labels=ids, boundaries=bounds)
    result.loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    out = {"fsdp.num_fp32_params": float(len(fp32_names))}
    for label, (losses, ref_grads) in (("expected", expected), ("all_bf16", all_bf16), ("all_fp32", all_fp32)):
        out[f"fsdp.{label}.loss"] = _rel(result.loss, losses[rank])
        out[f"fsdp.{label}.grads"] = max(_rel(grads[n], ref_grads[n]) for n in ref_grads)
    return out | _checkpoint_checks(model, ids, bounds, checkpoint_dir)


def _checkpoint_checks(model: torch.nn.Module, ids: torch.Tensor, bounds: Boundaries, path: str) -> dict[str, float]:
    """A sharded checkpoint (model + optimizer) saved after one step and loaded back gives the same next step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.step()  # the gradients of the step above
    optimizer.zero_grad()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)

    def step() -> tuple[float, list[torch.Tensor]]:
        loss = model(input_ids=ids, labels=ids, boundaries=bounds).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item(), [p.detach().to_local().clone() for p in model.parameters()]

    loss_saved, params_saved = step()
    loss_next, _ = step()  # without loading: the step after, which must differ
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loss_loaded, params_loaded = step()
    return {
        "checkpoint.loss": abs(loss_loaded - loss_saved),
        "checkpoint.params": max(float((a - b).abs().max()) for a, b in zip(params_loaded, params_saved)),
        "checkpoint.loss_without_loading": abs(loss_next - loss_saved),
    }


def _fsdp_context_parallel_checks() -> dict[str, float]:
    """FSDP2 over the same 2 ranks as context parallelism (fp32 compute, so one process is the exact reference):
    gradients are summed over the context-parallel ranks, not averaged."""
    model = deltapack.patch(tiny_model("qwen3_5"))
    cu = STREAMS["mixed"]
    bounds = Boundaries.from_cu_seqlens(cu, (1, cu[-1]))
    ids = torch.randint(0, model.config.vocab_size, (1, cu[-1]), generator=torch.Generator().manual_seed(4))
    ref = model(input_ids=ids, labels=ids, boundaries=bounds)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    apply_fsdp(enable_context_parallel(model), param_dtype=torch.float32, context_parallel_size=WORLD)
    shard = ContextShard.build(bounds, None, layout="zigzag")
    logits = model(input_ids=shard.shard(ids), boundaries=shard.local).logits
    token_mean_loss(logits, shard.shift_labels(shard.shard(ids)), shard).backward()
    return {
        "fsdp_cp.logits": _rel(logits, shard.shard(ref.logits)),
        "fsdp_cp.grads": max(_rel(p.grad.full_tensor(), ref_grads[n]) for n, p in model.named_parameters()),
    }


def _checks(rank: int, results: dict[str, float], out_dir: str) -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    for stream, cu in STREAMS.items():
        for layout in LAYOUTS:
            results |= {f"ops.{stream}.{layout}.{k}": v for k, v in _ops_checks(cu, layout).items()}
    for arch in MODEL_ARCHS:
        results |= _model_checks(arch, LAYOUTS)
    results |= _model_checks("qwen3_5", ("zigzag",), checkpointing=True)
    for arch in ATTENTION_ARCHS:  # rotary positions continued across ranks; labels refused where documents cross
        results |= _model_checks(arch, LAYOUTS)
    if ZAYA:  # its CCA projection's convs and delayed value read the previous rank's tokens; full attention only
        for stream in ("mixed", "aligned"):
            results |= _model_checks("zaya", LAYOUTS, stream=stream, layer_types=["hybrid", "hybrid"])
    results |= _fsdp_checks(rank, str(Path(out_dir, "checkpoint")))
    results |= _fsdp_context_parallel_checks()


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """Every rank's measurements, the worst over ranks for each key."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ranks = run_ranks(_checks, WORLD, tmp_path_factory.mktemp("gloo"))
    return {k: max(r[k] for r in ranks) for k in ranks[0]} | {f"min.{k}": min(r[k] for r in ranks) for k in ranks[0]}


# ---------------------------------------------------------------------------------------------- assertions
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stream", list(STREAMS))
@pytest.mark.parametrize("op", ["conv", "gdn"])
def test_ops_match_one_process(measured: dict[str, float], op: str, stream: str, layout: str) -> None:
    prefix = f"ops.{stream}.{layout}.{op}."
    checks = {k.removeprefix(prefix): v for k, v in measured.items() if k.startswith(prefix)}
    assert checks and all(v <= TOL for name, v in checks.items() if name != "naive"), checks
    crosses = ContextShard.build(
        Boundaries.from_cu_seqlens(STREAMS[stream], (1, STREAMS[stream][-1])), layout=layout, rank=0, world_size=WORLD
    ).crosses_ranks
    if crosses:  # the same input split naively is wrong
        assert checks["naive"] > NAIVE_MIN, checks
    else:  # nothing crosses a rank boundary: the naive split is exact too, and CP must not change anything
        assert checks["naive"] <= TOL, checks


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", MODEL_ARCHS)
def test_model_matches_one_process(measured: dict[str, float], arch: str, layout: str) -> None:
    key = f"{arch}.{layout}"
    for what in ("logits", "unshard", "loss", "grads", "hf_loss"):
        assert measured[f"{key}.{what}"] <= TOL, (what, measured[f"{key}.{what}"])
    assert measured[f"{key}.missing_grads"] == 0
    assert measured[f"{key}.naive"] > NAIVE_MIN  # the naive split is off (on the rank holding later tokens)


@pytest.mark.skipif(not ZAYA, reason="this transformers has no zaya")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stream", ["mixed", "aligned"])
def test_zaya_matches_one_process(measured: dict[str, float], stream: str, layout: str) -> None:
    """zaya's q/k convs and delayed value read the tokens of the previous rank: a document cut by a rank boundary
    is exact; a document starting exactly on one needs nothing (the naive split is exact there too)."""
    key = "zaya." + layout + ("" if stream == "mixed" else f".{stream}")
    for what in ("logits", "unshard", "loss", "grads"):
        assert measured[f"{key}.{what}"] <= TOL, (what, measured[f"{key}.{what}"])
    assert measured[f"{key}.missing_grads"] == 0
    crosses = ContextShard.build(
        Boundaries.from_cu_seqlens(STREAMS[stream], (1, STREAMS[stream][-1])), layout=layout, rank=0, world_size=WORLD
    ).crosses_ranks
    if crosses:
        assert measured[f"{key}.naive"] > NAIVE_MIN
        # zaya's own loss shifts its labels, so the target on the next rank would be lost: labels are refused
        assert measured[f"min.{key}.hf_loss_refused"] == 1.0
    else:
        assert measured[f"{key}.naive"] <= TOL
        assert measured[f"{key}.hf_loss"] <= TOL


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ATTENTION_ARCHS)
def test_attention_model_matches_one_process(measured: dict[str, float], arch: str, layout: str) -> None:
    """An attention-only family: every rank's queries see their documents' keys of both ranks at their positions
    in the whole document; its own loss shifts labels, so labels= is refused on this crossing stream."""
    key = f"{arch}.{layout}"
    for what in ("logits", "unshard", "loss", "grads"):
        assert measured[f"{key}.{what}"] <= TOL, (what, measured[f"{key}.{what}"])
    assert measured[f"{key}.missing_grads"] == 0
    assert measured[f"{key}.naive"] > NAIVE_MIN
    assert measured[f"min.{key}.hf_loss_refused"] == 1.0


def test_model_with_gradient_checkpointing(measured: dict[str, float]) -> None:
    key = "qwen3_5.zigzag.checkpointing"
    for what in ("logits", "loss", "grads"):
        assert measured[f"{key}.{what}"] <= TOL, (what, measured[f"{key}.{what}"])


def test_fsdp_mixed_precision_keeps_gdn_fp32(measured: dict[str, float]) -> None:
    # 3 GDN layers in the tiny model, each with A_log, dt_bias and the conv weight in its fp32 group
    assert measured["fsdp.num_fp32_params"] == 9
    # what one process gets with the same compute dtypes, up to the order of the fp32 gradient reduction
    assert measured["fsdp.expected.loss"] <= 1e-6
    assert measured["fsdp.expected.grads"] <= 1e-5
    # and clearly not all-bf16 (A_log rounded) nor all-fp32 (no mixed precision)
    assert measured["min.fsdp.all_bf16.grads"] > 100 * max(measured["fsdp.expected.grads"], 1e-7)
    assert measured["min.fsdp.all_fp32.grads"] > 100 * max(measured["fsdp.expected.grads"], 1e-7)


def test_fsdp_sharded_checkpoint_gives_the_same_next_step(measured: dict[str, float]) -> None:
    assert measured["checkpoint.loss"] == 0 and measured["checkpoint.params"] == 0
    assert measured["min.checkpoint.loss_without_loading"] > 1e-4  # loading did something


def test_fsdp_with_context_parallelism_matches_one_process(measured: dict[str, float]) -> None:
    assert measured["fsdp_cp.logits"] <= TOL and measured["fsdp_cp.grads"] <= TOL
