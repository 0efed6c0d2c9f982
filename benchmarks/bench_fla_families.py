"""Layer benchmark of the FLA-backed families: a Kimi-Linear-sized KDA layer and an LFM2-sized gated short-conv layer,
bf16 forward+backward on one packed row of 32768 real tokens (documents drawn as in e2e-spec.json).

patched: deltapack's packed forward with the batch's boundaries (exact per document; FLA's varlen conv and
chunk_kda). unpatched: the transformers layer on the same row as one sequence (what transformers runs without packing
support; it leaks across documents, and it is the fastest path it has: FLA's chunk_kda when FLA is installed, its
torch conv without the causal-conv1d package). Also: the kernel path against the exact reference on the documents of
the first 4096 tokens (outputs and input gradients), and the host syncs of the patched layer (torch's sync debug mode).

Layer sizes: transformers' default configs, which are the released models' (KimiLinearConfig: hidden 2304, 32 KDA
heads of 128, conv 4; Lfm2Config: hidden 2560, conv width 3).

Usage: python benchmarks/bench_fla_families.py [--out results/fla_families.json] [--reps 5]
       python benchmarks/bench_fla_families.py --dry   (tiny layers on the CPU: checks the script, times nothing real)
       --layers kda (or short_conv): one layer only. A cold GPU spends minutes compiling and tuning FLA's KDA kernels
       (TileLang, Triton autotuning) on the first call of each shape; every stage is written to --out as it ends.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import cuda_time_ms, document_lengths, environment, write
from transformers import AutoConfig, AutoModelForCausalLM

from deltapack import Boundaries
from deltapack.models.families.kda import packed_kda_forward
from deltapack.models.families.short_conv import packed_short_conv_forward

DRY_KDA = dict(hidden_size=64, linear_num_heads=2, linear_head_dim=16, intermediate_size=64, moe_intermediate_size=32)
DRY_CONV = dict(hidden_size=64, intermediate_size=64)


def layer_of(model_type: str, fields: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The first mixer of a one-layer model built from transformers' default config (so that its own init runs)."""
    mixer_type = "linear_attention" if model_type == "kimi_linear" else "conv"
    extra = dict(mlp_layer_types=["dense"]) if model_type == "kimi_linear" else {}
    config = AutoConfig.for_model(
        model_type, vocab_size=256, num_hidden_layers=1, layer_types=[mixer_type], pad_token_id=0, **extra, **fields
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    layer = model.model.layers[0]
    layer = layer.self_attn if model_type == "kimi_linear" else layer.conv
    if model_type == "kimi_linear":  # decays of a trained model's range (random init draws A up to 16)
        with torch.no_grad():
            layer.forget_gate.A_log.uniform_(-4.0, 0.0)
    return layer.to(dtype)


def time_ms(fn: Callable[[], object], device: str, reps: int) -> dict:
    if device == "cuda":
        return cuda_time_ms(fn, warmup=1, reps=reps)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def count_syncs(fn: Callable[[], object]) -> int | None:
    """Host syncs CUDA reports while ``fn`` runs (None on the CPU)."""
    if not torch.cuda.is_available():
        return None
    from deltapack.diagnostics import count_host_syncs

    return count_host_syncs(fn)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def stage(result: dict, key: str, fn: Callable[[], object], out: str | None) -> object:
    """Run one stage; its value (or the error it raised) goes into ``result[key]``, and the JSON is written."""
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - record and go on: the other stages still measure something
        value = None
        result[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(f"{key} FAILED: {result[key]['error']}", flush=True)
    else:
        result[key] = value
    save(out)
    return value


ROOT: dict = {}  # everything measured so far: written after every stage


def save(path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(ROOT, indent=1))


def bench_layer(name: str, layer: torch.nn.Module, forward, lengths: list[int], args, device: str, dtype) -> dict:
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    hidden = layer.o_proj.out_features if hasattr(layer, "o_proj") else layer.out_proj.out_features
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, total, hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(x.shape, device=device, dtype=dtype, generator=gen)

    def fresh_bounds() -> Boundaries:  # built as a collator would, before the model runs
        return Boundaries.from_cu_seqlens(cu, (1, total)).to(device)

    bounds = fresh_bounds()
    result: dict = {"tokens": total, "documents": len(lengths)}
    ROOT[name] = result

    def patched():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        forward(layer, x, bounds).backward(dy)

    def unpatched():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(dy)

    clock = time.perf_counter()

    def first(fn):
        def run():  # first calls: compile and autotune
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return round(time.perf_counter() - clock, 1)

        return run

    # most telling first (the GPU run has a time limit): the patched layer runs, is exact, syncs how often; then the
    # unpatched layer (FLA tunes its kernels again for a one-sequence call) and the timing of both
    ok = {"patched": stage(result, "patched_first_call_done_at_s", first(patched), args.out) is not None}

    # the kernel path against the exact reference on the documents of the first 4096 tokens (each document whole)
    n_docs = max(1, sum(1 for c in bounds.cu_seqlens_host[1:] if c <= min(4096, total)))
    n = bounds.cu_seqlens_host[n_docs]
    xs = x[:, :n].detach().requires_grad_()
    small = Boundaries.from_cu_seqlens(list(bounds.cu_seqlens_host[: n_docs + 1]), (1, n)).to(device)

    def vs_reference():
        fast = forward(layer, xs, small)
        (dx_fast,) = torch.autograd.grad(fast, xs, dy[:, :n])
        os.environ["DELTAPACK_BACKEND"] = "reference"
        try:
            ref = forward(layer, xs, small)
            (dx_ref,) = torch.autograd.grad(ref, xs, dy[:, :n])
        finally:
            del os.environ["DELTAPACK_BACKEND"]
        # and the same documents one at a time through the kernel path: boundaries alone change nothing
        alone = torch.cat(list(_alone(forward, layer, xs.detach(), small, device)), dim=1)
        return {
            "tokens": n,
            "documents": n_docs,
            "output": rel(fast, ref),
            "dx": rel(dx_fast, dx_ref),
            "packed_vs_alone_output": rel(fast.detach(), alone),
        }

    stage(result, "rel_err_vs_reference", vs_reference, args.out)
    prebuilt = fresh_bounds()  # built before the layer runs, as a collator would
    stage(result, "host_syncs", lambda: count_syncs(lambda: forward(layer, x, prebuilt).backward(dy)), args.out)
    ok["unpatched"] = stage(result, "unpatched_first_call_done_at_s", first(unpatched), args.out) is not None

    def timing():
        runs = {label: [] for label, good in ok.items() if good}
        for _ in range(2):  # interleaved, so drift on the card hits both alike
            for label in runs:
                runs[label].append(time_ms(unpatched if label == "unpatched" else patched, device, args.reps))
        best = {label: min(r["median_ms"] for r in rs) for label, rs in runs.items()}
        out = {f"{label}_ms": ms for label, ms in best.items()}
        if len(best) == 2:
            out["ratio"] = best["patched"] / best["unpatched"]
        return {**out, "runs": runs}

    if any(ok.values()):
        stage(result, "timing", timing, args.out)
    print(f"{name}: {result.get('timing')}, syncs {result.get('host_syncs')}", flush=True)
    return result


def _alone(forward, layer, xs: torch.Tensor, bounds: Boundaries, device: str):
    host = bounds.cu_seqlens_host
    with torch.no_grad():
        for a, b in zip(host[:-1], host[1:]):
            yield forward(layer, xs[:, a:b], Boundaries.from_cu_seqlens([0, b - a], (1, b - a)).to(device))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dry", action="store_true", help="tiny layers on the CPU, 2048 tokens")
    parser.add_argument("--layers", default="short_conv,kda", help="which layers, in order: short_conv, kda")
    args = parser.parse_args()
    device = "cpu" if args.dry else "cuda"
    dtype = torch.float32 if args.dry else torch.bfloat16
    if args.dry:
        args.reps = min(args.reps, 2)
    lengths = document_lengths(2048 if args.dry else 32768)

    ROOT.update({"env": environment() if not args.dry else {"dry": True}, "dtype": str(dtype), "deltapack_log": []})
    handler = logging.Handler()  # which backend each op chose, and why (logged once per choice)
    handler.emit = lambda record: ROOT["deltapack_log"].append(record.getMessage())
    logging.getLogger("deltapack").addHandler(handler)
    logging.getLogger("deltapack").setLevel(logging.INFO)
    layers = {
        "short_conv": ("short_conv_lfm2", "lfm2", DRY_CONV, packed_short_conv_forward),  # quick: the conv is tuned
        "kda": ("kda_kimi_linear", "kimi_linear", DRY_KDA, packed_kda_forward),
    }
    for name, model_type, fields, forward in (layers[key] for key in args.layers.split(",")):
        layer = None
        try:
            layer = layer_of(model_type, fields if args.dry else {}, device, dtype)
            bench_layer(name, layer, forward, lengths, args, device, dtype)
        except Exception as exc:  # noqa: BLE001 - record and go on to the next layer
            ROOT[name] = {**ROOT.get(name, {}), "error": f"{type(exc).__name__}: {exc}"[:2000]}
        del layer
        if device == "cuda":
            torch.cuda.empty_cache()
        save(args.out)
    from deltapack.ops import kda as kda_module

    failure = kda_module._fla_failure  # a kernel failure the reference covered, if any
    ROOT["kda_fla_failure"] = [failure.reason] if failure else []
    write(args.out, ROOT)


if __name__ == "__main__":
    main()
