"""``deltapack train``: a short packed SFT run, end to end.

With no arguments it fine-tunes the embedded tiny Qwen3.5 (random init) on the embedded arithmetic dataset on the
CPU, in well under a minute: documents are packed with best-fit decreasing, batched by :class:`PackedCollator` and
run through the patched model. A progress bar shows loss, tokens/s and fill; the summary compares the tokens
computed with what padded batches of the same documents would have cost. Nothing is fetched from a network.

On several processes (``deltapack train --nproc N`` or ``torchrun --nproc-per-node N -m deltapack.train``), with
``--cp K`` (context parallelism) and ``--fsdp``: see :mod:`deltapack.distributed.launch`.

Parts: :mod:`~deltapack.train.inputs` (options, model, tokenizer, documents), :mod:`~deltapack.train.loop` (the
run), :mod:`~deltapack.train.report` (summary and progress).
"""

from __future__ import annotations

import argparse
import json
import sys

from deltapack.train.inputs import (
    WEIGHT_FILES,
    TrainError,
    add_options,
    check_arguments,
    check_parallel_options,
    load_documents,
    load_model,
    load_tokenizer,
)
from deltapack.train.loop import train
from deltapack.train.report import TrainReport, padded_tokens

__all__ = [
    "WEIGHT_FILES",
    "TrainError",
    "TrainReport",
    "add_arguments",
    "load_documents",
    "load_model",
    "load_tokenizer",
    "main",
    "padded_tokens",
    "run",
    "train",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``deltapack train``; sets ``run`` as the subcommand's entry."""
    add_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from deltapack.distributed import launch

    try:
        check_arguments(args)
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


def main(argv: list[str] | None = None) -> int:
    """``python -m deltapack.train`` (what torchrun starts on every rank): the options of ``deltapack train``."""
    parser = argparse.ArgumentParser(prog="deltapack.train", description="Packed SFT run (deltapack train).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


def _forwarded_argv(args: argparse.Namespace) -> list[str]:
    """The options of ``args`` that differ from the defaults, as a command line (without --nproc)."""
    from deltapack.distributed.launch import forwarded_argv

    parser = argparse.ArgumentParser(add_help=False)
    add_options(parser)
    return forwarded_argv(args, parser, skip=("nproc",))


def _start_torchrun(args: argparse.Namespace) -> int:
    """``deltapack train --nproc N``: the same run under torchrun, N processes on this machine (127.0.0.1)."""
    from deltapack.distributed.launch import run_torchrun

    check_parallel_options(args, args.nproc)
    return run_torchrun(args.nproc, _forwarded_argv(args))
