"""Packer benchmark (CPU): deltapack's best-fit-decreasing packer vs TRL's, on the same documents.

1,000,000 documents with lognormal lengths (median 600, sigma 1.0, at least 1, capped at 8192) are packed into
rows of 8192 tokens. Both packers get the same Hugging Face ``datasets.Dataset`` with an int32 ``input_ids``
column and return a packed Dataset (tokens moved, ``seq_lengths`` per row):

- ``deltapack.data.pack_dataset(ds, 8192)``: the whole dataset planned at once;
- ``trl.pack_dataset(ds, 8192, "bfd")``: as SFTTrainer calls it (``map`` batches of 1000 documents, each packed
  on its own);
- the same with ``map_kwargs={"batch_size": None}``: TRL's BFD over the whole dataset in one batch.

Also timed: ``deltapack.data.plan_rows`` alone (lengths in, row assignment out). Fill = real tokens / (rows * 8192).

    python benchmarks/pack_bench.py [--docs 1000000] [--max-tokens 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

import numpy as np


def lognormal_lengths(docs: int, median: float, sigma: float, cap: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, docs).astype(np.int64), 1, cap)


def make_dataset(lengths: np.ndarray):
    import datasets
    import pyarrow as pa

    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise SystemExit("too many tokens for int32 list offsets; use fewer documents")
    values = pa.array(np.resize(np.arange(50_000, dtype=np.int32), int(offsets[-1])))  # token ids, 4 bytes each
    column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    table = datasets.table.InMemoryTable(pa.Table.from_arrays([column], names=["input_ids"]))
    return datasets.Dataset(table, fingerprint="pack-bench-input")  # no hashing of the 4 GB table


def fill_of(packed, max_tokens: int) -> tuple[int, int, float]:
    from deltapack.data import dataset_stats

    stats = dataset_stats(packed, max_tokens)
    return stats.rows, stats.tokens, stats.fill


def timed(name: str, fn, max_tokens: int, results: dict) -> None:
    gc.collect()
    start = time.perf_counter()
    packed = fn()
    seconds = time.perf_counter() - start
    rows, tokens, fill = fill_of(packed, max_tokens)
    results[name] = {"seconds": round(seconds, 2), "rows": rows, "tokens": tokens, "fill": fill}
    print(f"{name:<34} {seconds:8.2f} s   {rows:>9} rows   fill {fill:.4%}", flush=True)
    del packed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--median", type=float, default=600)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-trl-whole", action="store_true", help="skip TRL's BFD over the whole dataset")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()

    import datasets
    import trl

    from deltapack.data import pack_dataset, plan_rows

    datasets.disable_progress_bars()
    lengths = lognormal_lengths(args.docs, args.median, args.sigma, args.max_tokens, args.seed)
    machine = f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
    print(f"{args.docs} documents, {int(lengths.sum())} tokens, rows of {args.max_tokens}; {machine}")
    print(f"trl {trl.__version__}, datasets {datasets.__version__}")
    ds = make_dataset(lengths)
    results: dict = {
        "machine": machine,
        "docs": args.docs,
        "tokens": int(lengths.sum()),
        "max_tokens": args.max_tokens,
        "trl": trl.__version__,
    }
    start = time.perf_counter()
    rows = plan_rows(lengths, args.max_tokens)
    plan_s = time.perf_counter() - start
    plan_fill = float(lengths.sum()) / (len(rows) * args.max_tokens)
    results["deltapack plan_rows (lengths only)"] = {"seconds": round(plan_s, 2), "rows": len(rows), "fill": plan_fill}
    print(f"{'deltapack plan_rows (lengths only)':<34} {plan_s:8.2f} s   {len(rows):>9} rows   fill {plan_fill:.4%}")
    del rows

    timed("deltapack pack_dataset", lambda: pack_dataset(ds, args.max_tokens), args.max_tokens, results)
    timed(
        "trl pack_dataset bfd (map 1000)",
        lambda: trl.pack_dataset(ds, args.max_tokens, "bfd"),
        args.max_tokens,
        results,
    )
    if not args.skip_trl_whole:
        timed(
            "trl pack_dataset bfd (whole)",
            lambda: trl.pack_dataset(ds, args.max_tokens, "bfd", map_kwargs={"batch_size": None}),
            args.max_tokens,
            results,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
