"""The inputs of ``deltapack train``: its options and their checks, the model, the tokenizer and the documents."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltapack.data.packer import check_labels

__all__ = [
    "TrainError",
    "add_options",
    "check_arguments",
    "check_parallel_options",
    "check_vocab",
    "load_documents",
    "load_model",
    "load_tokenizer",
]

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class TrainError(ValueError):
    """A problem with the command's inputs (a missing path, a bad data line); printed without a traceback."""


def add_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``deltapack train``."""
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
    parser.add_argument(
        "--lr-scheduler-type",
        default="constant",
        choices=SCHEDULERS,
        help="learning-rate schedule after the warmup (transformers' get_scheduler; default constant)",
    )
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warmup over this many steps")
    parser.add_argument("--warmup-ratio", type=float, default=0.0, help="warmup as a fraction of the steps")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: no clipping)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--gradient-accumulation-steps", type=int, default=1, metavar="G", help="batches per optimizer step"
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast over fp32 weights")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")
    parser.add_argument(
        "--eval-split", type=float, default=0.0, metavar="R", help="hold out this fraction of the documents"
    )
    parser.add_argument(
        "--eval-steps", type=int, default=None, metavar="N", help="eval loss every N steps (default: at the end)"
    )
    ckpt = parser.add_argument_group("checkpoints and logs (in --output)")
    ckpt.add_argument("--save-every", type=int, default=None, metavar="N", help="a checkpoint every N steps")
    ckpt.add_argument(
        "--save-total-limit", type=int, default=None, metavar="K", help="keep the newest K checkpoints (default all)"
    )
    ckpt.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="DIR",
        help="continue from the newest complete checkpoint in --output, or from checkpoint DIR",
    )
    scale = parser.add_argument_group("several processes (torchrun; NCCL on CUDA, gloo on CPU)")
    scale.add_argument("--nproc", type=int, default=1, help="processes on this machine: starts torchrun (default 1)")
    scale.add_argument(
        "--cp", type=int, default=1, metavar="K", help="context parallelism: K ranks split each packed stream"
    )
    scale.add_argument("--cp-layout", choices=("zigzag", "contiguous"), default="zigzag", help="(default zigzag)")
    scale.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP2)")


def check_arguments(args: argparse.Namespace) -> None:
    """TrainError, naming the option, for values no run can use (before anything is built)."""
    for flag, value in (("--steps", args.steps), ("--max-tokens", args.max_tokens), ("--batch-rows", args.batch_rows)):
        if value is not None and value < 1:
            raise TrainError(f"deltapack train: {flag} {value}; expected at least 1")
    optional = [("--save-every", args.save_every), ("--save-total-limit", args.save_total_limit)]
    optional += [("--gradient-accumulation-steps", args.gradient_accumulation_steps), ("--eval-steps", args.eval_steps)]
    for flag, value in optional:
        if value is not None and value < 1:
            raise TrainError(f"deltapack train: {flag} {value}; expected at least 1")
    if (args.save_every is not None or args.resume == "latest") and not args.output:
        raise TrainError(
            "deltapack train: --save-every and --resume without DIR keep checkpoints in --output; expected --output DIR"
        )
    if args.warmup_steps < 0 or not 0 <= args.warmup_ratio < 1:
        raise TrainError(
            f"deltapack train: --warmup-steps {args.warmup_steps} --warmup-ratio {args.warmup_ratio}; expected "
            "steps >= 0 and a ratio in [0, 1)"
        )
    if not 0 <= args.eval_split < 1:
        raise TrainError(f"deltapack train: --eval-split {args.eval_split}; expected a fraction in [0, 1)")
    if args.steps is None and not args.epochs > 0:
        raise TrainError(f"deltapack train: --epochs {args.epochs}; expected a positive number of passes")
    if args.model is None:
        from deltapack.tiny import available

        if args.arch not in available():
            raise TrainError(
                f"deltapack train: --arch {args.arch!r} has no embedded tiny model; expected one of "
                f"{', '.join(available())}, or --model DIR for a local model"
            )


def check_parallel_options(args: argparse.Namespace, world_size: int) -> None:
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
                try:
                    check_labels(len(ids), len(labels), f"line {number}")
                except ValueError as err:
                    raise TrainError(f"deltapack train: {path.name}: {err}".replace("deltapack: ", "")) from err
                docs.append({"input_ids": list(ids), "labels": list(labels)})
            else:
                try:
                    docs.extend(tokenize_examples([record], tokenizer))
                except ValueError as err:
                    raise TrainError(f"deltapack train: {path.name} line {number}: {err}") from err
    if not docs:
        raise TrainError(f"deltapack train: {path.name} holds no documents")
    return docs


def check_vocab(docs: list[dict[str, list[int]]], vocab_size: int) -> None:
    top = max((max(d["input_ids"]) for d in docs if d["input_ids"]), default=0)
    if top >= vocab_size:
        raise TrainError(
            f"deltapack train: token id {top} is outside the model's vocabulary of {vocab_size}; "
            "expected a tokenizer that matches the model"
        )
