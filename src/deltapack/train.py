"""``deltapack train``: a short packed SFT run, end to end.

With no arguments it fine-tunes the embedded tiny Qwen3.5 (random init) on the embedded arithmetic dataset on the
CPU, in well under a minute: documents are packed with best-fit decreasing, batched by :class:`PackedCollator` and
run through the patched model. A progress bar shows loss, tokens/s and fill; the summary compares the tokens
computed with what padded batches of the same documents would have cost. Nothing is fetched from a network.

On several processes (``deltapack train --nproc N`` or ``torchrun --nproc-per-node N -m deltapack.train``), with
``--cp K`` (context parallelism) and ``--fsdp``: see :mod:`deltapack.distributed.launch`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from deltapack.distributed.launch import Parallel

__all__ = ["add_arguments", "main", "run", "train", "TrainReport"]

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class TrainError(ValueError):
    """A problem with the command's inputs (a missing path, a bad data line); printed without a traceback."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``deltapack train``; sets ``run`` as the subcommand's entry."""
    parser.add_argument("--model", metavar="PATH", help="a local HF model directory (weights) or config directory")
    parser.add_argument("--arch", default="qwen3_5", help="embedded tiny model when no --model (default qwen3_5)")
    parser.add_argument(
        "--data", metavar="FILE", help="a .jsonl file: 'text', or 'prompt'/'completion', or 'input_ids'"
    )
    parser.add_argument(
        "--tokenizer", metavar="PATH", help="a local tokenizer directory (default: --model's, else chars)"
    )
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens per packed row (default 1024)")
    parser.add_argument("--batch-rows", type=int, default=4, help="packed rows per step (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is not given")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--output", metavar="DIR", help="save the trained model (save_pretrained) and tokenizer here")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (PEFT) instead of all weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    scale = parser.add_argument_group("several processes (torchrun; NCCL on CUDA, gloo on CPU)")
    scale.add_argument("--nproc", type=int, default=1, help="processes on this machine: starts torchrun (default 1)")
    scale.add_argument(
        "--cp", type=int, default=1, metavar="K", help="context parallelism: K ranks split each packed stream"
    )
    scale.add_argument("--cp-layout", choices=("zigzag", "contiguous"), default="zigzag", help="(default zigzag)")
    scale.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP2)")
    parser.set_defaults(run=run)


@dataclass
class TrainReport:
    """What a run did: counts, losses, time, and padding compared with one-document-per-row batches."""

    model: str
    device: str
    documents: int
    rows: int
    steps: int
    tokens: int
    fill: float
    packed_tokens_computed: int
    padded_tokens_computed: int
    first_loss: float
    last_loss: float
    wall_s: float
    skipped_steps: int = 0
    losses: list[float] = field(default_factory=list)
    ranks: int = 1
    context_parallel: int = 1
    fsdp: bool = False
    stream_pad_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "tokens_per_s": self.tokens_per_s}

    def _layout(self) -> str:
        if self.ranks == 1:
            return ""
        parts = [f"{self.ranks} ranks", f"{self.ranks // self.context_parallel} data-parallel"]
        parts += [f"context parallel {self.context_parallel}"] if self.context_parallel > 1 else []
        return " (" + ", ".join(parts + (["FSDP2"] if self.fsdp else [])) + ")"

    def __str__(self) -> str:
        packed_pad = 1 - self.tokens / self.packed_tokens_computed if self.packed_tokens_computed else 0.0
        padded_pad = 1 - self.tokens / self.padded_tokens_computed if self.padded_tokens_computed else 0.0
        saved = self.padded_tokens_computed / self.packed_tokens_computed if self.packed_tokens_computed else 0.0
        return "\n".join(
            [
                f"model            {self.model} on {self.device}" + self._layout(),
                f"data             {self.documents} documents packed into {self.rows} rows (fill {self.fill:.1%})",
                f"trained          {self.steps} steps, {self.tokens} tokens in {self.wall_s:.1f} s "
                f"({self.tokens_per_s:,.0f} tokens/s)",
                f"loss             {self.first_loss:.4f} -> {self.last_loss:.4f}"
                + (f" ({self.skipped_steps} batches without trained tokens skipped)" if self.skipped_steps else ""),
                f"padding          {packed_pad:.1%} of computed tokens packed vs {padded_pad:.1%} in padded batches "
                f"of the same documents ({saved:.2f}x the tokens computed without packing)",
            ]
        )


# ------------------------------------------------------------------------------------------------ inputs
def _existing(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise TrainError(
            f"deltapack train: {what} {path!r} does not exist; expected a local path (nothing is downloaded)"
        )
    return p


def load_model(args: argparse.Namespace, on_meta: bool = False) -> tuple[nn.Module, str]:
    """The model to train (fp32) and a name for it: --model PATH (weights or config), else the embedded tiny one.

    ``on_meta``: the same architecture with its parameters on the meta device (no memory, no weights read), for the
    ranks that receive their shards from rank 0 under FSDP.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if on_meta:
        with torch.device("meta"):
            if args.model is None:
                return load_model(args)
            path = _existing(args.model, "--model")
            path = path.parent if path.is_file() else path
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            return AutoModelForCausalLM.from_config(config).float(), path.name
    if args.model is None:
        from deltapack.tiny import tiny_model

        return tiny_model(args.arch, seed=args.seed), f"tiny {args.arch} (embedded, random init)"

    path = _existing(args.model, "--model")
    if path.is_file():
        if path.name != "config.json":
            raise TrainError(f"deltapack train: --model {args.model!r} is a file; expected a directory or config.json")
        path = path.parent
    if not (path / "config.json").exists():
        raise TrainError(f"deltapack train: --model {args.model!r} has no config.json; expected a HF model directory")
    if any((path / name).exists() for name in WEIGHT_FILES):
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        return model, f"{path.name} (weights)"
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config).float()
    return model, f"{path.name} (config only, random init)"


def load_tokenizer(args: argparse.Namespace) -> Any:
    from deltapack.data.demo import char_tokenizer

    source = args.tokenizer
    if source is None and args.model is not None:
        model_dir = Path(args.model).expanduser()
        model_dir = model_dir.parent if model_dir.is_file() else model_dir
        if any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            source = str(model_dir)
    if source is None:
        return char_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_existing(source, "--tokenizer"), local_files_only=True)


def load_documents(args: argparse.Namespace, tokenizer: Any) -> list[dict[str, list[int]]]:
    """Token ids (and labels) per document from --data, else the embedded dataset."""
    from deltapack.data.demo import demo_examples, tokenize_examples

    if args.data is None:
        return tokenize_examples(demo_examples(seed=args.seed), tokenizer)
    path = _existing(args.data, "--data")
    docs = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TrainError(f"deltapack train: {path.name} line {number} is not JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise TrainError(f"deltapack train: {path.name} line {number} is not a JSON object")
            if "input_ids" in record:
                ids = record["input_ids"]
                labels = record.get("labels", ids)
                if len(labels) != len(ids):
                    raise TrainError(
                        f"deltapack train: {path.name} line {number} has {len(ids)} input_ids and {len(labels)} "
                        "labels; expected one label per token"
                    )
                docs.append({"input_ids": list(ids), "labels": list(labels)})
            else:
                try:
                    docs.extend(tokenize_examples([record], tokenizer))
                except ValueError as err:
                    raise TrainError(f"deltapack train: {path.name} line {number}: {err}") from err
    if not docs:
        raise TrainError(f"deltapack train: {path.name} holds no documents")
    return docs


def _check_vocab(docs: list[dict[str, list[int]]], vocab_size: int) -> None:
    top = max((max(d["input_ids"]) for d in docs if d["input_ids"]), default=0)
    if top >= vocab_size:
        raise TrainError(
            f"deltapack train: token id {top} is outside the model's vocabulary of {vocab_size}; "
            "expected a tokenizer that matches the model"
        )


# ------------------------------------------------------------------------------------------------ the run
def padded_tokens(lengths: list[int], rows_per_batch: int) -> int:
    """Tokens computed when the documents (``lengths``, in data order) go one per row, ``rows_per_batch`` rows per
    batch, each batch padded to its longest document (what a padding collator does)."""
    return sum(
        len(lengths[i : i + rows_per_batch]) * max(lengths[i : i + rows_per_batch])
        for i in range(0, len(lengths), rows_per_batch)
    )


def run(args: argparse.Namespace) -> int:
    from deltapack.distributed import launch

    try:
        _check_arguments(args)
        if args.nproc > 1 and not launch.is_launched():
            return _start_torchrun(args)
        report = train(args)
    except TrainError as err:
        if launch.rank_in_env() == 0:  # every rank reads the same inputs, so every rank fails alike
            print(err, file=sys.stderr)
        return 2
    if launch.rank_in_env() == 0:
        print(json.dumps(report.as_dict(), indent=2) if args.json else report)
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    """TrainError, naming the option, for values no run can use (before anything is built)."""
    for flag, value in (("--steps", args.steps), ("--max-tokens", args.max_tokens), ("--batch-rows", args.batch_rows)):
        if value is not None and value < 1:
            raise TrainError(f"deltapack train: {flag} {value}; expected at least 1")
    if args.steps is None and not args.epochs > 0:
        raise TrainError(f"deltapack train: --epochs {args.epochs}; expected a positive number of passes")
    if args.model is None:
        from deltapack.tiny import available

        if args.arch not in available():
            raise TrainError(
                f"deltapack train: --arch {args.arch!r} has no embedded tiny model; expected one of "
                f"{', '.join(available())}, or --model DIR for a local model"
            )


def main(argv: list[str] | None = None) -> int:
    """``python -m deltapack.train`` (what torchrun starts on every rank): the options of ``deltapack train``."""
    parser = argparse.ArgumentParser(prog="deltapack.train", description="Packed SFT run (deltapack train).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


def _check_parallel_options(args: argparse.Namespace, world_size: int) -> None:
    from deltapack.distributed.launch import check_parallel_sizes

    if args.nproc < 1:
        raise TrainError(f"deltapack train: --nproc {args.nproc}; expected at least 1")
    try:
        check_parallel_sizes(world_size, args.cp)
    except ValueError as err:
        raise TrainError(f"deltapack train: {err}".replace("deltapack: ", "")) from err
    if args.batch_rows < world_size // args.cp:
        raise TrainError(
            f"deltapack train: --batch-rows {args.batch_rows} for {world_size // args.cp} data-parallel replicas "
            f"({world_size} processes / --cp {args.cp}); expected at least one row per replica"
        )


def _forwarded_argv(args: argparse.Namespace) -> list[str]:
    """The options of ``args`` that differ from the defaults, as a command line (without --nproc)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "nproc":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        argv += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, str(value)]
    return argv


def _start_torchrun(args: argparse.Namespace) -> int:
    """``deltapack train --nproc N``: the same run under torchrun, N processes on this machine (127.0.0.1)."""
    from deltapack.distributed.launch import run_torchrun

    _check_parallel_options(args, args.nproc)
    return run_torchrun(args.nproc, _forwarded_argv(args))


def _setup_parallel(args: argparse.Namespace) -> Parallel | None:
    """The process group and this rank's place when torchrun started us; None for a single process."""
    from deltapack.distributed import launch

    if not launch.is_launched():
        if args.cp > 1 or args.fsdp:
            raise TrainError(
                "deltapack train: --cp and --fsdp need several processes; expected `deltapack train --nproc N ...` "
                "or `torchrun --nproc-per-node N -m deltapack.train ...`"
            )
        _check_parallel_options(args, 1)
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    if args.nproc > 1 and args.nproc != world_size:
        raise TrainError(f"deltapack train: --nproc {args.nproc} under torchrun with {world_size} processes")
    _check_parallel_options(args, world_size)
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


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> None:
    """``clip_grad_norm_`` that also takes FSDP's sharded gradients (the norm of the whole gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)


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
    # under FSDP only rank 0 reads the weights; the other ranks build the model on the meta device and receive their
    # shards from it (no rank but the first holds the whole model in memory)
    model, name = load_model(args, on_meta=parallel is not None and args.fsdp and not is_main)
    tokenizer = load_tokenizer(args)
    docs = load_documents(args, tokenizer)
    _check_vocab(docs, model.config.get_text_config().vocab_size)
    packed = pack_documents(docs, args.max_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = PackedCollator(pad_token_id=pad_id)

    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"}
        )
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    deltapack.patch(model)
    if device.type == "cuda" and not args.fsdp:
        model.to(device, dtype=torch.bfloat16)  # the FLA kernels run in bf16; the reference path stays fp32 on CPU
    if parallel is not None:
        _distribute(model, args, parallel)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    rows = list(packed.rows)
    steps_per_epoch = math.ceil(len(rows) / args.batch_rows)
    steps = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * steps_per_epoch))
    rng = random.Random(args.seed)
    order: list[int] = []
    tokens = packed_computed = skipped = stream_pad = 0
    first_loss = last_loss = float("nan")
    losses: list[float] = []
    bar = _progress(steps) if is_main else _NoProgress()
    start = time.perf_counter()
    for _ in range(steps):
        if len(order) < args.batch_rows:
            epoch = list(range(len(rows)))
            rng.shuffle(epoch)
            order += epoch
        picked, order = order[: args.batch_rows], order[args.batch_rows :]
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in picked]).items()}
        if bool((batch["labels"][:, 1:] != -100).any()):
            if parallel is None:
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            else:
                loss = _parallel_backward(model, batch, params, args, parallel, pad_id)
                _clip_grad_norm(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = loss.item()
            losses.append(last_loss)
            first_loss = last_loss if math.isnan(first_loss) else first_loss
        else:
            skipped += 1  # only prompt tokens (pieces of split documents): nothing to learn from
        real = sum(len(rows[i]["input_ids"]) for i in picked)
        tokens += real
        packed_computed += batch["input_ids"].numel()
        if args.cp > 1:  # tokens of the extra document that makes each replica's stream split into equal parts
            stream_pad += _stream_padding([len(rows[i]["input_ids"]) for i in picked], parallel, args.cp_layout)
        elapsed = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(
            loss=f"{last_loss:.3f}", tok_s=f"{tokens / elapsed:,.0f}", fill=f"{real / batch['input_ids'].numel():.1%}"
        )
    bar.close()
    wall = time.perf_counter() - start

    # the same documents one per row, as many per batch as our packed batches hold on average
    lengths = [len(d["input_ids"]) for d in docs if d["input_ids"]]
    docs_per_batch = max(1, round(args.batch_rows * len(lengths) / len(rows)))
    padded_per_real = padded_tokens(lengths, docs_per_batch) / sum(lengths)

    if args.output:
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
    )


def _stream_padding(row_tokens: list[int], parallel: Parallel, layout: str) -> int:
    """Tokens added to the streams of all replicas so that each splits over the context-parallel ranks."""
    from deltapack.distributed import padded_total

    dp = parallel.data_parallel
    streams = [sum(row_tokens[d::dp]) for d in range(dp)]
    return sum(padded_total(n, parallel.context_parallel, layout) - n for n in streams)


def _parallel_backward(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    params: list[nn.Parameter],
    args: argparse.Namespace,
    parallel: Parallel,
    pad_id: int,
) -> torch.Tensor:
    """This rank's part of the global batch, forward and backward; gradients summed over ranks. Returns the global
    token-mean loss (the same on every rank)."""
    from deltapack.distributed import launch
    from deltapack.distributed.collectives import all_reduce_sum

    try:
        local = launch.split_batch(batch, parallel, pad_id, layout=args.cp_layout)
    except ValueError as err:
        raise TrainError(f"deltapack train: {err}".replace("deltapack: ", "")) from err
    loss = launch.local_loss(model, local)
    if args.fsdp:  # FSDP averages over the data-parallel replicas; the loss shares are to be summed
        (loss * parallel.data_parallel).backward()
    else:
        loss.backward()
        launch.sum_gradients(params)
    return all_reduce_sum(loss, None, parallel.world_size)


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


def _progress(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the train extra
        return _PlainProgress(total)
    return tqdm(total=total, desc="deltapack train", unit="step", dynamic_ncols=True, file=sys.stderr)


class _NoProgress:
    """The progress bar of ranks other than 0."""

    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _PlainProgress:
    def __init__(self, total: int):
        self.total, self.n, self.postfix = total, 0, {}

    def update(self, n: int) -> None:
        self.n += n
        print(f"step {self.n}/{self.total} " + " ".join(f"{k}={v}" for k, v in self.postfix.items()), file=sys.stderr)

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = kw

    def close(self) -> None:
        pass


if __name__ == "__main__":
    from deltapack.train import main as _main  # the package's module, not this file run a second time as __main__

    sys.exit(_main())
