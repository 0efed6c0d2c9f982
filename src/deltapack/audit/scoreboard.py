"""``deltapack audit --all``: every causal LM of the installed transformers, one line each, and the scoreboard.

Each architecture is built tiny (see :mod:`deltapack.audit.shrink`) and audited on every input format, forward and
gradient, unpatched and (where deltapack supports it) patched. Work is spread over ``--workers`` processes (one
torch thread each); an architecture that runs past ``--timeout`` seconds is reported as such.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from deltapack.audit.build import FLOAT64_TYPES
from deltapack.audit.formats import FORMATS

__all__ = ["audit_one", "exit_status", "run_all", "summary_line", "to_markdown"]

SCOREBOARD_COMMAND = "deltapack audit --all --markdown docs/scoreboard.md"


def audit_one(arch: str, timeout_note: str | None = None) -> dict[str, Any]:
    """The one-line summary of ``arch`` as a dict (JSON-able); never raises."""
    import torch

    from deltapack.audit.compare import short_reason
    from deltapack.audit.core import audit
    from deltapack.audit.report import leak_sources

    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        report = audit(arch, threads=None)
    except Exception as exc:
        return {"arch": arch, "verdict": "cannot build", "reason": short_reason(exc, 160), "seconds": _since(start)}
    line: dict[str, Any] = {"arch": arch, "model_class": report.model_class, "notes": report.notes}
    for name, state in report.states.items():
        verdict = state.verdict(report.atol, report.grad_rtol)
        entry: dict[str, Any] = {"verdict": verdict}
        if state.error:
            entry["reason"] = state.error
        leaks = [f for f in state.formats if state.leaking(f, report.atol, report.grad_rtol)]
        if leaks:
            entry["leaks_on"] = leaks
            entry["worst"] = max(state.formats[f].worst() for f in leaks)
            modules: dict[str, str] = {}
            for f in leaks:
                for s in leak_sources(state.formats[f], report):
                    modules.setdefault(s["module"], s["kind"])
            entry["where"] = modules
        raises = {f: r.raised for f, r in state.formats.items() if r.raised is not None}
        if raises:
            entry["raises_on"] = raises
        entry["formats"] = {
            f: "raises"
            if r.raised is not None
            else (r.worst() if state.leaking(f, report.atol, report.grad_rtol) else "exact")
            for f, r in state.formats.items()
        }
        line[name] = entry
    line["patch"] = "supported" if report.patch_supported else "not supported"
    if report.patch_error and "cannot pack" in report.patch_error:
        line["patch"] = "refused"
        from deltapack.models.families.attention import REFUSED

        line["refused_because"] = REFUSED.get(arch) or report.patch_error.split("): ", 1)[-1]
    line["verdict"] = report.verdict("unpatched") if "unpatched" in report.states else "fails"
    line["seconds"] = _since(start)
    return line


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 1)


def summary_line(s: dict[str, Any]) -> str:
    """One line: ``arch: unpatched ... | patched ...``."""
    if s["verdict"] in ("cannot build", "timeout"):
        return f"{s['arch']}: {s['verdict']} ({s.get('reason', '')})"
    return f"{s['arch']}: {_state_text(s.get('unpatched', {}))} | deltapack patch: {_patch_text(s)}"


def _state_text(entry: dict[str, Any]) -> str:
    verdict = entry.get("verdict", "?")
    parts = [verdict]
    if entry.get("leaks_on"):
        where = ", ".join(f"{m} ({k})" for m, k in entry.get("where", {}).items()) or "outside the decoder layers"
        parts.append(f"{entry['worst']:.2g} on {', '.join(entry['leaks_on'])}; leaks by itself: {where}")
    if entry.get("raises_on"):
        parts.append(f"raises on {', '.join(entry['raises_on'])}")
    if entry.get("reason"):
        parts.append(entry["reason"])
    return "; ".join(parts)


def _patch_text(s: dict[str, Any]) -> str:
    """The "after patching" verdict: exact, NOT exact (with where), refused (with why) or not supported yet."""
    if s.get("patch") == "refused":
        return f"refused: {s.get('refused_because', '')}"
    if s.get("patch") != "supported":
        return "not supported yet"
    patched = s.get("patched", {})
    return "fixes it (exact)" if patched.get("verdict") == "exact" else f"NOT exact: {_state_text(patched)}"


def to_markdown(summaries: list[dict[str, Any]], seconds: float, versions: str) -> str:
    """The scoreboard page: the command that regenerates it, then one table row per architecture."""
    counts: dict[str, int] = {}
    for s in summaries:
        counts[s["verdict"]] = counts.get(s["verdict"], 0) + 1
    lines = [
        "# Scoreboard: which architectures keep packed documents apart",
        "",
        f"Regenerate with `{SCOREBOARD_COMMAND}` (CPU, about {seconds / 60:.0f} minutes on 2 cores).",
        "",
        f"{versions}. Every causal-LM `model_type` registered in transformers, built tiny (random init, fp32 "
        "(float64 for the types whose fp32 rounding alone exceeds the bound: "
        + ", ".join(f"`{t}`" for t in sorted(FLOAT64_TYPES))
        + "), CPU; long-memory decay where random init forgets fast), three documents packed per row in each input "
        "format, compared with each document run alone: exact = max |diff| <= 1e-5 for every decoder layer's "
        "output and the logits, and gradient relative diff <= 1e-4. *Leaks by itself* names the modules that "
        "still differ when fed the clean per-document inputs.",
        "",
        "Totals over all formats: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + ". "
        + _format_totals(summaries, "position_ids", "With restarting position_ids and use_cache=False alone")
        + " After deltapack.patch: "
        + _patched_totals(summaries)
        + ".",
        "",
        "Columns per input format: `ok` exact, a number = the worst max |diff| (a leak), `raises` = the model "
        "refuses the input. Formats: " + "; ".join(f"`{f.name}` {f.title}" for f in FORMATS) + ".",
        "",
        "| model_type | "
        + " | ".join(_SHORT[f.name] for f in FORMATS)
        + " | leaks by itself | after deltapack.patch |",
        "|---|" + "---|" * len(FORMATS) + "---|---|",
    ]
    for s in sorted(summaries, key=lambda s: s["arch"]):
        if s["verdict"] in ("cannot build", "timeout"):
            blank = " |" * len(FORMATS)
            lines.append(f"| {s['arch']} |{blank} {s['verdict']}: {_md(s.get('reason', ''))} | |")
            continue
        entry = s.get("unpatched", {})
        cells = [_cell(entry.get("formats", {}).get(f.name)) for f in FORMATS]
        where = ", ".join(f"{m} ({k})" for m, k in entry.get("where", {}).items())
        if entry.get("reason"):
            where = f"could not run: {entry['reason']}"
        lines.append(f"| {s['arch']} | " + " | ".join(cells) + f" | {_md(where)} | {_md(_patch_text(s))} |")
    return "\n".join(lines) + "\n"


_SHORT = {
    "position_ids": "pos",
    "position_ids_cache": "pos+cache",
    "indexed_mask": "indexed",
    "cu_seq_lens": "cu_seq_lens",
    "cu_seq_lens_seq_idx": "cu+seq_idx",
    "padding_left": "pad left",
    "padding_right": "pad right",
    "indexed_mask_padded": "indexed+pad",
}


def _format_totals(summaries: list[dict[str, Any]], fmt: str, title: str) -> str:
    counts = {"exact": 0, "leaks": 0, "raises": 0}
    for s in summaries:
        value = s.get("unpatched", {}).get("formats", {}).get(fmt)
        if value is not None:
            counts["exact" if value == "exact" else "raises" if value == "raises" else "leaks"] += 1
    return f"{title}: {counts['exact']} exact, {counts['leaks']} leak, {counts['raises']} raise."


def _patched_totals(summaries: list[dict[str, Any]]) -> str:
    supported = [s for s in summaries if s.get("patch") == "supported"]
    exact = [s["arch"] for s in supported if s.get("patched", {}).get("verdict") == "exact"]
    others = [s["arch"] for s in supported if s["arch"] not in exact]
    refused = sum(s.get("patch") == "refused" for s in summaries)
    text = f"{len(exact)} model types exact after patching (every format, forward and gradient)"
    text += f"; NOT exact after patching: {', '.join(others)}" if others else ", all that deltapack supports"
    return text + f"; {refused} refused with the reason"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if value == "exact":
        return "ok"
    if value == "raises":
        return "raises"
    return f"{value:.2g}"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _worker(conn: Connection) -> None:
    import torch

    torch.set_num_threads(1)
    while True:
        arch = conn.recv()
        if arch is None:
            return
        conn.send(audit_one(arch))


def run_all(args: argparse.Namespace) -> int:
    """Audit every registered causal LM; print a line each (sorted), optionally write the markdown scoreboard.

    Exit status: see :func:`exit_status`.
    """
    import json

    import torch
    import transformers

    from deltapack.audit.build import causal_lm_types

    archs = causal_lm_types() if not args.arch else [a.strip() for a in args.arch.split(",")]
    workers = max(1, getattr(args, "workers", 2) or 2)
    timeout = float(getattr(args, "timeout", 120) or 120)
    ctx = mp.get_context("spawn")
    pending = list(archs)
    running: dict[Connection, tuple[Any, str, float]] = {}
    done: list[dict[str, Any]] = []
    start = time.perf_counter()

    def launch() -> tuple[Any, Connection]:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        proc.start()
        return proc, parent

    idle = [launch() for _ in range(min(workers, len(pending)))]
    while pending or running:
        while idle and pending:
            proc, conn = idle.pop()
            arch = pending.pop(0)
            conn.send(arch)
            running[conn] = (proc, arch, time.perf_counter())
        ready = wait(list(running), timeout=1.0)
        for conn in ready:
            proc, arch, _ = running.pop(conn)  # type: ignore[index]
            try:
                summary = conn.recv()  # type: ignore[union-attr]
            except EOFError:
                summary = {"arch": arch, "verdict": "cannot build", "reason": f"the worker died (exit {proc.exitcode})"}
                proc, conn = launch()
            done.append(summary)
            print(summary_line(summary), file=sys.stderr, flush=True)
            idle.append((proc, conn))  # type: ignore[arg-type]
        now = time.perf_counter()
        for conn, (proc, arch, began) in list(running.items()):
            if now - began > timeout:
                proc.kill()
                running.pop(conn)
                done.append({"arch": arch, "verdict": "timeout", "reason": f"over {timeout:.0f} s"})
                print(f"{arch}: timeout", file=sys.stderr, flush=True)
                idle.append(launch())
    for proc, conn in idle:
        conn.send(None)
        proc.join(timeout=5)
    seconds = time.perf_counter() - start
    done.sort(key=lambda s: s["arch"])
    if args.json:
        print(json.dumps(done, indent=1))
    else:
        for s in done:
            print(summary_line(s))
        print(f"{len(done)} architectures in {seconds:.0f} s")
    if args.markdown:
        versions = f"transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}"
        with open(args.markdown, "w") as fh:
            fh.write(to_markdown(done, seconds, versions))
    return exit_status(done)


def exit_status(summaries: list[dict[str, Any]]) -> int:
    """The exit status of ``--all``: 0 when every architecture is exact as deltapack leaves it (its patched state
    where deltapack supports it, else the unpatched model; a format the model refuses is not a leak), 1 when any
    leaks there (or the patched model raises), else 2 when any could not be built, run or timed out."""
    failed = False
    for s in summaries:
        if s["verdict"] in ("cannot build", "timeout"):
            failed = True
            continue
        supported = s.get("patch") == "supported"
        verdict = s.get("patched" if supported else "unpatched", {}).get("verdict", "fails")
        if verdict == "leaks" or (supported and verdict == "raises"):
            return 1
        failed = failed or verdict == "fails"
    return 2 if failed else 0
