"""Where one packed training step spends its time: the 665M model of e2e-spec.json, bf16, one optimizer step
(forward, backward, AdamW) on the spec's 32768 real tokens, through ``deltapack.patch``, under the torch profiler.

The batch is ``bench_e2e.py``'s deltapack mode (the documents packed into rows of 8192, one batch, an indexed mask,
boundaries built beforehand as a collator does). Stages, each written to the JSON as soon as it is done:

1. ``step``: warm-up steps (the first compiles and tunes every kernel: minutes on a cold machine), then the
   median of timed steps without the profiler, split into forward+backward and the optimizer step; ``mfu`` from
   the forward+backward time and from the whole step (formula in ``common.mfu``).
2. ``profile``: one step under the profiler: GPU time by category (matmul, attention, gdn_core, conv,
   norm_elementwise, copy_cast, loss, optimizer, other), the GPU idle time inside the step (wall time minus the
   union of kernel intervals: host overhead), by phase (forward, backward, optimizer), and the top kernels.
   A kernel's category comes from its name and the ops that launched it (the profiler's CPU op stack).
   ``largest_idle_gaps``: the longest stretches with the GPU idle, what ended each and what the host ran meanwhile.

``--recommended``: the configuration README recommends for GPU training instead of the eager default:
``patch(model, chunked_loss=True)``, every decoder layer compiled (``layer.compile()``), FLA's FlashQLA for the GDN
core (where the ``flash_qla`` package is installed) and FLA's Gluon conv (``FLA_CONV_GLUON=1``). Without it, FLA's
Triton kernels (both variables set to 0).

Usage: python benchmarks/profile_step.py [--out profile.json] [--trace trace.json] [--tiny] [--recommended]
       [--host-profile]
``--host-profile``: also one step under cProfile (the host's Python functions by own and cumulative time, and its
garbage collections), between the timed steps and the profiled one.
``--tiny``: a 2-layer model of the same layout on 1024 tokens on the CPU (checks the script; the categories are
then of CPU ops, the numbers meaningless).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import deltapack_batch, document_lengths, documents, e2e_model, environment, load_spec, mfu, rows_of, write  # noqa: E402

import deltapack  # noqa: E402
from deltapack import Boundaries  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=16, vocab_size=512,
            layer_types=["linear_attention"] * 3 + ["full_attention"])  # fmt: skip

# (category, pattern) in order, matched against "kernel name | launching ops" (lower case); the first match wins.
# The op stack holds the forward ops (aten::*, record_function ranges) and the backward nodes
# ("autograd::engine::evaluate_function: MmBackward0", "...ChunkGatedDeltaRuleFunctionBackward").
CATEGORIES = (
    ("optimizer", r"optimizer\.step|multi_tensor_apply|adamw?\b|_fused_adam|foreach"),
    ("loss", r"cross_entropy|nll_loss|nlllossbackward|log_softmax|logsoftmax|chunked_lm_loss|forcausallmloss"),
    ("gdn_core", r"gated_delta|gateddelta|delta_rule|deltarule|solve_tril|chunk_scaled_dot_kkt|recompute_w_u|wy_repr|"
                 r"wy_fast|chunk_fwd_kernel_o|chunk_bwd_kernel_d|kernel_dhu|kernel_h\b|l2norm|chunk_local_cumsum|"
                 r"flash_qla|qla"),
    ("conv", r"causal_conv1d|causalconv|conv1d|convolution|conv_depthwise"),
    ("attention", r"flash|attention|attn|fmha|sdpa|varlen|flex"),
    ("matmul", r"gemm|nvjet|xmma|cublas|cutlass|matmul|aten::mm\b|aten::addmm|aten::bmm|aten::linear|mmbackward|"
               r"addmmbackward|bmmbackward|linear"),
    ("copy_cast", r"memcpy|memset|copy|_to_copy|aten::to\b|cast|aten::cat|catarraybatched|fill|zero_|aten::clone|"
                  r"contiguous|index|gather|scatter|embedding"),
    ("norm_elementwise", r"norm|elementwise|vectorized|reduce|silu|sigmoid|softplus|gelu|exp|mul|add|div|sub|rsqrt|"
                         r"pow|mean|sum|neg|where|triton_|cumsum|softmax"),
)  # fmt: skip
_COMPILED = [(name, re.compile(p)) for name, p in CATEGORIES]
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
PHASES = ("forward", "backward", "optimizer")


def categorize(kernel: str, ops: list[str], phase: str | None) -> str:
    """The category of one kernel from its name and the names of the ops that launched it (outermost first)."""
    if phase == "optimizer":
        return "optimizer"
    text = " | ".join([kernel, *reversed(ops)]).lower()
    for name, pattern in _COMPILED:
        if pattern.search(text):
            return name
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def _largest_gaps(intervals, after, start: float, cpu: list[dict], top: int = 8) -> list[dict]:
    """The ``top`` longest stretches with no kernel on the GPU after the step's start: each one's length, where it
    begins (ms into the step), the kernel that ends it with the ops around that kernel's launch, and the longest
    CPU ops that ran wholly inside it (what the host was doing meanwhile)."""
    gaps, end = [], start
    for (s, e), nxt in sorted(zip(intervals, after), key=lambda pair: pair[0]):
        if s > end:
            gaps.append((s - end, end, nxt))
        end = max(end, e)
    gaps.sort(key=lambda g: -g[0])
    out = []
    for length, at, (_, kernel, ops) in gaps[:top]:
        inside = sorted(
            (e for e in cpu if e["ts"] >= at and e["ts"] + e["dur"] <= at + length), key=lambda e: -e["dur"]
        )
        out.append(
            {
                "ms": length / 1e3,
                "at_ms": (at - start) / 1e3,
                "ended_by": kernel,
                "launched_under": ops,
                "host_ops_inside": [{"name": e["name"][:120], "ms": e["dur"] / 1e3} for e in inside[:5]],
            }
        )
    return out


def _op_stacks(ops: list[dict], points: list[dict]) -> dict[int, list[str]]:
    """For each event of ``points``: the names of the ``ops`` of its thread open at its start, outermost first
    (keyed by ``id`` of the point). An op holds a point when it starts at or before it and ends at or after it."""
    by_tid: dict = defaultdict(list)
    for e in ops:
        by_tid[e["tid"]].append((e["ts"], 0, -e["dur"], e))
    for e in points:
        by_tid[e["tid"]].append((e["ts"], 1, 0, e))
    stacks: dict[int, list[str]] = {}
    for items in by_tid.values():
        items.sort(key=lambda item: item[:3])  # by start; an op before a point at the same time; longer ops first
        open_ops: list[dict] = []
        for ts, is_point, _, e in items:
            while open_ops and open_ops[-1]["ts"] + open_ops[-1]["dur"] < ts:
                open_ops.pop()
            if is_point:
                stacks[id(e)] = [o["name"] for o in open_ops if o is not e]
            else:
                open_ops.append(e)
    return stacks


def analyse(trace: dict, step_name: str = "profiled_step", top: int = 30) -> dict:
    """The breakdown of one step from a Chrome trace of the profiler (``export_chrome_trace``).

    Device events are the GPU kernels, copies and sets; without any (a CPU run) the leaf CPU ops stand in for them.
    Each one is tied to the CPU op stack around its launch (by the launch's correlation id), the phase whose
    ``record_function`` range holds the launch, and a category (:func:`categorize`).
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    cpu = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation")]
    step = next((e for e in cpu if e["name"] == step_name), None)
    phases = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in cpu if e["name"] in PHASES}
    device = [e for e in events if e.get("cat") in DEVICE_CATS]
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})
    }
    on_gpu = bool(device)
    if not on_gpu:  # CPU: leaf ops (no other op inside them on their thread) stand in for kernels
        by_tid = defaultdict(list)
        for e in cpu:
            if e.get("cat") == "cpu_op":
                by_tid[e["tid"]].append(e)
        for ops in by_tid.values():
            ops.sort(key=lambda e: (e["ts"], -e["dur"]))
            for i, e in enumerate(ops):
                nxt = ops[i + 1] if i + 1 < len(ops) else None
                if nxt is None or nxt["ts"] >= e["ts"] + e["dur"]:
                    device.append(e)
    # the op stack around each launch: per thread, one sweep in time order over properly nested ops
    around = _op_stacks(cpu, list(launches.values()) if on_gpu else device)

    def phase_of(ts: float) -> str | None:
        return next((name for name, (s, e) in phases.items() if s <= ts <= e), None)

    lo, hi = (step["ts"], step["ts"] + step["dur"]) if step else (float("-inf"), float("inf"))
    by_cat: dict[str, float] = defaultdict(float)
    by_phase: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    by_kernel: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    intervals = []
    after = []  # (start, kernel, the innermost ops around its launch): to name what ends each idle gap
    for e in device:
        launch = launches.get(e.get("args", {}).get("correlation")) if on_gpu else e
        at = launch["ts"] if launch else e["ts"]
        if not (lo <= at <= hi):
            continue
        ops = around.get(id(launch), []) if launch else []  # on the CPU: the ops around the leaf op
        phase = phase_of(at)
        cat = categorize(e["name"], ops, phase)
        ms = e["dur"] / 1e3
        by_cat[cat] += ms
        by_phase[phase or "outside"][cat] += ms
        k = by_kernel[(e["name"][:160], cat)]
        k[0] += ms
        k[1] += 1
        intervals.append((e["ts"], e["ts"] + e["dur"]))
        after.append((e["ts"], e["name"][:120], ops[-4:]))
    busy_ms = _union_us(intervals) / 1e3
    if step and intervals:  # the step's wall span: its CPU start to the later of its CPU end and the last kernel end
        span_ms = (max(hi, max(e for _, e in intervals)) - lo) / 1e3
    else:
        span_ms = busy_ms
    kernels = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])
    return {
        "device_events": "cuda kernels, copies and sets" if on_gpu else "leaf CPU ops (no GPU)",
        "step_wall_ms": span_ms,
        "gpu_busy_ms": busy_ms,
        "gpu_idle_ms": span_ms - busy_ms,
        "kernel_time_ms": sum(by_cat.values()),
        "by_category_ms": {name: by_cat.get(name, 0.0) for name, _ in CATEGORIES} | {"other": by_cat.get("other", 0.0)},
        "by_phase_ms": {p: dict(c) for p, c in by_phase.items()},
        "largest_idle_gaps": _largest_gaps(intervals, after, lo, cpu) if on_gpu and step else [],
        "top_kernels": [{"name": n, "category": c, "ms": ms, "calls": calls} for (n, c), (ms, calls) in kernels[:top]],
        "other_kernels": [{"name": n, "ms": ms, "calls": calls} for (n, c), (ms, calls) in kernels if c == "other"][
            :top
        ],
    }


def label_ops() -> None:
    """Every deltapack op's forward in a ``deltapack::<op>`` profiler range, so that its kernels (FLA's Triton
    kernels launch from Python, under no aten op) are told apart; backward nodes carry their Function's name."""
    from deltapack.ops.dispatch import Op

    run = Op.run

    def labelled(self, *args, **kwargs):
        with torch.profiler.record_function(f"deltapack::{self.name}"):
            return run(self, *args, **kwargs)

    Op.run = labelled


def train_step(model, batch: dict, make_bounds, optimizer, device: str) -> tuple[float, float]:
    """One optimizer step with each phase in a record_function range; (forward+backward s, optimizer s)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.profiler.record_function("forward"):
        loss = model(**batch, boundaries=make_bounds()).loss
    with torch.profiler.record_function("backward"):
        loss.backward()
    sync()
    mid = time.perf_counter()
    with torch.profiler.record_function("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    return mid - start, time.perf_counter() - mid


def host_profile(step, top: int = 30) -> dict:
    """One call of ``step`` under cProfile: its wall time and the ``top`` Python functions by own time and by
    cumulative time (seconds), to tell where a host-bound step spends its time."""
    import cProfile
    import gc
    import pstats

    collections = []  # (generation, seconds) of each garbage collection during the step: cProfile does not see them

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append([info["generation"], time.perf_counter()])
        else:
            collections[-1][1] = time.perf_counter() - collections[-1][1]

    profiler = cProfile.Profile()
    gc.callbacks.append(on_gc)
    start = time.perf_counter()
    try:
        profiler.runcall(step)
    finally:
        wall = time.perf_counter() - start
        gc.callbacks.remove(on_gc)
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive calls, own s, cumulative s, callers)}

    def rows(key: int) -> list[dict]:
        ranked = sorted(stats.items(), key=lambda kv: kv[1][key], reverse=True)[:top]
        return [
            {
                "function": f"{Path(f).name}:{line}:{name}",
                "calls": c[0],
                "own_s": round(c[2], 5),
                "cum_s": round(c[3], 5),
            }
            for (f, line, name), c in ranked
        ]

    return {
        "wall_s": wall,
        "gc": {
            "collections": len(collections),
            "seconds": sum(c[1] for c in collections),
            "by_generation": [sum(1 for c in collections if c[0] == g) for g in range(3)],
        },
        "by_own_time": rows(2),
        "by_cumulative_time": rows(3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--trace", help="also keep the profiler's Chrome trace here (.gz: gzipped; tens of MB)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on 1024 tokens on the CPU")
    parser.add_argument("--recommended", action="store_true", help="chunked loss and compiled decoder layers")
    parser.add_argument(
        "--host-profile",
        action="store_true",
        help="also one step under cProfile: where the host spends its time (the Python functions)",
    )
    args = parser.parse_args()

    spec = load_spec()
    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model("qwen3_5_text", **(spec["model"]["config"] | TINY))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        total, row = 1024, 256
        lengths = [max(1, n // 16) for n in document_lengths(32768)]
        lengths = lengths[: next(i for i in range(len(lengths)) if sum(lengths[: i + 1]) >= total) + 1]
        lengths[-1] -= sum(lengths) - total
    else:
        model = e2e_model(spec)
        total, row = spec["tokens"]["total"], 8192
        lengths = document_lengths(total)
    model.train()
    # the configuration is the flag's, whatever the environment asks: FLA reads both variables at every call
    os.environ["FLA_FLASH_QLA"] = "1" if args.recommended else "0"
    os.environ["FLA_CONV_GLUON"] = "1" if args.recommended else "0"
    deltapack.patch(model, chunked_loss=args.recommended)
    if args.recommended:
        for layer in model.get_decoder().layers:
            layer.compile()
    label_ops()
    rows = rows_of(documents(lengths, model.config.vocab_size), row)
    batch, doc_ids, _ = deltapack_batch(rows, row)
    batch = {k: v.to(device) for k, v in batch.items()}

    def make_bounds():  # a collator hands over fresh boundaries with every batch
        return Boundaries.from_document_ids(doc_ids).to(device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    result: dict = {
        "env": environment() if device == "cuda" else {"device": "cpu (tiny dry run)", "torch": torch.__version__},
        "model": "e2e-spec 665M" if not args.tiny else "tiny (dry run)",
        "tokens": sum(lengths),
        "documents": len(lengths),
        "batch_shape": list(batch["input_ids"].shape),
        "optimizer": "torch.optim.AdamW (defaults, bf16 parameters and states)",
        "configuration": "recommended: chunked loss, compiled decoder layers" if args.recommended else "eager",
        "fla_flash_qla": os.environ["FLA_FLASH_QLA"],
        "fla_conv_gluon": os.environ["FLA_CONV_GLUON"],
    }
    clock = time.perf_counter()
    try:
        first = []
        for _ in range(args.warmup):
            first.append(sum(train_step(model, batch, make_bounds, optimizer, device)))
            print(f"warm-up step {len(first)}: {first[-1]:.2f} s (at {time.perf_counter() - clock:.0f} s)", flush=True)
        timed = [train_step(model, batch, make_bounds, optimizer, device) for _ in range(args.reps)]
        fwd_bwd = statistics.median(t[0] for t in timed)
        step = statistics.median(t[0] + t[1] for t in timed)
        result["step"] = {
            "warmup_s": first,
            "forward_backward_s": fwd_bwd,
            "optimizer_s": statistics.median(t[1] for t in timed),
            "step_s": step,
            "all": timed,
            "tokens_per_s": sum(lengths) / step,
        }
        if device == "cuda":
            result["step"]["peak_mem_GB"] = torch.cuda.max_memory_allocated() / 1e9
        result["mfu"] = mfu(model, sum(lengths), fwd_bwd)["mfu"]
        result["mfu_with_optimizer"] = mfu(model, sum(lengths), step)["mfu"]
        result["mfu_detail"] = mfu(model, sum(lengths), fwd_bwd)
    except Exception as err:  # noqa: BLE001 - recorded; the profile below may still run
        result["step"] = {"error": repr(err)[:2000]}
    write(args.out, result)
    if args.host_profile:
        result["host_profile"] = host_profile(lambda: train_step(model, batch, make_bounds, optimizer, device))
        write(args.out, result)

    try:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            with torch.profiler.record_function("profiled_step"):
                train_step(model, batch, make_bounds, optimizer, device)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            text = path.read_text()
        trace = json.loads(text)
        if args.trace:  # kept for a closer look (Perfetto / chrome://tracing read it gzipped too)
            with gzip.open(args.trace, "wt") if args.trace.endswith(".gz") else open(args.trace, "w") as f:
                f.write(text)
        result["profile"] = analyse(trace)
        if "step_s" in result.get("step", {}):  # the profiler slows the host: the idle time without it
            result["profile"]["gpu_idle_ms_unprofiled"] = (
                result["step"]["step_s"] * 1e3 - result["profile"]["gpu_busy_ms"]
            )
    except Exception as err:  # noqa: BLE001 - recorded in the JSON
        result["profile"] = {"error": repr(err)[:2000]}
    write(args.out, result)
    print(f"done at {time.perf_counter() - clock:.0f} s", flush=True)


if __name__ == "__main__":
    main()
