"""Mamba layer benchmark: one SSD layer and one Mamba1 layer, bf16 forward+backward on one packed row.

SSD: a Nemotron-H mixer (d_model 4096, 128 heads of 64, d_state 128, 8 groups). Mamba1: a FalconMamba mixer
(d_model 4096, d_inner 8192, d_state 16). 32768 real tokens in documents drawn as in benchmarks/e2e-spec.json.
For each layer:
- patched: deltapack's packed mixer with the batch's boundaries (exact per document; the backend the op chooses);
- no_boundaries: the same packed mixer and kernels with the row as one document (what boundaries cost);
- unpatched: the transformers mixer on the same row, its torch path (one sequence: it leaks); Mamba1's torch path
  is a Python loop over tokens, so it is timed on the first ``--unpatched-tokens`` tokens (default 4096; 0: the whole
  row) and scaled linearly to the row, which the JSON states (``timed_tokens``, ``scale``, ``measured_ms``);
- projections: the layer's in_proj and out_proj alone, forward+backward on the same row: the floor no packed layer
  can go below, with the TFLOP/s reached and the best speed-up over the unpatched layer that floor allows;
- scan_op (SSD): the scan op alone, forward+backward, with the layer's shapes (fp32, as the layer calls it);
- exactness on sampled documents: the kernel path vs the reference op (outputs and input gradients, fp32 inputs),
  and the packed layer's rows vs the transformers mixer run on each sampled document alone;
- host syncs of the patched forward+backward with boundaries built beforehand (as a collator builds them).
Every stage is in try/except; the JSON is written after each one.

    python benchmarks/bench_mamba.py --out mamba_layers.json                       # an H200
    python benchmarks/bench_mamba.py --dry                                          # CPU, tiny dims, a check
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from common import document_lengths

from deltapack import Boundaries
from deltapack.diagnostics import count_host_syncs
from deltapack.models.families.selective_scan import NORMED
from deltapack.models.mamba import packed_scan_mixer, packed_ssd_mixer
from deltapack.ops import ssd as ssd_ops
from deltapack.ops.selective_scan import SELECTIVE_SCAN, selective_scan, selective_scan_ref
from deltapack.ops.ssd import SSD, ssd, ssd_ref

FULL = dict(
    ssd=dict(hidden=4096, heads=128, head_dim=64, state=128, groups=8, chunk=256),
    scan=dict(hidden=4096, inner=8192, state=16, rank=256),
    tokens=32768,
)
DRY = dict(
    ssd=dict(hidden=64, heads=8, head_dim=16, state=16, groups=2, chunk=16),
    scan=dict(hidden=64, inner=128, state=8, rank=8),
    tokens=2048,
)


def ssd_layer(dims: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    config = NemotronHConfig(
        hidden_size=dims["hidden"], mamba_num_heads=dims["heads"], mamba_head_dim=dims["head_dim"],
        ssm_state_size=dims["state"], n_groups=dims["groups"], chunk_size=dims["chunk"], conv_kernel=4,
        layers_block_type=["mamba"], num_attention_heads=8, num_key_value_heads=8, head_dim=64,
    )  # fmt: skip
    torch.manual_seed(0)
    layer = NemotronHMamba2Mixer(config, layer_idx=0)
    with torch.no_grad():  # trained-model-like long memory, so a leak would show
        layer.A_log.copy_(torch.empty(dims["heads"]).uniform_(1e-3, 2e-2).log())
    return layer.to(device, dtype)


def scan_layer(dims: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import FalconMambaConfig
    from transformers.models.falcon_mamba.modeling_falcon_mamba import FalconMambaMixer

    config = FalconMambaConfig(
        hidden_size=dims["hidden"], expand=dims["inner"] // dims["hidden"], state_size=dims["state"],
        time_step_rank=dims["rank"], conv_kernel=4, num_hidden_layers=1,
    )  # fmt: skip
    torch.manual_seed(0)
    layer = FalconMambaMixer(config, layer_idx=0, initialize_mixer_weights=False)  # (5.24 inits before the norms)
    layer.init_falcon_mamba_weights()
    with torch.no_grad():
        layer.A_log.copy_(torch.empty(layer.A_log.shape).uniform_(1e-3, 2e-2).log())
    return layer.to(device, dtype)


def timed(fn: Callable[[], object], device: str, reps: int, warmup: int = 1) -> dict:
    """Wall time of ``fn`` in ms (median of ``reps`` after ``warmup`` calls) and the peak memory of one call."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    out = {"median_ms": sorted(times)[len(times) // 2], "min_ms": min(times), "reps": reps}
    if device == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def sample_docs(lengths: list[int], count: int = 6) -> list[int]:
    """Indices of a few documents: the shortest, the longest, and some between."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    picks = {order[0], order[-1], *order[:: max(1, len(order) // (count - 2))][: count - 2]}
    return sorted(picks)


def sub_stream(x: torch.Tensor, cu: list[int], docs: list[int]) -> tuple[torch.Tensor, Boundaries]:
    """The tokens of ``docs`` as a packed stream of their own, with its boundaries."""
    parts = [x[:, cu[d] : cu[d + 1]] for d in docs]
    lengths = [p.shape[1] for p in parts]
    sub_cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    return torch.cat(parts, 1), Boundaries.from_cu_seqlens(torch.tensor(sub_cu), (1, sum(lengths))).to(x.device)


def layer_stages(name, layer, packed_fn, op, args, result, out_path, reps):
    """The timing, exactness and sync stages of one layer; results under result[name]."""
    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    lengths = document_lengths(args.tokens)
    total, cu = sum(lengths), [0, *torch.tensor(lengths).cumsum(0).tolist()]
    x = torch.randn(1, total, layer.in_proj.in_features, device=device, dtype=dtype).requires_grad_()
    dy = torch.randn_like(x)
    bounds = Boundaries.from_cu_seqlens(torch.tensor(cu), (1, total)).to(device)
    one_doc = Boundaries.from_cu_seqlens(torch.tensor([0, total]), (1, total)).to(device)
    res = result.setdefault(name, {"layer": name, "documents": len(lengths), "tokens": total})

    def step(run: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def go() -> None:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            run().backward(dy)

        return go

    stages = {
        "patched": step(lambda: packed_fn(layer, x, bounds)),
        "no_boundaries": step(lambda: packed_fn(layer, x, one_doc)),
        "projections": step(lambda: layer.out_proj(layer.in_proj(x)[..., : layer.out_proj.in_features])),
    }
    if name == "ssd":
        stages["scan_op"] = scan_op_step(layer, x, bounds)
    # most telling first, so a stage cut short by a time limit loses the least
    run_stage(res, "patched", lambda: timed(stages["patched"], device, reps), out_path, result, device)
    if device == "cuda":
        run_stage(res, "host_syncs", lambda: count_host_syncs(stages["patched"]), out_path, result, device)
    for stage in ("projections", "no_boundaries", "scan_op"):
        if stage in stages:
            run_stage(res, stage, lambda fn=stages[stage]: timed(fn, device, reps), out_path, result, device)
    if not args.skip_unpatched:
        tokens = args.unpatched_tokens.get(name, 0)
        run_stage(res, "unpatched", lambda: time_unpatched(layer, x, dy, tokens, device), out_path, result, device)
    summarize(res, layer, total)
    try:  # which backend the op chose for the layer's inputs
        res["backend"] = op.choose(*op_inputs(name, layer, x, bounds), segments=bounds.segments)[0]
    except Exception as exc:  # noqa: BLE001
        res["backend"] = f"error: {exc}"
    if name == "ssd":
        chosen = [n for n, _, runs in ssd_ops.STRATEGIES if runs in ssd_ops._CHOSEN]
        res["fla_strategy"] = chosen[0] if chosen else None
        res["fla_runtime_failure"] = ssd_ops._FAILURE.reason or None
    run_stage(res, "exact", lambda: exactness(name, layer, packed_fn, x, cu, lengths), out_path, result, device)


def run_stage(res: dict, stage: str, fn: Callable[[], dict], out_path: str | None, result: dict, device: str) -> None:
    """res[stage] = fn() (a timing), or the error; the JSON is written either way."""
    try:
        res[stage] = fn()
        print(f"{res.get('layer', '')} {stage}: {res[stage]}", flush=True)
    except Exception as exc:  # noqa: BLE001 - recorded, the next stage still runs
        res[stage] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        traceback.print_exc()
    finally:
        torch.cuda.empty_cache() if device == "cuda" else None
    save(out_path, result)


def time_unpatched(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, tokens: int, device: str) -> dict:
    """transformers' mixer (its torch path: seconds per call, nothing to compile): one call, no warm-up, on the
    whole row, or on its first ``tokens`` tokens scaled linearly to the row (a loop over tokens is linear in them)."""
    total = x.shape[1]
    part = total if not tokens or tokens >= total else tokens
    xs = x[:, :part].detach().requires_grad_()

    def go() -> None:
        layer.zero_grad(set_to_none=True)
        layer(xs).backward(dy[:, :part])

    out = timed(go, device, 1, warmup=0)
    if part < total:
        scale = total / part
        out = {**out, "timed_tokens": part, "scale": scale, "measured_ms": out["median_ms"],
               "median_ms": out["median_ms"] * scale, "min_ms": out["min_ms"] * scale,
               "note": f"timed on the first {part} tokens, scaled linearly to {total}"}  # fmt: skip
    return out


def scan_op_step(layer: torch.nn.Module, x: torch.Tensor, bounds: Boundaries) -> Callable[[], None]:
    """The SSD op alone, forward+backward, on random fp32 inputs of the layer's shapes (with the batch's plan)."""
    inputs = [t.requires_grad_() for t in op_inputs("ssd", layer, x, bounds)]
    kw = dict(D=layer.D.float(), dt_bias=layer.dt_bias.float(), dt_softplus=True)

    def go() -> None:
        out = ssd(*inputs, segments=bounds.segments, **kw)
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return go


def summarize(res: dict, layer: torch.nn.Module, tokens: int) -> None:
    """Ratios between the stages, and the floor the projections set."""
    ms = {k: v["median_ms"] for k, v in res.items() if isinstance(v, dict) and "median_ms" in v}
    for a, b in (("patched", "unpatched"), ("patched", "no_boundaries"), ("patched", "projections")):
        if a in ms and b in ms:
            res[f"{a}_over_{b}"] = ms[a] / ms[b]
    flop = 6 * tokens * (layer.in_proj.in_features * layer.in_proj.out_features
                         + layer.out_proj.in_features * layer.out_proj.out_features)  # fmt: skip
    floor = {"tflop_fwd_bwd": flop / 1e12}
    if "projections" in ms:
        floor["tflops_reached"] = flop / 1e12 / (ms["projections"] / 1e3)
        if "unpatched" in ms:
            floor["best_speedup_over_unpatched"] = ms["unpatched"] / ms["projections"]
            floor["10x_reachable"] = ms["unpatched"] / ms["projections"] >= 10
    if "patched" in ms and "unpatched" in ms:
        floor["speedup_over_unpatched"] = ms["unpatched"] / ms["patched"]
    res["floor"] = floor


def op_inputs(name: str, layer: torch.nn.Module, x: torch.Tensor, bounds: Boundaries) -> tuple:
    """Random inputs of the layer's scan op with the layer's shapes (fp32, as the layers pass them)."""
    total, dev = x.shape[1], x.device
    gen = torch.Generator(device=dev).manual_seed(0)
    if name == "ssd":
        h, p, g, n = layer.num_heads, layer.head_dim, layer.n_groups, layer.ssm_state_size
        return (
            torch.randn(1, total, h, p, device=dev, generator=gen),
            torch.randn(1, total, h, device=dev, generator=gen) - 2,
            -torch.exp(layer.A_log.float()),
            torch.randn(1, total, g, n, device=dev, generator=gen),
            torch.randn(1, total, g, n, device=dev, generator=gen),
        )
    d, n = layer.intermediate_size, layer.ssm_state_size
    return (
        torch.randn(1, total, d, device=dev, generator=gen),
        torch.randn(1, total, d, device=dev, generator=gen) - 2,
        -torch.exp(layer.A_log.float()),
        torch.randn(1, total, 1, n, device=dev, generator=gen),
        torch.randn(1, total, 1, n, device=dev, generator=gen),
    )


def exactness(name, layer, packed_fn, x, cu, lengths) -> dict:
    """On a few sampled documents: the op's chosen backend vs its reference (fp32 inputs), and the packed layer's
    rows vs the transformers mixer run on each document alone."""
    docs = sample_docs(lengths)
    xs, sub = sub_stream(x.detach(), cu, docs)
    out: dict = {"documents": [lengths[d] for d in docs]}
    inputs = [t.requires_grad_() for t in op_inputs(name, layer, xs, sub)]
    kwargs = dict(D=layer.D.float(), dt_bias=layer.dt_bias.float(), dt_softplus=True) if name == "ssd" else {}
    if name == "scan":
        kwargs = dict(D=layer.D.float(), delta_bias=layer.dt_proj.bias.float(), delta_softplus=True)
    fast_op, ref_op = (ssd, ssd_ref) if name == "ssd" else (selective_scan, selective_scan_ref)
    fast = fast_op(*inputs, segments=sub.segments, **kwargs)
    weights = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * weights).sum(), inputs)
    ref = ref_op(*inputs, segments=sub.segments, **kwargs)
    g_ref = torch.autograd.grad((ref * weights).sum(), inputs)
    out["op_out_rel"] = rel_err(fast, ref)
    out["op_grad_rel"] = {n: rel_err(a, b) for n, a, b in zip(("x", "dt", "A", "B", "C"), g_fast, g_ref)}
    with torch.no_grad():
        packed = packed_fn(layer, xs, sub)
        sub_cu = sub.cu_seqlens_host
        diffs = []
        for a, b in zip(sub_cu[:-1], sub_cu[1:]):
            alone = layer(xs[:, a:b])
            diffs.append(rel_err(packed[:, a:b], alone))
    out["layer_vs_transformers_alone_rel"] = diffs  # bf16 layers: bf16 rounding, not leaks (a leak is O(1))
    return out


def save(path: str | None, result: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny dims: checks the script")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", choices=["ssd", "scan"])
    parser.add_argument("--skip-unpatched", action="store_true")
    parser.add_argument("--unpatched-tokens", type=int, default=4096, help="Mamba1's torch path: tokens timed (0: all)")
    args = parser.parse_args()
    dims = DRY if args.dry else FULL
    args.device = "cpu" if args.dry else "cuda"
    args.tokens = dims["tokens"]
    args.unpatched_tokens = {
        "scan": min(args.unpatched_tokens, args.tokens // 4) if args.dry else args.unpatched_tokens
    }
    dtype = torch.float32 if args.dry else torch.bfloat16
    result: dict = {"dims": dims}
    if not args.dry:
        from common import environment

        result["env"] = environment()
    save(args.out, result)
    if args.only in (None, "ssd"):
        layer = ssd_layer(dims["ssd"], args.device, dtype)
        layer_stages("ssd", layer, packed_ssd_mixer, SSD, args, result, args.out, args.reps)
        del layer
    if args.only in (None, "scan"):
        layer = scan_layer(dims["scan"], args.device, dtype)
        scan_fn = lambda lay, h, b: packed_scan_mixer(lay, h, b, style=NORMED)  # noqa: E731
        layer_stages("scan", layer, scan_fn, SELECTIVE_SCAN, args, result, args.out, args.reps)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
