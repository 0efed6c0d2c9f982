"""``deltapack audit``: does packing keep documents apart? Packed vs alone, per layer, module and document.

With no arguments it audits the embedded tiny Qwen3.5 (random init, long-memory GDN decay) on the CPU: every input
format (restarting position_ids with and without use_cache, indexed masks, cu_seq_lens kwargs, padding), before
and after ``deltapack.patch``. Exit status: 0 exact, 1 leaks, 2 could not build or run (or write ``--plot``).
With ``--all`` (one line per architecture): 0 when every architecture is exact as deltapack leaves it (patched where
deltapack supports it, else unpatched), 1 when any leaks there, else 2 when any could not be built or run.

    deltapack audit                              # tiny qwen3_5
    deltapack audit --arch qwen3_next --json     # machine-readable
    deltapack audit --arch mamba2                # any causal LM of the installed transformers, shrunk
    deltapack audit --config path/to/config.json
"""

from __future__ import annotations

import argparse
import json
import sys

from deltapack.audit.core import ATOL, GRAD_RTOL, AuditReport, audit, audit_model
from deltapack.audit.formats import FORMATS

__all__ = ["AuditReport", "add_arguments", "audit", "audit_model", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``deltapack audit``; sets ``run`` as the subcommand's entry."""
    parser.add_argument("--arch", default=None, help="model_type to audit (default qwen3_5; any causal LM works)")
    parser.add_argument("--config", default=None, metavar="PATH", help="a local config.json (or its folder)")
    parser.add_argument("--shrink", action="store_true", help="shrink the --config model to a tiny one")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--layers", action="store_true", help="a row per layer instead of per layer type")
    parser.add_argument(
        "--format",
        action="append",
        dest="formats",
        metavar="NAME",
        help=f"only this input format (repeatable): {', '.join(f.name for f in FORMATS)}",
    )
    patched = parser.add_mutually_exclusive_group()
    patched.add_argument(
        "--patched",
        dest="patched",
        action="store_true",
        default=None,
        help="audit the patched model (default when supported)",
    )
    patched.add_argument("--unpatched", dest="patched", action="store_false", help="audit the unpatched model only")
    parser.add_argument("--no-grad", dest="gradient", action="store_false", help="skip the gradient check")
    parser.add_argument("--no-localise", dest="localise", action="store_false", help="skip the per-module localisation")
    parser.add_argument("--atol", type=float, default=ATOL, help=f"max |diff| counted as exact (default {ATOL:g})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--plot", metavar="FILE.png", default=None, help="heatmap layers x documents (needs matplotlib)"
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="every causal LM of the installed transformers (or the comma-separated --arch list), one line each",
    )
    parser.add_argument("--workers", type=int, default=2, help="with --all: processes (one thread each)")
    parser.add_argument("--timeout", type=float, default=120, help="with --all: seconds per architecture")
    parser.add_argument("--markdown", metavar="FILE.md", default=None, help="with --all: write the scoreboard there")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 for tiny models)")
    parser.set_defaults(run=run, grad_rtol=GRAD_RTOL)


def run(args: argparse.Namespace) -> int:
    """Run ``deltapack audit`` for parsed ``args``; returns the exit status (0 exact, 1 leaks, 2 could not run)."""
    from deltapack.audit import report as render
    from deltapack.audit.compare import short_reason

    # tiny models run fastest on one thread (and suffer badly from oversubscription on a busy machine)
    threads = args.threads or (None if args.config and not args.shrink else 1)
    if args.plot:  # checked before the audit runs, so a bad path costs nothing
        problem = plot_target_problem(args.plot)
        if problem:
            print(f"deltapack audit: --plot {args.plot!r}: {problem}", file=sys.stderr)
            return 2
    if args.all:
        from deltapack.audit.scoreboard import run_all

        return run_all(args)
    arch = args.arch or (None if args.config else "qwen3_5")
    try:
        result = audit(
            arch,
            args.config,
            patched=args.patched,
            formats=args.formats,
            shrink=args.shrink or None,
            gradient=args.gradient,
            localise=args.localise,
            seed=args.seed,
            atol=args.atol,
            threads=threads,
        )
    except Exception as exc:  # could not build (or run at all): exit 2 with the reason
        reason = short_reason(exc, 300)
        if args.json:
            print(json.dumps({"arch": arch, "verdict": "fails", "exit_code": 2, "error": reason}, indent=1))
        else:
            print(f"deltapack audit: could not build or run {arch or args.config}: {reason}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(render.to_json(result), indent=1))
    else:
        print(render.to_text(result, per_layer=args.layers))
    if args.plot:
        try:
            drawn = render.plot(result, args.plot)
        except (ImportError, OSError, ValueError) as exc:
            print(f"deltapack audit: --plot {args.plot!r}: {short_reason(exc, 300)}", file=sys.stderr)
            return 2
        print(f"heatmap of {drawn} written to {args.plot}", file=sys.stderr)
    return result.exit_code()


def plot_target_problem(path: str) -> str | None:
    """Why ``--plot path`` cannot be written (matplotlib missing, a file type it does not write, a folder that does
    not exist or is not writable), or None."""
    import importlib.util
    import os

    if importlib.util.find_spec("matplotlib") is None:
        return "needs matplotlib (pip install matplotlib); the table and --json work without it"
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if os.path.isdir(path):
        return "is a folder; expected a file name"
    kinds = FigureCanvasAgg.get_supported_filetypes()
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    if suffix not in kinds:
        return f"unknown image type {suffix or '(none)'!r}; expected a file name ending in one of .{', .'.join(kinds)}"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"the folder {folder!r} does not exist"
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        return f"cannot be written ({exc.strerror})"
    if not existed:
        os.remove(path)
    return None
