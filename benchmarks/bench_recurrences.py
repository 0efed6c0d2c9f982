"""Recurrence layers: each packed (deltapack) vs unpatched (transformers) on the same 32768-token row, bf16 fwd+bwd.

Layers (one of each, at the dims of a released model of the family, random init): MiniMax lightning attention,
RecurrentGemma's recurrent block (conv + RG-LRU), RWKV-4 time-mix and channel-mix, xLSTM's mLSTM layer.

patched: the family's packed forward with the row's boundaries (exact per document). unpatched: the transformers
layer on the same row as one sequence (it leaks across documents; what it runs is in each layer's "unpatched"
field). Documents are the e2e spec's lengths (benchmarks/common.py).

Per layer, in this order (the JSON is written after every stage, every stage in its own try/except): the patched
layer's first call (kernel compiling, tuning, first-use checks; which fast backends run), its host syncs in a
forward+backward with boundaries built before the call (0 expected), exactness on documents sampled across the row
(first, last, shortest, longest, middle, more while under 8192 tokens: the fast path against the reference ops in
bf16, the patched bf16 layer and the unpatched bf16 layer on each document alone both against the patched fp32
layer on the reference, so the fast path's error is judged against bf16's own, and the unpatched layer's leak on one
row), the patched timing (1 warm-up, --reps timed); then the unpatched first call and timing: the unpatched layers
that are per-token Python loops (recurrent_gemma's scan, RWKV's WKV without its CUDA kernel) take tens of seconds a
call: they run last and are timed on their first call only, which "unpatched_timing_note" says. Last, with
--lightning-chunk: the minimax layer on the chunked lightning backend (FLA's chunk_simple_gla, asked for by name
since it syncs inside FLA).

Usage: python benchmarks/bench_recurrences.py [--out recurrences.json] [--reps 3] [--only rwkv_time_mix,...]
       [--lightning-chunk]
       python benchmarks/bench_recurrences.py --dry   (tiny dims, 512 tokens, CPU, fp32: checks the script runs)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from common import cuda_time_ms, document_lengths, environment, sample_documents, write
from transformers import AutoConfig, AutoModelForCausalLM

from deltapack import Boundaries
from deltapack.diagnostics import count_host_syncs
from deltapack.models.layers import packed_layer_of


def xlstm_call(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' native mLSTM kernels mix their fp32 initial states with bf16 inputs (a matmul dtype error);
    under autocast to the input dtype they run."""
    with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype != torch.float32):
        return layer(x)[0]


# per layer kind: the model type, config fields at full size and in --dry (the model around the layer is built with a
# tiny vocabulary and 2 layers, so that transformers initialises the layer's parameters as it does), the layer class,
# and how the unpatched layer is called on [1, T, D]; in the order they run: the per-token Python loops (tens of seconds
# a call unpatched) last
_SMALL = dict(vocab_size=128, num_hidden_layers=2)
LAYERS: dict[str, dict] = {
    "minimax_lightning": dict(
        model_type="minimax",
        full=dict(hidden_size=2048, num_attention_heads=16, head_dim=128, block_size=256),
        dry=dict(hidden_size=64, num_attention_heads=4, head_dim=16, block_size=16),
        common=dict(
            layer_types=["linear_attention", "full_attention"], intermediate_size=64, num_local_experts=2, **_SMALL
        ),
        cls="MiniMaxLightningAttention",
        unpatched="transformers' block loop (block_size tokens per step, matmuls inside a block)",
        call=lambda layer, x: layer(x, None, None)[0],
    ),
    "xlstm_mlstm": dict(  # xLSTM-7b's head count at half the width
        model_type="xlstm",
        full=dict(hidden_size=2048, embedding_dim=2048, num_heads=8, chunk_size=64),
        dry=dict(hidden_size=128, embedding_dim=128, num_heads=4, chunk_size=16),
        common=dict(num_blocks=2, **_SMALL),
        cls="xLSTMLayer",
        unpatched="transformers' native chunkwise mLSTM kernels (PyTorch, under autocast)",
        call=lambda layer, x: xlstm_call(layer, x),
    ),
    "rwkv_channel_mix": dict(
        model_type="rwkv",
        full=dict(hidden_size=2048, attention_hidden_size=2048, intermediate_size=8192, context_length=32768),
        dry=dict(hidden_size=64, attention_hidden_size=64, intermediate_size=128, context_length=512),
        common=_SMALL,
        cls="RwkvFeedForward",
        unpatched="transformers' channel mix (a token shift and two projections)",
        call=lambda layer, x: layer(x)[0],
    ),
    "recurrent_gemma_block": dict(  # recurrentgemma-2b's dims
        model_type="recurrent_gemma",
        full=dict(hidden_size=2560, lru_width=2560, num_attention_heads=10, intermediate_size=64),
        dry=dict(hidden_size=64, lru_width=64, num_attention_heads=4, head_dim=16, intermediate_size=64),
        common=_SMALL,
        cls="RecurrentGemmaRecurrentBlock",
        unpatched="transformers' RG-LRU scan, a per-token Python loop (_rnn_scan)",
        call=lambda layer, x: layer(x, torch.arange(x.shape[1], device=x.device)[None], None, use_cache=False)[0],
    ),
    "rwkv_time_mix": dict(  # rwkv-4 1.5b's dims
        model_type="rwkv",
        full=dict(hidden_size=2048, attention_hidden_size=2048, intermediate_size=8192, context_length=32768),
        dry=dict(hidden_size=64, attention_hidden_size=64, intermediate_size=128, context_length=512),
        common=_SMALL,
        cls="RwkvSelfAttention",
        unpatched="transformers' WKV, a per-token Python loop (rwkv_linear_attention_cpu) without its CUDA kernel",
        call=lambda layer, x: layer(x)[0],
    ),
}


def make_layer(entry: dict, dry: bool, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The first layer of class ``entry["cls"]`` of a freshly initialised model (seed 0) of the entry's config."""
    fields = {**entry["common"], **entry["dry" if dry else "full"]}
    config = AutoConfig.for_model(entry["model_type"], **fields)
    torch.manual_seed(0)
    attn = "sdpa" if entry["model_type"] in ("minimax", "recurrent_gemma") else "eager"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    layer = next(m for m in model.modules() if type(m).__name__ == entry["cls"])
    return layer.to(dtype)


def wall_ms(fn: Callable[[], object], reps: int) -> dict:
    """Wall-clock timing (--dry on the CPU, and the unpatched per-token loops, timed once)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": sorted(times)[len(times) // 2], "reps": reps}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def fast_backends() -> dict:
    """Per recurrence op with a fast backend: "fla" when its kernels loaded and passed their first-use check, else
    why not (the exception), or "not used" when no call reached it."""
    from deltapack.ops import OPS

    out = {}
    for name in ("lightning_attention", "rg_lru_scan", "causal_conv1d"):
        loaded = OPS[name]._loaded.get("fla")
        out[name] = "not used" if loaded is None else "fla" if callable(loaded) else f"refused: {loaded!r}"[:300]
    return out


def bench_layer(entry: dict, lengths: list[int], device: str, dtype: torch.dtype, reps: int, out: dict, save) -> None:
    """Fills ``out`` stage by stage, cheapest and most telling first: the patched layer's first call, host syncs,
    exactness on documents sampled across the row, patched timing; then the unpatched layer's first call and timing
    (its per-token Python loops take seconds a call: those are timed once, and the JSON says so). ``save()`` runs
    after each stage; a stage that fails records its error and the next one runs."""
    dry = device == "cpu"
    layer = make_layer(entry, dry, device, dtype)
    packed = packed_layer_of(layer).forward
    total = sum(lengths)
    cu = [0, *itertools.accumulate(lengths)]
    bounds = Boundaries.from_cu_seqlens(cu, (1, total)).to(device)
    hidden = entry["dry" if dry else "full"]["hidden_size"]
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, total, hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(x.shape, device=device, dtype=dtype, generator=gen)
    timer = wall_ms if dry else (lambda fn, n: cuda_time_ms(fn, warmup=1, reps=n))

    def patched():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        packed(layer, x, bounds)[0].backward(dy)

    def unpatched():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        entry["call"](layer, x).backward(dy)

    def first_call(label: str, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:  # compile, autotune, first-use checks
            clock = time.perf_counter()
            fn()
            if not dry:
                torch.cuda.synchronize()
            out[f"{label}_first_call_s"] = round(time.perf_counter() - clock, 2)
            if label == "patched":
                out["fast_backends"] = fast_backends()

        run.__name__ = f"{label}_first_call"
        return run

    def host_syncs():
        prebuilt = Boundaries.from_cu_seqlens(cu, (1, total)).to(device)  # built ahead, as a collator would
        out["host_syncs"] = None if dry else count_host_syncs(lambda: packed(layer, x, prebuilt)[0].backward(dy))

    def exactness():  # on documents sampled across the row (each whole)
        picks = sample_documents(cu, 2048 if dry else 8192)
        pieces = [(cu[i], cu[i + 1]) for i in picks]
        sub = [0, *itertools.accumulate(b - a for a, b in pieces)]
        small = Boundaries.from_cu_seqlens(sub, (1, sub[-1])).to(device)
        xs = torch.cat([x.detach()[:, a:b] for a, b in pieces], 1).requires_grad_()
        dys = torch.cat([dy[:, a:b] for a, b in pieces], 1)
        fast = packed(layer, xs, small)[0]
        (dx_fast,) = torch.autograd.grad(fast, xs, dys)
        layer32 = make_layer(entry, dry, device, torch.float32)
        layer32.load_state_dict(layer.state_dict())
        x32 = xs.detach().float().requires_grad_()
        os.environ["DELTAPACK_BACKEND"] = "reference"
        try:
            same = packed(layer, xs, small)[0]  # the reference ops in the layer's own dtype: isolates the kernels
            (dx_same,) = torch.autograd.grad(same, xs, dys)
            ref = packed(layer32, x32, small)[0]
            (dx_ref,) = torch.autograd.grad(ref, x32, dys.float())
        finally:
            del os.environ["DELTAPACK_BACKEND"]
        alone_out = torch.cat([entry["call"](layer, xs[:, a:b]) for a, b in zip(sub[:-1], sub[1:])], 1)
        (dx_alone,) = torch.autograd.grad(alone_out, xs, dys)
        with torch.no_grad():
            one_row = entry["call"](layer, xs)  # the unpatched layer on the same documents as one sequence: it leaks
        out["exactness"] = {
            "documents": [f"#{i} ({b - a} tokens)" for i, (a, b) in zip(picks, pieces)],
            "tokens": sub[-1],
            "kernel_vs_reference_same_dtype": {"output": rel(fast, same), "dx": rel(dx_fast, dx_same)},
            "patched_vs_fp32_reference": {"output": rel(fast, ref), "dx": rel(dx_fast, dx_ref)},
            "unpatched_alone_vs_fp32_reference": {"output": rel(alone_out, ref), "dx": rel(dx_alone, dx_ref)},
            "unpatched_one_row_vs_fp32_reference": {"output": rel(one_row, ref)},
        }

    def patched_timing():
        out["patched_ms"] = timer(patched, reps)["median_ms"]

    def unpatched_timing():
        first_s = out.get("unpatched_first_call_s", 0)
        if first_s > 5:  # a per-token Python loop (tens of seconds a call): its first call is the measurement
            out["unpatched_timing_note"] = (
                f"{entry['unpatched']}: timed on its first call only (1 iteration, {first_s} s; a per-token loop "
                "compiles nothing, so the first call is representative)"
            )
            out["unpatched_ms"] = first_s * 1e3
        else:
            out["unpatched_ms"] = timer(unpatched, reps)["median_ms"]
        out["ratio"] = out["patched_ms"] / out["unpatched_ms"]

    out.update(tokens=total, documents=len(lengths), dims=entry["dry" if dry else "full"], unpatched=entry["unpatched"])
    if entry["model_type"] == "rwkv":  # transformers' own CUDA WKV kernel (built with ninja) or its per-token loop
        from transformers.models.rwkv import modeling_rwkv

        out["unpatched_wkv"] = "cuda kernel" if modeling_rwkv.rwkv_cuda_kernel is not None else "per-token loop"
    stages = [
        first_call("patched", patched),
        host_syncs,
        exactness,
        patched_timing,
        first_call("unpatched", unpatched),
        unpatched_timing,
    ]
    for stage in stages:
        start = time.perf_counter()
        try:
            stage()
        except Exception as exc:  # noqa: BLE001 - record and go on: one GPU sitting, every stage counts
            out.setdefault("errors", {})[stage.__name__] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
        print(f"  {stage.__name__}: {time.perf_counter() - start:.1f} s", flush=True)
        save()


def lightning_chunk_backend(lengths: list[int], reps: int, out: dict, save) -> None:
    """The minimax layer on the chunked lightning backend (asked for by name: it syncs inside FLA): first call,
    host syncs, timing, and its output against the default backend's on the same row."""
    entry = LAYERS["minimax_lightning"]
    layer = make_layer(entry, False, "cuda", torch.bfloat16)
    packed = packed_layer_of(layer).forward
    total, cu = sum(lengths), [0, *itertools.accumulate(lengths)]
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, total, entry["full"]["hidden_size"], device="cuda", dtype=torch.bfloat16, generator=gen)
    x.requires_grad_()

    bounds = Boundaries.from_cu_seqlens(cu, (1, total)).to("cuda")

    def step() -> torch.Tensor:
        y = packed(layer, x, bounds)[0]
        y.backward(torch.ones_like(y))
        return y.detach()

    default = step()
    os.environ["DELTAPACK_BACKEND"] = "fla_chunk"
    try:
        clock = time.perf_counter()
        chunked = step()
        torch.cuda.synchronize()
        out["first_call_s"] = round(time.perf_counter() - clock, 2)
        save()
        out["vs_default_backend_output"] = rel(chunked, default)
        prebuilt = Boundaries.from_cu_seqlens(cu, (1, total)).to("cuda")
        out["host_syncs"] = count_host_syncs(lambda: packed(layer, x, prebuilt)[0].sum().backward())
        save()
        out["patched_ms"] = cuda_time_ms(step, warmup=1, reps=reps)["median_ms"]
    finally:
        del os.environ["DELTAPACK_BACKEND"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", help="comma-separated layer names", default=",".join(LAYERS))
    parser.add_argument("--dry", action="store_true", help="tiny dims, 512 tokens, CPU, fp32")
    parser.add_argument(
        "--lightning-chunk",
        action="store_true",
        help="a last stage: the minimax layer on the chunked lightning backend (FLA's chunk_simple_gla; its first "
        "call compiles TileLang kernels, about a minute on a cold machine)",
    )
    parser.add_argument(
        "--rwkv-cuda-kernel",
        action="store_true",
        help="let transformers compile its RWKV-4 CUDA kernel (ninja + nvcc, minutes) for the unpatched rwkv layer; "
        "by default it runs transformers' per-token loop",
    )
    args = parser.parse_args()
    if not args.rwkv_cuda_kernel:
        from transformers.models.rwkv import modeling_rwkv

        modeling_rwkv.is_ninja_available = lambda: False  # transformers then never tries to build the kernel

    def save(result: dict) -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))

    device, dtype = ("cpu", torch.float32) if args.dry else ("cuda", torch.bfloat16)
    lengths = document_lengths(512) if args.dry else document_lengths(32768)
    if args.dry:  # the spec's lengths are for 32768 tokens: cut them smaller, length-1 documents included
        lengths = [1, 37, 5, 128, 1, 200, 140]
    result: dict = {"env": {"device": "cpu (dry)"} if args.dry else environment(), "layers": {}}
    for name in args.only.split(","):
        start = time.perf_counter()
        out = result["layers"][name] = {}
        try:
            bench_layer(LAYERS[name], lengths, device, dtype, 1 if args.dry else args.reps, out, lambda: save(result))
        except Exception as exc:  # noqa: BLE001 - building the layer failed: record it, go on with the next
            out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
        if not args.dry:
            torch.cuda.empty_cache()
        print(f"{name} done in {time.perf_counter() - start:.1f} s", flush=True)
        save(result)
    if args.lightning_chunk and not args.dry and "minimax_lightning" in args.only.split(","):
        out = result["minimax_lightning_fla_chunk"] = {}
        try:
            lightning_chunk_backend(lengths, args.reps, out, lambda: save(result))
        except Exception as exc:  # noqa: BLE001 - record it
            out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
    write(args.out, result)


if __name__ == "__main__":
    main()
