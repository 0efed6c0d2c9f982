"""Attention-only models on one GPU: a Llama-architecture ~1B model, bf16, forward+backward (loss on all tokens)
over the 32768-token stream of e2e-spec.json, and attention variants checked against the reference.

Modes (the same documents, all in one run):

- padded: documents in arrival order, 4 per batch, right-padded, 0/1 mask (unpatched model);
- hf_packed: transformers' own packed path: rows of at most 8192 tokens, position_ids restarting per document,
  use_cache=False, sdpa (unpatched model; transformers builds a block mask from the positions);
- deltapack: the same rows as one batch [rows, 8192] with an indexed mask and boundaries built beforehand, through
  ``deltapack.patch`` (varlen attention with the batch's cu_seqlens, no [T, T] mask).

Exactness: the logits of sampled documents of the deltapack batch against each document alone through the
unpatched model (bf16), beside the same document alone in bf16 vs fp32 (the bf16 noise floor), written as soon as
it is done. Attention variants (``VARIANTS``): a gpt_oss-like model (sinks + sliding window, flex_attention), a
gemma3-like model (sliding and full layers, sdpa), a gemma2-like one (soft-capped attention, flex_attention) and
llama on eager attention, packed through the GPU plan vs each document alone through the original model in eager
(bf16 errors vs fp32 alone); each records the plan that ran (varlen, flex, or the dense mask; eager: the dense mask
and its warning).

Usage: python benchmarks/bench_llama.py [--out llama.json] [--dry]
``--dry``: tiny configs and 2048 tokens on the CPU (checks the script runs; timings meaningless).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from common import deltapack_batch, document_lengths, documents, environment, padded_batches, rows_of, write

import deltapack
from deltapack import Boundaries

ROW = 8192
LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
LLAMA_DRY = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)  # fmt: skip


def llama(config: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **config), attn_implementation="sdpa")
    return model.to(dtype)


def hf_packed_steps(rows: list[list[torch.Tensor]]) -> list[dict]:
    out = []
    for row in rows:
        ids = torch.cat(row)[None]
        pos = torch.cat([torch.arange(len(d)) for d in row])[None]
        out.append({"input_ids": ids, "position_ids": pos, "labels": ids, "use_cache": False})
    return out


def to(step: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in step.items()}


def time_passes(model, make_steps, device: str, warmup: int = 1, reps: int = 3) -> dict:
    """Forward+backward over every step of one pass (all tokens); median pass time over ``reps``."""
    cuda = device == "cuda"
    times = []
    for i in range(warmup + reps):
        steps = make_steps()
        if cuda and i == warmup:
            torch.cuda.reset_peak_memory_stats()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for step in steps:
            model(**step).loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    out = {"seconds": statistics.median(times), "all_seconds": times}
    if cuda:
        out["peak_mem_GB"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def exactness(model, batch, doc_ids, places, device: str, samples: int = 12) -> dict:
    """Sampled documents' logits: deltapack batch vs alone (unpatched), and the bf16 noise of the same alone."""
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    pick = sorted(torch.randperm(len(places), generator=gen)[:samples].tolist())
    with torch.no_grad():
        bounds = Boundaries.from_document_ids(doc_ids).to(device)
        packed = model(input_ids=batch["input_ids"], boundaries=bounds).logits
        deltapack.unpatch(model)
        diffs, noise = [], []
        for i in pick:
            r, c, n = places[i]
            ids = batch["input_ids"][r : r + 1, c : c + n]
            alone = model(input_ids=ids).logits[0].float()
            diffs.append((packed[r, c : c + n].float() - alone).abs().max().item())
            model.float()
            alone32 = model(input_ids=ids).logits[0]
            model.to(dtype)
            noise.append((alone - alone32).abs().max().item())
        deltapack.patch(model)
    return {
        "documents_sampled": len(pick),
        "max_abs_logit_diff_vs_alone": max(diffs),
        "bf16_noise_alone_vs_fp32": max(noise),
        "per_document": [{"length": places[i][2], "diff": d, "noise": z} for i, d, z in zip(pick, diffs, noise)],
    }


# the attention variants: (model type, attention implementation on a GPU, config overrides). Head dims of 64 (the
# audit's tiny configs have 16; flex's inductor templates failed to compile one such config on an H200). gemma3
# keeps attn_logit_softcapping in its config but does not pass it to attention; gemma2 does (soft-capped scores),
# and both scale the final logits (final_logit_softcapping). llama on eager: the exact dense mask, with a warning.
VARIANTS = (
    ("gpt_oss", "flex_attention", {"sliding_window": 128, "head_dim": 64}),  # sinks + sliding window
    ("gemma3_text", "sdpa", {"sliding_window": 128, "head_dim": 64, "final_logit_softcapping": 30.0}),
    ("gemma2", "flex_attention", {"sliding_window": 128, "head_dim": 64}),  # soft-capped attention (no sdpa)
    ("llama", "eager", {"head_dim": 64}),
)


def variant_check(arch: str, impl: str, overrides: dict, device: str, lengths: list[int]) -> dict:
    """A tiny model of ``arch`` (the audit's shrunk config) packed through deltapack vs each document alone.

    The references (each document alone, fp32 and bf16) run eager attention, the exact math on any device;
    the packed stream runs ``impl`` through deltapack's attention plan. Returns the errors, the plan each layer
    class logged (``plans``; eager logs none: ``ran`` says what ran then), deltapack's warnings, a flex failure.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from deltapack.audit import shrink
    from deltapack.models import attention_plan

    config, _ = shrink.shrink_config(AutoConfig.for_model(arch), arch)
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(device).eval()
    docs = documents(lengths, config.get_text_config().vocab_size)
    ids = torch.cat(docs)[None].to(device)
    bounds = Boundaries.from_cu_seqlens(torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]), ids.shape)
    with torch.no_grad():
        ref = [model(d[None].to(device)).logits[0] for d in docs]
        model.to(torch.bfloat16)
        alone = [model(d[None].to(device)).logits[0].float() for d in docs]
        model.set_attn_implementation(impl)
        deltapack.patch(model)
        attention_plan._logged.clear()
        attention_plan._flex_failure.reason = ""  # each variant gets its own flex try
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        logging.getLogger("deltapack").addHandler(handler)
        logging.getLogger("deltapack").setLevel(logging.INFO)
        try:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            packed = model(input_ids=ids, boundaries=bounds.to(device)).logits[0].float()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        finally:
            logging.getLogger("deltapack").removeHandler(handler)
            deltapack.unpatch(model)
        model.set_attn_implementation("eager")
        leak = model(ids).logits[0].float()  # unpatched, no packing information: documents attend to each other
    messages = [r.getMessage() for r in records]
    parts = packed.split(lengths)
    err = max((p - r).abs().max().item() for p, r in zip(parts, ref))
    floor = max((a - r).abs().max().item() for a, r in zip(alone, ref))
    leaked = max((p - r).abs().max().item() for p, r in zip(leak.split(lengths), ref))
    plans = sorted({m.split(" plan")[0].split("the ")[-1] for m in messages if "runs packed attention on" in m})
    eager_dense = any("eager attention on a GPU keeps an exact dense" in m for m in messages)
    return {
        "arch": arch,
        "attn_implementation": impl,
        "overrides": overrides,
        "tokens": sum(lengths),
        "documents": len(lengths),
        "plans": plans,
        "ran": ", ".join(plans)
        if plans
        else (
            "dense (eager's own attention, exact [T, T] mask)"
            if eager_dense
            else "dense (no plan logged: the exact mask)"
        ),  # fmt: skip
        "warnings": [r.getMessage() for r in records if r.levelno >= logging.WARNING],
        "flex_failure": attention_plan._flex_failure.reason or None,  # a flex call that raised: the dense plan ran
        "packed_vs_fp32_alone": err,
        "bf16_alone_vs_fp32_alone": floor,
        "unpatched_leak_vs_fp32_alone": leaked,
        "exact_within_bf16_noise": err <= 2 * floor + 1e-3,
        "first_forward_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dry", action="store_true", help="tiny configs, 2048 tokens, CPU")
    args = parser.parse_args()

    device = "cpu" if args.dry else "cuda"
    dtype = torch.float32 if args.dry else torch.bfloat16
    row = 512 if args.dry else ROW
    total = 2048 if args.dry else 32768
    lengths = document_lengths(total)
    if args.dry:  # the spec's lengths scaled down to fit 2048 tokens
        lengths = [max(1, n // 8) for n in document_lengths(32768)]
        lengths = lengths[: next(i for i in range(len(lengths)) if sum(lengths[: i + 1]) >= total) + 1]
        lengths[-1] -= sum(lengths) - total
    model = llama(LLAMA_DRY if args.dry else LLAMA_1B, device, dtype).train()
    docs = documents(lengths, model.config.vocab_size)
    rows = rows_of(docs, row)
    result = {
        "env": environment() if device == "cuda" else {"device": "cpu (dry run)", "torch": torch.__version__},
        "model": "llama",
        "config": LLAMA_DRY if args.dry else LLAMA_1B,
        "model_parameters_millions": sum(p.numel() for p in model.parameters()) / 1e6,
        "tokens": sum(lengths),
        "documents": len(docs),
        "rows": len(rows),
        "padded_tokens_ratio": sum(s["input_ids"].numel() for s in padded_batches(docs)) / sum(lengths),
    }
    modes: dict[str, dict] = {}
    for name, steps in (("padded", padded_batches(docs)), ("hf_packed", hf_packed_steps(rows))):
        steps = [to(s, device) for s in steps]
        try:
            modes[name] = time_passes(model, lambda steps=steps: steps, device, reps=args.reps)
        except Exception as err:  # noqa: BLE001 - record it and go on with the other modes
            modes[name] = {"error": repr(err)[:500]}
        if device == "cuda":
            torch.cuda.empty_cache()

    deltapack.patch(model)
    batch, doc_ids, places = deltapack_batch(rows, row)
    batch = to(batch, device)
    modes["deltapack"] = attempt(
        lambda: time_passes(
            model,
            lambda: [{**batch, "boundaries": Boundaries.from_document_ids(doc_ids).to(device)}],
            device,
            reps=args.reps,
        )
    )
    for m in modes.values():
        if "seconds" in m:
            m["tokens_per_s"] = sum(lengths) / m["seconds"]
    speed = {"modes": modes}
    for base in ("padded", "hf_packed"):
        if "tokens_per_s" in modes[base] and "tokens_per_s" in modes["deltapack"]:
            speed[f"vs_{base}"] = modes["deltapack"]["tokens_per_s"] / modes[base]["tokens_per_s"]
    result["speed"] = speed
    write(args.out, result)

    model.zero_grad(set_to_none=True)
    model.eval()
    result["exact"] = attempt(lambda: exactness(model, batch, doc_ids, places, device, samples=4 if args.dry else 12))
    write(args.out, result)
    deltapack.unpatch(model)  # a no-op when the exactness stage failed unpatched
    model = None  # frees the 1B model before the variants
    if device == "cuda":
        torch.cuda.empty_cache()
    variant_lengths = lengths[: 12 if args.dry else 24]
    result["variants"] = []
    for arch, impl, overrides in VARIANTS:
        if device != "cuda" and impl == "flex_attention":
            impl = "eager"  # flex attention compiles for CUDA only
        got = attempt(lambda: variant_check(arch, impl, overrides, device, variant_lengths))  # noqa: B023
        result["variants"].append({"arch": arch, "attn_implementation": impl, "overrides": overrides, **got})
        write(args.out, result)


def attempt(stage) -> dict:
    """``stage()``, or {"error": ...} when it raises, so that one failing stage never loses the others' numbers."""
    try:
        return stage()
    except Exception as err:  # noqa: BLE001 - recorded in the JSON; the next stage runs
        logging.getLogger("deltapack").exception("bench_llama: a stage failed")
        return {"error": repr(err)[:2000]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
