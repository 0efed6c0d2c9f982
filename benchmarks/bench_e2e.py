"""End-to-end benchmark: the 665M Qwen3.5-architecture model of e2e-spec.json, bf16, forward+backward (loss on all
tokens) over the spec's 32768-token stream, all modes in one run on one card:

- padded: documents in arrival order, 4 per batch, right-padded, 0/1 mask (unpatched model);
- hf_packed: transformers' own packed path: rows of at most 8192 tokens, position_ids restarting per document,
  cu_seq_lens_q/k and max_length_q/k, sdpa (unpatched model; its conv still leaks across documents);
- deltapack: the same rows as one batch [rows, 8192] with an indexed mask, boundaries built beforehand as a
  collator does, through the patched model (FLA + varlen attention);
- deltapack_rows: the patched model on the hf_packed rows one at a time;
With ``--compile``, the GPU training configuration README recommends, step by step, on the deltapack mode's batch:

- deltapack_chunked_loss: ``deltapack.patch(model, chunked_loss=True)`` (LM head and cross-entropy in chunks of
  4096 tokens: the [tokens, vocab] logits never exist);
- deltapack_compiled: that, with every decoder layer compiled on its own (``layer.compile()``, inductor, as
  torchtitan compiles), two warm-up passes (the first compiles);
- deltapack_compiled_flashqla: that, with FLA's FlashQLA GDN backend (``FLA_FLASH_QLA=1``; only if the
  ``flash_qla`` package is installed; its first call JIT-compiles for about 90 s);
- deltapack_compiled_flashqla_gluon_conv: that, with FLA's Gluon conv kernels (``FLA_CONV_GLUON=1``; only if this
  Triton has Gluon);
- deltapack_compiled_flashqla_triton_conv: that, with deltapack's own Triton conv (``DELTAPACK_BACKEND=triton``).

``recommended`` is the fastest of the compiled modes; ``speedup_vs_eager`` its tokens/s over the deltapack mode's
(today's eager path), both from this run; ``mfu`` is the recommended mode's (``mfu_eager`` the deltapack mode's).

Then exactness: the patched model's logits for every document of the packed batch against that document alone
through the same patched path (bf16), and against the unpatched model alone; with ``--compile`` also the
recommended configuration's logits for ``--sample`` documents against each alone through that configuration, and
its loss and parameter gradients on the packed batch against the eager path's (full logits).

Usage: python benchmarks/bench_e2e.py [--out e2e.json] [--compile] [--sample 12]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import torch
from common import (
    deltapack_batch,
    document_lengths,
    documents,
    e2e_model,
    environment,
    load_spec,
    mfu,
    padded_batches,
    rows_of,
    write,
)

import deltapack
from deltapack import Boundaries

ROW = 8192


def hf_packed_steps(rows: list[list[torch.Tensor]]) -> list[dict]:
    steps = []
    for row in rows:
        ids = torch.cat(row)[None]
        lengths = torch.tensor([len(d) for d in row])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
        pos = torch.cat([torch.arange(len(d)) for d in row])[None]
        longest = int(lengths.max())
        steps.append(
            {
                "input_ids": ids,
                "position_ids": pos,
                "labels": ids,
                "use_cache": False,
                "cu_seq_lens_q": cu,
                "cu_seq_lens_k": cu,
                "max_length_q": longest,
                "max_length_k": longest,
            }
        )
    return steps


def to_cuda(step: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in step.items()}


def time_passes(model, make_steps, warmup: int = 1, reps: int = 3) -> dict:
    """Forward+backward over every step of one pass (all 32768 tokens); median pass time over ``reps``."""
    times, first = [], []
    for i in range(warmup + reps):
        steps = make_steps()
        if i == warmup:
            torch.cuda.reset_peak_memory_stats()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        clock = time.perf_counter()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for step in steps:
            model(**step).loss.backward()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
        else:  # compiling and tuning kernels: wall time
            first.append(time.perf_counter() - clock)
    return {
        "seconds": statistics.median(times),
        "all_seconds": times,
        "warmup_wall_seconds": first,
        "peak_mem_GB": torch.cuda.max_memory_allocated() / 1e9,
    }


COMPILED_MODES = (
    "deltapack_compiled",
    "deltapack_compiled_flashqla",
    "deltapack_compiled_flashqla_gluon_conv",
    "deltapack_compiled_flashqla_triton_conv",
)


def configure(model, mode: str, compiled: bool) -> None:
    """Put the patched ``model`` in ``mode``'s configuration: chunked loss for every mode past the eager one,
    FlashQLA for the ``*_flashqla*`` modes, FLA's Gluon conv for ``*_gluon_conv``, deltapack's Triton conv for
    ``*_triton_conv``, every decoder layer compiled (``compiled``) or not. The kernel choices are environment
    variables read at every call, so a mode that changes only them keeps the compiled layers (no recompile)."""
    state = (mode != "deltapack", compiled)
    if getattr(model, "_bench_state", None) != state:
        deltapack.unpatch(model)
        deltapack.patch(model, chunked_loss=state[0])
        for layer in model.get_decoder().layers:
            if compiled:
                layer.compile()
            else:
                layer._compiled_call_impl = None
        model._bench_state = state
    os.environ["FLA_FLASH_QLA"] = "1" if "_flashqla" in mode else "0"
    os.environ["FLA_CONV_GLUON"] = "1" if mode.endswith("_gluon_conv") else "0"
    if mode.endswith("_triton_conv"):  # the conv is the one op of this model with a "triton" backend
        os.environ["DELTAPACK_BACKEND"] = "triton"
    else:
        os.environ.pop("DELTAPACK_BACKEND", None)


def compiled_modes(model, modes: dict, make_steps, reps: int) -> None:
    """Time the recommended configuration step by step (module docstring); each mode's error is recorded and the
    next one runs."""
    plan = [("deltapack_chunked_loss", False, 1), ("deltapack_compiled", True, 2)]
    if importlib.util.find_spec("flash_qla") is not None:
        plan.append(("deltapack_compiled_flashqla", True, 2))
        if importlib.util.find_spec("triton.experimental.gluon") is not None:  # the compiled graphs stay: one warm-up
            plan.append(("deltapack_compiled_flashqla_gluon_conv", True, 1))
        plan.append(("deltapack_compiled_flashqla_triton_conv", True, 1))
    from deltapack.ops import opaque

    for name, compiled, warmup in plan:
        try:
            configure(model, name, compiled)
            modes[name] = time_passes(model, make_steps, warmup=warmup, reps=reps)
        except Exception as err:  # noqa: BLE001 - record it; the other modes stand
            modes[name] = {"error": repr(err)[:500]}
            if compiled and not opaque.RECOMPUTE:  # once more with each op's forward recomputed in its backward
                opaque.RECOMPUTE = True
                try:
                    modes[name] = time_passes(model, make_steps, warmup=warmup, reps=reps)
                    modes[name]["opaque_recompute_after"] = repr(err)[:500]
                except Exception as again:  # noqa: BLE001
                    modes[name]["error_with_recompute"] = repr(again)[:500]
        torch.cuda.empty_cache()
    configure(model, "deltapack", compiled=False)


def loss_and_grads(model, step: dict) -> tuple[float, torch.Tensor]:
    """One forward+backward of ``step``: the loss and every parameter's gradient, flattened into one fp32 vector."""
    model.zero_grad(set_to_none=True)
    loss = model(**step).loss
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def document_diffs(model, ids: torch.Tensor, bounds: Boundaries, places: list[tuple[int, int, int]]):
    """Max |logit difference| of each document (row, start, length) of the packed batch against that document
    alone through the same model, and the packed logits' largest magnitude."""
    with torch.no_grad():
        packed = model(input_ids=ids, boundaries=bounds).logits
        diffs = []
        for r, c, n in places:
            cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
            alone = model(input_ids=ids[r : r + 1, c : c + n], cu_seq_lens_q=cu).logits[0]
            diffs.append((packed[r, c : c + n] - alone).abs().max().item())
    return diffs, packed.abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-exact", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time the recommended configuration")
    parser.add_argument("--sample", type=int, default=12, help="documents checked in the recommended configuration")
    args = parser.parse_args()

    # today's eager path and the unpatched modes on FLA's default Triton kernels, whatever the environment asks
    os.environ["FLA_FLASH_QLA"], os.environ["FLA_CONV_GLUON"] = "0", "0"
    spec = load_spec()
    model = e2e_model(spec).train()
    config = model.config
    lengths = document_lengths(spec["tokens"]["total"])
    docs = documents(lengths, config.vocab_size)
    total = sum(lengths)
    rows = rows_of(docs, ROW)
    result = {
        "env": environment(),
        "model_parameters_millions": sum(p.numel() for p in model.parameters()) / 1e6,
        "tokens": total,
        "documents": len(docs),
        "hf_rows": len(rows),
        "padded_tokens_ratio": sum(s["input_ids"].numel() for s in padded_batches(docs)) / total,
    }
    modes: dict[str, dict] = {}

    padded = [to_cuda(s) for s in padded_batches(docs)]
    hf_rows = [to_cuda(s) for s in hf_packed_steps(rows)]
    for name, steps in (("padded", padded), ("hf_packed", hf_rows)):
        try:
            modes[name] = time_passes(model, lambda steps=steps: steps, reps=args.reps)
        except Exception as err:  # noqa: BLE001 - record and go on with the other modes
            modes[name] = {"error": repr(err)[:500]}
        torch.cuda.empty_cache()

    deltapack.patch(model)
    batch, doc_ids, places = deltapack_batch(rows, ROW)
    batch = to_cuda(batch)

    def deltapack_steps():  # a collator hands over fresh boundaries with every batch
        return [{**batch, "boundaries": Boundaries.from_document_ids(doc_ids).to("cuda")}]

    def deltapack_row_steps():
        out = []
        for s in hf_rows:
            b = Boundaries.from_cu_seqlens(s["cu_seq_lens_q"].cpu(), tuple(s["input_ids"].shape)).to("cuda")
            out.append({"input_ids": s["input_ids"], "labels": s["labels"], "boundaries": b})
        return out

    modes["deltapack"] = time_passes(model, deltapack_steps, reps=args.reps)
    torch.cuda.empty_cache()
    modes["deltapack_rows"] = time_passes(model, deltapack_row_steps, reps=args.reps)
    if args.compile:
        compiled_modes(model, modes, deltapack_steps, args.reps)
    for m in modes.values():
        if "seconds" in m:
            m["tokens_per_s"] = total / m["seconds"]
    e2e = {"modes": modes}
    dp = modes["deltapack"]["tokens_per_s"]
    for base in ("padded", "hf_packed"):
        if "tokens_per_s" in modes[base]:
            e2e[f"vs_{base}"] = dp / modes[base]["tokens_per_s"]
    # forward+backward (no optimizer step), all 32768 tokens in one batch
    e2e["mfu_eager"] = mfu(model, total, modes["deltapack"]["seconds"])["mfu"]
    timed = [name for name in COMPILED_MODES if "tokens_per_s" in modes.get(name, {})]
    best = max(timed, key=lambda name: modes[name]["tokens_per_s"]) if timed else "deltapack"
    e2e["recommended"] = best
    e2e["speedup_vs_eager"] = modes[best]["tokens_per_s"] / dp
    e2e["mfu_detail"] = mfu(model, total, modes[best]["seconds"])
    e2e["mfu"] = e2e["mfu_detail"]["mfu"]
    result["e2e"] = e2e
    write(args.out, result)

    if args.skip_exact:
        return
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    bounds = deltapack_steps()[0]["boundaries"]
    if args.compile:  # the recommended configuration on sampled documents (each new length may recompile a layer)
        configure(model, best, compiled=best != "deltapack")
        sample = sorted(torch.randperm(len(places), generator=torch.Generator().manual_seed(0))[: args.sample])
        diffs, logit_max = document_diffs(model, batch["input_ids"], bounds, [places[i] for i in sample])
        loss, grads = loss_and_grads(model, deltapack_steps()[0])
        configure(model, "deltapack", compiled=False)
        loss_eager, grads_eager = loss_and_grads(model, deltapack_steps()[0])
        result["e2e"]["exact"] = {
            "configuration": best,
            "max_abs_logit_diff": max(diffs),
            "documents_bit_exact": sum(d == 0 for d in diffs),
            "documents": len(diffs),
            "logit_abs_max": logit_max,
            # the same batch's loss and parameter gradients against the eager path's (full logits), bf16
            "loss_rel_diff_vs_eager": abs(loss - loss_eager) / abs(loss_eager),
            "grad_rel_diff_vs_eager": float((grads - grads_eager).norm() / grads_eager.norm()),
        }
        write(args.out, result)
    diffs, logit_max = document_diffs(model, batch["input_ids"], bounds, places)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], boundaries=bounds).logits
        deltapack.unpatch(model)
        diffs_hf = []
        for r, c, n in places:
            alone = model(input_ids=batch["input_ids"][r : r + 1, c : c + n]).logits[0]
            diffs_hf.append((packed[r, c : c + n] - alone).abs().max().item())
    result["exact"] = {
        "max_abs_logit_diff": max(diffs),
        "documents_bit_exact": sum(d == 0 for d in diffs),
        "documents": len(diffs),
        "max_abs_logit_diff_vs_unpatched_alone": max(diffs_hf),
        "logit_abs_max": logit_max,
    }
    write(args.out, result)


if __name__ == "__main__":
    main()
