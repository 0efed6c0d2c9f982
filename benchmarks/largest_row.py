"""The largest packed row of a ``bench_cp.py`` model that trains (forward + backward) on one GPU.

    python benchmarks/largest_row.py --model 9b --out largest_9b.json            # 32768, 49152, 65536, 98304, ...
    python benchmarks/largest_row.py --dry --out /tmp/largest.json                # a tiny model on the CPU

One GPU, no sharding: the model in bf16 (weights and gradients), ``deltapack.patch(model, chunked_loss=True)`` (the
LM head and cross-entropy in chunks of 4096 tokens, so the [tokens, vocab] logits never exist: the 9B config's
248K vocabulary makes them 32 GB in bf16 at 64K tokens), every decoder layer checkpointed
(``gradient_checkpointing_enable``), loss on every token of a row of the e2e spec's documents (``bench_cp.row``).
``--optimizer adamw`` adds an AdamW step (bf16 states, 4 more bytes per parameter); the default is forward and
backward only, the activations' limit.

The rows follow ``bench_cp.ladder`` (each 1.5x the last, multiples of 16384) from ``--first`` up to ``--limit`` and
stop at the first row that fails. Each row runs in a fresh subprocess, so an out-of-memory leaves the next try a
clean card; a row gets two steps (the first compiles and tunes kernels, the second is timed) and ``--try-timeout``
seconds. The JSON is written after every row: ``memory.largest_row_<model>_one_gpu`` is the largest row that
trained.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_cp import ladder, model_fields, row  # noqa: E402

import deltapack  # noqa: E402
from deltapack import Boundaries  # noqa: E402

DRY = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
           linear_key_head_dim=16, linear_value_head_dim=16,
           layer_types=["linear_attention"] * 3 + ["full_attention"])  # fmt: skip


def one_row(model_name: str, tokens: int, optimizer_name: str, dry: bool, loss_chunk: int) -> dict:
    """Build the model, train ``tokens`` for two steps; the record of the second (or of the failure)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cpu" if dry else "cuda"
    fields = model_fields(model_name) | (DRY if dry else {})
    config = AutoConfig.for_model("qwen3_5_text", **fields, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    deltapack.patch(model, chunked_loss=loss_chunk)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5) if optimizer_name == "adamw" else None
    ids, cu = row(tokens)
    ids = (ids % config.vocab_size).to(device)
    bounds = Boundaries.from_cu_seqlens(cu, (1, tokens)).to(device)
    record = {"tokens": tokens, "parameters_billions": round(params / 1e9, 2), "documents": len(cu) - 1}
    times = []
    for _ in range(2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids, boundaries=bounds)
        loss = out.loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        print(f"{tokens} tokens: step {len(times)} in {times[-1]:.2f} s, loss {loss.item():.4f}", flush=True)
    record |= {"ok": True, "first_step_s": round(times[0], 3), "step_s": round(times[1], 3),
               "tokens_per_s": round(tokens / times[1]), "loss": loss.item(),
               "full_logits_returned": out.logits is not None}  # fmt: skip
    if device == "cuda":
        record["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return record


def child(args: argparse.Namespace) -> None:
    """One row in this process; the last stdout line is its JSON record."""
    try:
        record = one_row(args.model, args.one_row, args.optimizer, args.dry, args.loss_chunk)
    except (torch.OutOfMemoryError, RuntimeError) as err:  # Triton kernels raise RuntimeError on OOM
        oom = "out of memory" in str(err)
        record = {"tokens": args.one_row, "ok": False, "oom": oom, "error": repr(err)[:1000]}
        if torch.cuda.is_available():
            record["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        gc.collect()
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="9b", help="a bench_cp.py model: 665m, 9b, 7b")
    parser.add_argument("--first", type=int, help="first row (default 32768; --dry: 512)")
    parser.add_argument("--limit", type=int, help="last row tried (default 1048576; --dry: 1024)")
    parser.add_argument("--sizes", help="comma-separated rows instead of the ladder")
    parser.add_argument("--optimizer", choices=("none", "adamw"), default="none")
    parser.add_argument("--loss-chunk", type=int, default=4096, help="tokens per chunk of the LM head + loss")
    parser.add_argument("--try-timeout", type=int, default=300, help="seconds one row may take (its subprocess)")
    parser.add_argument("--dry", action="store_true", help="a tiny model of the same layout on the CPU")
    parser.add_argument("--out", default="largest_row.json")
    parser.add_argument("--one-row", type=int, help=argparse.SUPPRESS)  # the subprocess of one row
    args = parser.parse_args()
    if args.one_row:
        child(args)
        return
    first = args.first or (512 if args.dry else 32768)
    limit = args.limit or (1024 if args.dry else 2**20)
    sizes = [int(n) for n in args.sizes.split(",")] if args.sizes else _ladder(first, limit, args.dry)
    key = f"largest_row_{args.model}_one_gpu"
    out: dict = {
        "model": args.model + (" (dry: tiny)" if args.dry else ""),
        "setting": "one GPU, bf16 weights and gradients, every decoder layer checkpointed, chunked loss "
        f"({args.loss_chunk} tokens per chunk), optimizer: {args.optimizer}",
        "memory": {key: 0, "tries": []},
    }
    if not args.dry:
        from common import environment

        out["environment"] = environment()
    for tokens in sizes:
        cmd = [sys.executable, __file__, "--one-row", str(tokens), "--model", args.model, "--optimizer",
               args.optimizer, "--loss-chunk", str(args.loss_chunk)] + (["--dry"] if args.dry else [])  # fmt: skip
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.try_timeout, env=os.environ)
            lines = [line for line in proc.stdout.splitlines() if line.startswith('{"tokens"')]
            record = json.loads(lines[-1]) if lines else {"tokens": tokens, "ok": False, "rc": proc.returncode,
                                                           "error": proc.stderr[-1500:]}  # fmt: skip
        except subprocess.TimeoutExpired:
            record = {"tokens": tokens, "ok": False, "error": f"timed out after {args.try_timeout} s"}
        record["wall_s"] = round(time.perf_counter() - start, 1)
        out["memory"]["tries"].append(record)
        if record.get("ok"):
            out["memory"][key] = max(out["memory"][key], tokens)
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(json.dumps(record), flush=True)
        if not record.get("ok"):
            break


def _ladder(first: int, limit: int, dry: bool) -> list[int]:
    if not dry:
        return ladder(first, limit)
    sizes = []  # bench_cp's ladder steps by multiples of 16384: too coarse for the CPU
    while first <= limit:
        sizes.append(first)
        first = first * 3 // 2
    return sizes


if __name__ == "__main__":
    main()
