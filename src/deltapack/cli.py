"""Command line: ``deltapack audit`` (and more subcommands as they come)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltapack", description="Exact sequence packing for GDN hybrids.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    from deltapack import audit

    audit.add_arguments(sub.add_parser("audit", help="packed vs alone, per layer and document, before/after patching"))
    from deltapack import train

    train.add_arguments(sub.add_parser("train", help="packed SFT run (default: embedded tiny model and data, CPU)"))
    return parser


def version_line() -> str:
    """``deltapack X (transformers Y, torch Z)``: the versions every result of the command depends on."""
    import torch
    import transformers

    from deltapack import __version__

    return f"deltapack {__version__} (transformers {transformers.__version__}, torch {torch.__version__})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
