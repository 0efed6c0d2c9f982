"""The training loop of ``deltapack train``: one process, or one rank of torchrun's (context parallelism, FSDP2)."""

from __future__ import annotations

import argparse
import functools
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltapack.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    rank_world,
    save_checkpoint,
)
from deltapack.train.inputs import (
    TrainError,
    check_parallel_options,
    check_vocab,
    load_documents,
    load_model,
    load_tokenizer,
)
from deltapack.train.report import MetricsLog, TrainReport, padded_tokens, progress

if TYPE_CHECKING:
    from deltapack.distributed.launch import Parallel

__all__ = ["batch_rows_at", "train"]


def _setup_parallel(args: argparse.Namespace) -> Parallel | None:
    """The process group and this rank's place when torchrun started us; None for a single process."""
    from deltapack.distributed import launch

    if not launch.is_launched():
        if args.cp > 1 or args.fsdp:
            raise TrainError(
                "deltapack train: --cp and --fsdp need several processes; expected `deltapack train --nproc N ...` "
                "or `torchrun --nproc-per-node N -m deltapack.train ...`"
            )
        check_parallel_options(args, 1)
        return None
    world_size = launch.world_size_in_env()
    if args.nproc > 1 and args.nproc != world_size:
        raise TrainError(f"deltapack train: --nproc {args.nproc} under torchrun with {world_size} processes")
    check_parallel_options(args, world_size)
    parallel = launch.init_parallel(args.cp, args.device)
    if not parallel.is_main:
        import logging

        logging.getLogger("transformers").setLevel(logging.ERROR)
    return parallel


def _distribute(model: nn.Module, args: argparse.Namespace, parallel: Parallel) -> None:
    """Context parallelism, then FSDP2 (or every rank starting from rank 0's weights) on the patched model."""
    import torch.distributed as dist

    from deltapack.distributed import apply_fsdp, enable_context_parallel, load_from_rank0

    if args.cp > 1:
        enable_context_parallel(model)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(parallel.device.type, (parallel.world_size,))
        # bf16 compute on GPUs (fp32 master weights); the reference path on the CPU stays fp32, as in one process
        compute = torch.bfloat16 if parallel.device.type == "cuda" else torch.float32
        full_state = model.state_dict() if parallel.is_main else {}
        apply_fsdp(model, mesh, param_dtype=compute, context_parallel_size=args.cp)
        load_from_rank0(model, full_state, parallel.device)
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` that also takes FSDP's sharded gradients (the norm of the whole gradient); returns the
    norm before clipping. ``max_norm`` 0: no clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.item()


_RNG_BEFORE_EPOCH: dict[tuple[int, int], list[Any]] = {}  # (rows, seed) -> the generator's state before each epoch


@functools.lru_cache(maxsize=4)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    """Epoch ``epoch``'s shuffle of the rows: the ``epoch + 1``-th shuffle drawn from ``random.Random(seed)``."""
    states = _RNG_BEFORE_EPOCH.setdefault((n_rows, seed), [random.Random(seed).getstate()])
    rng = random.Random()
    while len(states) <= epoch:  # reach a later epoch (a resumed run) by drawing the shuffles before it
        rng.setstate(states[-1])
        rng.shuffle(list(range(n_rows)))
        states.append(rng.getstate())
    rng.setstate(states[epoch])
    order = list(range(n_rows))
    rng.shuffle(order)
    return tuple(order)


def batch_rows_at(step: int, n_rows: int, batch_rows: int, seed: int) -> list[int]:
    """The packed rows of step ``step``: positions ``step * batch_rows ...`` of the epochs' shuffles laid end to end.

    A pure function of the seed and the step, so a resumed run draws the same rows as an uninterrupted one.
    """
    positions = range(step * batch_rows, (step + 1) * batch_rows)
    return [_epoch_order(n_rows, seed, p // n_rows)[p % n_rows] for p in positions]


def _scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps: int) -> Any:
    """The learning-rate schedule (a ``torch.optim.lr_scheduler.LambdaLR`` from transformers' ``get_scheduler``)."""
    from transformers import get_scheduler

    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * steps)
    name = args.lr_scheduler_type
    if name == "constant" and warmup:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def _run_key(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it (the data order and the optimizer)."""
    keys = ("seed", "batch_rows", "gradient_accumulation_steps", "max_tokens", "eval_split", "lora")
    return {k: getattr(args, k) for k in keys}


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n > 1 else "")


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _resume(args: argparse.Namespace, model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any] | None:
    """Load --resume's checkpoint (the newest complete one in --output for plain --resume); None to start fresh."""
    if args.resume is None:
        return None
    if args.resume == "latest":
        path = latest_checkpoint(args.output)
        if path is None:
            if _is_rank0():
                print(
                    f"deltapack train: no complete checkpoint in {args.output!r}; starting at step 0", file=sys.stderr
                )
            return None
    else:
        path = Path(args.resume).expanduser()
    loaded = load_checkpoint(path, model, optimizer, scheduler)
    saved = loaded["state"]["run"]
    differs = {k: (v, saved.get(k)) for k, v in _run_key(args).items() if saved.get(k) != v}
    if differs:
        detail = ", ".join(f"{k} {now!r} (checkpoint: {then!r})" for k, (now, then) in differs.items())
        raise CheckpointError(
            f"deltapack train: checkpoint {str(path)!r} is of a different run: {detail}; expected the same settings"
        )
    if _is_rank0():
        _, world = rank_world()
        resharded = ""
        if loaded["world_size"] != world:
            resharded = f"; written by {_processes(loaded['world_size'])}, resharded for {_processes(world)}"
        print(f"deltapack train: resuming from {path} (step {loaded['step']}{resharded})", file=sys.stderr)
    return loaded


def train(args: argparse.Namespace) -> TrainReport:
    """The run ``args`` describe, on this process (one of torchrun's ranks when started by it); every rank returns
    the same report."""
    if args.max_tokens < 1 or args.batch_rows < 1:
        raise TrainError("deltapack train: --max-tokens and --batch-rows must be positive")
    parallel = _setup_parallel(args)
    try:
        return _train(args, parallel)
    finally:
        if parallel is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(args: argparse.Namespace, parallel: Parallel | None) -> TrainReport:
    import deltapack
    from deltapack.data import PackedCollator, pack_documents

    if parallel is None:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        device = parallel.device
    is_main = parallel is None or parallel.is_main
    launcher = os.getppid() if parallel is not None else None
    # under FSDP only rank 0 reads the weights; the other ranks build the model on the meta device and receive their
    # shards from it (no rank but the first holds the whole model in memory)
    model, name = load_model(args, on_meta=parallel is not None and args.fsdp and not is_main)
    tokenizer = load_tokenizer(args)
    docs = load_documents(args, tokenizer)
    check_vocab(docs, model.config.get_text_config().vocab_size)
    docs, eval_docs = _eval_split(docs, args)
    packed = pack_documents(docs, args.max_tokens)
    eval_rows = list(pack_documents(eval_docs, args.max_tokens).rows) if eval_docs else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = PackedCollator(pad_token_id=pad_id)

    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"}
        )
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    deltapack.patch(model)
    if device.type == "cuda" and not args.fsdp and not args.bf16:
        model.to(device, dtype=torch.bfloat16)  # the FLA kernels run in bf16; the reference path stays fp32 on CPU
    if parallel is not None:
        _distribute(model, args, parallel)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    rows = list(packed.rows)
    steps_per_epoch = math.ceil(len(rows) / (args.batch_rows * args.gradient_accumulation_steps))
    steps = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * steps_per_epoch))
    scheduler = _scheduler(optimizer, args, steps)
    counters = {"tokens": 0, "packed_computed": 0, "skipped": 0, "stream_pad": 0}
    first = _resume(args, model, optimizer, scheduler)
    if first is not None:
        counters.update(first["state"]["counters"])
    start_step = 0 if first is None else first["step"]
    log = MetricsLog(args.output, start_step) if args.output and is_main else None
    first_loss = last_loss = eval_loss = float("nan")
    losses: list[float] = []
    bar = progress(steps, shown=is_main)
    bar.update(start_step)
    start = time.perf_counter()
    run_tokens = 0
    accumulate = args.gradient_accumulation_steps
    for step in range(start_step, steps):
        _check_launcher(launcher)
        picks = [batch_rows_at(step * accumulate + m, len(rows), args.batch_rows, args.seed) for m in range(accumulate)]
        lengths = [[len(rows[i]["input_ids"]) for i in picked] for picked in picks]
        batches = [collate([rows[i] for i in picked]) for picked in picks]
        lr = optimizer.param_groups[0]["lr"]
        on_device = [{k: v.to(device) for k, v in b.items()} for b in batches]
        loss = _accumulate(model, on_device, params, args, parallel, pad_id)
        grad_norm = float("nan")
        if loss is not None:
            grad_norm = _clip_grad_norm(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = loss
            losses.append(last_loss)
            first_loss = last_loss if math.isnan(first_loss) else first_loss
        else:
            counters["skipped"] += 1  # only prompt tokens (pieces of split documents): nothing to learn from
        scheduler.step()
        real = sum(map(sum, lengths))
        computed = sum(b["input_ids"].numel() for b in batches)
        counters["tokens"] += real
        run_tokens += real
        counters["packed_computed"] += computed
        if args.cp > 1:  # tokens of the extra document that makes each replica's stream split into equal parts
            counters["stream_pad"] += sum(_stream_padding(n, parallel, args.cp_layout) for n in lengths)
        elapsed = time.perf_counter() - start
        fill = real / computed
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{run_tokens / elapsed:,.0f}", fill=f"{fill:.1%}")
        if log is not None:
            loss_now = last_loss if grad_norm == grad_norm else None  # NaN grad norm: a skipped batch
            log.write(step + 1, loss_now, lr, grad_norm, run_tokens / elapsed, fill, device)
        if eval_rows and ((step + 1) % (args.eval_steps or steps) == 0 or step + 1 == steps):
            eval_loss = _evaluate(model, eval_rows, collate, device, args, parallel, pad_id)
            if log is not None:
                log.write_eval(step + 1, eval_loss)
        if args.save_every and (step + 1) % args.save_every == 0:
            _check_launcher(launcher)
            state = {"counters": counters, "run": _run_key(args)}
            save_checkpoint(args.output, step + 1, model, optimizer, scheduler, state, keep=args.save_total_limit)
    if log is not None:
        log.close()
    tokens, packed_computed = counters["tokens"], counters["packed_computed"]
    skipped, stream_pad = counters["skipped"], counters["stream_pad"]
    bar.close()
    wall = time.perf_counter() - start

    # the same documents one per row, as many per batch as our packed batches hold on average
    lengths = [len(d["input_ids"]) for d in docs if d["input_ids"]]
    docs_per_batch = max(1, round(args.batch_rows * len(lengths) / len(rows)))
    padded_per_real = padded_tokens(lengths, docs_per_batch) / sum(lengths)

    if args.output:
        _check_launcher(launcher)
        _save(model, tokenizer, args, parallel)
    return TrainReport(
        model=name,
        device=str(device),
        documents=packed.stats.documents,
        rows=packed.stats.rows,
        steps=steps,
        tokens=tokens,
        fill=packed.stats.fill,
        packed_tokens_computed=packed_computed,
        padded_tokens_computed=round(tokens * padded_per_real),
        first_loss=first_loss,
        last_loss=last_loss,
        wall_s=wall,
        skipped_steps=skipped,
        losses=losses,
        ranks=1 if parallel is None else parallel.world_size,
        context_parallel=args.cp,
        fsdp=args.fsdp,
        stream_pad_tokens=stream_pad,
        eval_loss=None if math.isnan(eval_loss) else eval_loss,
    )


def _check_launcher(launcher: int | None) -> None:
    """Stop a rank whose launcher (torchrun, ``deltapack train --nproc``) has ended: killed alone, it leaves its ranks
    running (they are in sessions of their own), and they would keep writing --output beside a resumed run."""
    if launcher is not None and os.getppid() != launcher:
        raise TrainError(
            f"deltapack train: the process that started this rank (pid {launcher}) has ended; stopping this rank "
            "(resume the run with --resume)"
        )


def _stream_padding(row_tokens: list[int], parallel: Parallel, layout: str) -> int:
    """Tokens added to the streams of all replicas so that each splits over the context-parallel ranks."""
    from deltapack.distributed import padded_total

    dp = parallel.data_parallel
    streams = [sum(row_tokens[d::dp]) for d in range(dp)]
    return sum(padded_total(n, parallel.context_parallel, layout) - n for n in streams)


def _eval_split(
    docs: list[dict[str, list[int]]], args: argparse.Namespace
) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """(training documents, held-out documents): --eval-split of them, drawn with --seed, kept out of training."""
    if not args.eval_split:
        return docs, []
    n_eval = max(1, round(args.eval_split * len(docs)))
    if n_eval >= len(docs):
        raise TrainError(
            f"deltapack train: --eval-split {args.eval_split} holds out all {len(docs)} documents; expected some left"
        )
    held = set(random.Random(f"eval:{args.seed}").sample(range(len(docs)), n_eval))
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def _accumulate(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    params: list[nn.Parameter],
    args: argparse.Namespace,
    parallel: Parallel | None,
    pad_id: int,
) -> float | None:
    """Forward and backward of one optimizer step's micro-batches (gradient accumulation), gradients summed over
    ranks. Returns the token-mean loss over all of them (the same on every rank); None when none has a target.

    Each micro-batch's token-mean loss is weighted by its share of the step's targets, so the accumulated gradient
    is the gradient of the token mean over the step's batches, as one batch of all their rows would give.
    """
    from deltapack.distributed import launch

    targets = [launch.count_targets(b["labels"]) for b in batches]
    total = sum(targets)
    if total == 0:
        return None
    loss_sum = 0.0
    for batch, share in zip(batches, targets):
        if share == 0:  # the same on every rank: every rank draws the same global batches
            continue
        with _autocast(args, batch["input_ids"].device):
            loss = _micro_loss(model, batch, args, parallel, pad_id)
        # FSDP averages over the data-parallel replicas; the loss shares are to be summed
        scale = share / total * (parallel.data_parallel if parallel is not None and args.fsdp else 1)
        (loss * scale).backward()
        loss_sum += _global(loss.detach(), parallel) * share / total
    if parallel is not None and not args.fsdp:
        launch.sum_gradients(params)
    return loss_sum


def _autocast(args: argparse.Namespace, device: torch.device) -> Any:
    """--bf16: bf16 autocast over fp32 weights; nothing otherwise."""
    import contextlib

    if not args.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _micro_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], args: argparse.Namespace, parallel: Parallel | None, pad_id: int
) -> torch.Tensor:
    """The token-mean loss of one batch: the model's own on one process; this rank's share of it on several."""
    if parallel is None:
        return model(**batch).loss
    from deltapack.distributed import launch

    try:
        local = launch.split_batch(batch, parallel, pad_id, layout=args.cp_layout)
    except ValueError as err:
        raise TrainError(f"deltapack train: {err}".replace("deltapack: ", "")) from err
    return launch.local_loss(model, local)


def _global(loss: torch.Tensor, parallel: Parallel | None) -> float:
    """The batch's loss from this rank's share of it (the sum over ranks)."""
    if parallel is None:
        return loss.item()
    from deltapack.distributed.collectives import all_reduce_sum

    return all_reduce_sum(loss, None, parallel.world_size).item()


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    eval_rows: list[dict[str, list[int]]],
    collate: Any,
    device: torch.device,
    args: argparse.Namespace,
    parallel: Parallel | None,
    pad_id: int,
) -> float:
    """The token-mean loss over the held-out rows (--eval-split), in batches of --batch-rows, without dropout."""
    from deltapack.boundaries import IGNORE_INDEX
    from deltapack.distributed import launch

    model.eval()
    weighted, total = 0.0, 0
    replicas = 1 if parallel is None else parallel.data_parallel
    try:
        for first in range(0, len(eval_rows), args.batch_rows):
            rows = eval_rows[first : first + args.batch_rows]
            # a last batch with fewer rows than replicas: the others run a copy of a row without targets (under FSDP
            # every rank must run the forward), so every held-out row counts, as on one process
            rows += [{**rows[0], "labels": [IGNORE_INDEX] * len(rows[0]["labels"])}] * (replicas - len(rows))
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            targets = launch.count_targets(batch["labels"])
            if targets == 0:
                continue
            with _autocast(args, device):
                weighted += _global(_micro_loss(model, batch, args, parallel, pad_id), parallel) * targets
            total += targets
    finally:
        model.train()
    return weighted / total if total else float("nan")


def _save(model: nn.Module, tokenizer: Any, args: argparse.Namespace, parallel: Parallel | None) -> None:
    """save_pretrained of the unpatched model (rank 0; FSDP's shards gathered first) and the tokenizer."""
    import deltapack

    out = Path(args.output).expanduser()
    if out.exists() and not out.is_dir():
        raise TrainError(f"deltapack train: --output {args.output!r} is a file; expected a directory")
    state = None
    if parallel is not None and args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if parallel is None or parallel.is_main:
        if args.cp > 1:
            from deltapack.distributed import disable_context_parallel

            disable_context_parallel(model)
        deltapack.unpatch(model)
        model.save_pretrained(out, **({"state_dict": state} if state is not None else {}))
        tokenizer.save_pretrained(out)
        print(f"saved to {out}", file=sys.stderr)
    if parallel is not None:
        import torch.distributed as dist

        dist.barrier()
