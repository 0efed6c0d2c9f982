"""Rendering an :class:`~deltapack.audit.core.AuditReport`: a readable table, a JSON document, a heatmap."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

from deltapack.audit.compare import FormatResult
from deltapack.audit.core import AuditReport, StateReport

__all__ = ["leak_sources", "module_kind", "to_json", "to_text", "plot"]


def _num(v: float | None) -> str:
    if v is None:
        return "n/a"
    if v == 0.0:
        return "0"
    if math.isinf(v):
        return "inf"
    return f"{v:.1e}"


def module_kind(class_name: str, attr: str) -> str:
    """What a module probably is, from its class and attribute names: conv, recurrence, attention, norm, ..."""
    named = [part for part in attr.split(".") if not part.isdigit()]
    text = f"{class_name} {named[-1] if named else ''}".lower()
    for words, kind in (
        (("conv",), "conv"),
        (("shift", "zeropad"), "token shift"),
        (("rotary", "rope"), "positions (rotary)"),
        (("norm",), "norm"),
        (
            (
                "deltanet",
                "mamba",
                "ssm",
                "rwkv",
                "recurrent",
                "xlstm",
                "mlstm",
                "slstm",
                "linear_attn",
                "lightning",
                "mixer",
                "retention",
                "lru",
                "shortconv",
                "delta",
            ),
            "recurrence / linear attention",
        ),
        (("attn", "attention"), "attention (mask / positions)"),
        (("mlp", "moe", "expert", "feed_forward", "ffn"), "mlp"),
    ):
        if any(w in text for w in words):
            return kind
    return "layer code"


def leak_sources(result: FormatResult, report: AuditReport) -> list[dict[str, Any]]:
    """The modules that leak by themselves (localised pass), grouped by their path inside a decoder layer.

    A decoder layer is listed only when none of its watched modules leaks (then the leak is in the layer's own
    code); a mixer is listed together with a leaking child (a conv), since it may leak beyond it (a recurrence).
    Each entry: {"module": path in the layer (``linear_attn``), "class", "kind", "layers": [indices], "max"}.
    """
    located: list[tuple[int | None, str, str, float]] = []
    for name, diffs in result.own.items():
        worst = max(diffs, default=0.0)
        if worst <= report.atol:
            continue
        layer, rel = None, name
        if "()#" in name:  # a probed function: its k-th call in the forward
            rel, call = name.split("#")
            layer = -1 - int(call)
        for i, layer_name in enumerate(report.layer_names):
            if name == layer_name:
                layer, rel = i, ""
            elif name.startswith(layer_name + "."):
                layer, rel = i, name[len(layer_name) + 1 :]
        located.append((layer, rel, name, worst))
    inner = {layer for layer, rel, _, _ in located if rel}
    groups: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for layer, rel, name, worst in located:
        if not rel and layer in inner:
            continue
        cls = report.module_classes.get(name.split("#")[0], "")
        key = rel or "(decoder layer)"
        entry = groups.setdefault(
            key, {"module": key, "class": cls, "kind": module_kind(cls, rel or cls), "layers": [], "max": 0.0}
        )
        if layer is not None and layer >= 0:
            entry["layers"].append(layer)
        elif layer is not None:
            entry.setdefault("calls", []).append(-1 - layer)
        entry["max"] = max(entry["max"], worst)
    return list(groups.values())


def _describe_sources(sources: list[dict[str, Any]]) -> str:
    parts = []
    for s in sources:
        where = f" (layers {','.join(map(str, s['layers']))})" if s["layers"] else ""
        if s.get("calls"):
            where = f" (calls {','.join(map(str, s['calls']))})"
        cls = f" {s['class']}" if s["class"] else ""
        parts.append(f"{s['module']}{cls}{where}: {s['kind']}, {_num(s['max'])}")
    return "; ".join(parts)


def _type_rows(report: AuditReport, r: FormatResult, per_layer: bool) -> list[tuple[str, list[float | None]]]:
    rows: list[tuple[str, list[float | None]]] = []
    if per_layer:
        for i, (t, vals) in enumerate(zip(report.layer_types, r.layers)):
            rows.append((f"layer {i} {t}", vals))
    else:
        order: OrderedDict[str, list[float | None]] = OrderedDict()
        for t, vals in zip(report.layer_types, r.layers):
            cur = order.setdefault(t, [None] * len(vals))
            for j, v in enumerate(vals):
                if v is not None:
                    cur[j] = v if cur[j] is None else max(cur[j], v)  # type: ignore[type-var]
        rows.extend(order.items())
    rows.append(("logits", list(r.logits)))
    return rows


def _status(state: StateReport, fmt: str, report: AuditReport) -> str:
    r = state.formats[fmt]
    if r.raised is not None:
        return f"raises: {r.raised}"
    return "LEAKS" if state.leaking(fmt, report.atol, report.grad_rtol) else "exact"


def to_text(report: AuditReport, per_layer: bool = False) -> str:
    """The audit as a table: per input format, per state, a row per layer type (or layer) and the logits, a column
    per document (max |diff| against the document alone), the gradient's relative diff and the verdict."""
    counts = OrderedDict[str, int]()
    for t in report.layer_types:
        counts[t] = counts.get(t, 0) + 1
    lines = [
        f"deltapack audit: {report.arch} ({report.model_class}, {len(report.layer_types)} layers: "
        + ", ".join(f"{t} x{n}" for t, n in counts.items())
        + "), fp32, CPU, "
        + ", ".join(f"{lib} {v}" for lib, v in report.versions.items()),
        f"documents of {', '.join(map(str, report.doc_lengths))} tokens, each compared with itself run alone; "
        f"exact = max |diff| <= {report.atol:g} and gradient relative diff <= {report.grad_rtol:g}",
    ]
    lines += [f"note: {n}" for n in report.notes]
    if report.patch_error:
        lines.append(f"deltapack.patch: {report.patch_error} (audited unpatched only)")
    for state in report.states.values():
        if state.error:
            lines.append(f"{state.name}: could not run: {state.error}")
    label_w = max([len(x) for x in report.layer_types] + [8]) + (10 if per_layer else 0)
    for fmt in report.formats:
        lines.append("")
        any_state = next((s for s in report.states.values() if fmt.name in s.formats), None)
        if any_state is None:
            continue
        r0 = any_state.formats[fmt.name]
        rows_desc = " | ".join(
            ",".join(f"doc{d}" for d in row) + (f" (+{left} pad left)" if left else "")
            for row, left in zip(fmt.rows, fmt.pad_left)
        )
        lines.append(f"[{fmt.name}] {fmt.title}; rows: {rows_desc}")
        header = " " * 12 + "".ljust(label_w) + "".join(f"{'doc' + str(d):>10}" for d in r0.docs) + f"{'grad rel':>10}"
        lines.append(header)
        for state in report.states.values():
            r = state.formats.get(fmt.name)
            if r is None:
                continue
            status = _status(state, fmt.name, report)
            if r.raised is not None:
                lines.append(f"  {state.name:<10}{status}")
                continue
            rows = _type_rows(report, r, per_layer)
            for k, (label, vals) in enumerate(rows):
                prefix = f"  {state.name:<10}" if k == 0 else " " * 12
                line = prefix + label.ljust(label_w) + "".join(f"{_num(v):>10}" for v in vals)
                if label == "logits":
                    line += f"{_num(r.grad_rel):>10}  {status}"
                lines.append(line)
            sources = leak_sources(r, report)
            if sources:
                lines.append(" " * 12 + "leaks by itself: " + _describe_sources(sources))
            elif status == "LEAKS" and r.own:
                lines.append(
                    " " * 12 + "no decoder layer leaks by itself: the leak comes from outside the layers "
                    "(positions, masks or embeddings built by the model)"
                )
            if r.localise_error:
                lines.append(" " * 12 + f"localisation could not run: {r.localise_error}")
    lines.append("")
    for name, state in report.states.items():
        lines.append(f"{name}: {_summary(report, state)}")
    lines.append(f"verdict ({report.audited}): {report.verdict()}  [{report.seconds:.1f} s]")
    return "\n".join(lines)


def _summary(report: AuditReport, state: StateReport) -> str:
    verdict = state.verdict(report.atol, report.grad_rtol)
    if state.error:
        return f"{verdict}: {state.error}"
    leaks = [f for f in state.formats if state.leaking(f, report.atol, report.grad_rtol)]
    raises = [f for f, r in state.formats.items() if r.raised is not None]
    worst = max((state.formats[f].worst() for f in state.formats if state.formats[f].raised is None), default=0.0)
    text = f"{verdict}, worst max |diff| {_num(worst)}"
    if leaks:
        text += f"; leaks on {', '.join(leaks)}"
    if raises:
        text += f"; raises on {', '.join(raises)}"
    return text


def to_json(report: AuditReport) -> dict[str, Any]:
    """A JSON-serialisable dict of the whole report (inf written as the string "inf")."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
            return str(v)
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    states = {}
    for name, state in report.states.items():
        formats = {}
        for f, r in state.formats.items():
            formats[f] = {
                "status": "raises"
                if r.raised
                else ("leaks" if state.leaking(f, report.atol, report.grad_rtol) else "exact"),
                "raised": r.raised,
                "docs": r.docs,
                "doc_lengths": r.lengths,
                "layers": r.layers,
                "logits": r.logits,
                "grad_rel": r.grad_rel,
                "leaks_by_itself": leak_sources(r, report),
                "own": r.own,
                "localise_error": r.localise_error,
            }
        states[name] = {
            "verdict": state.verdict(report.atol, report.grad_rtol),
            "error": state.error,
            "formats": formats,
        }
    return clean(
        {
            "arch": report.arch,
            "model_class": report.model_class,
            "versions": report.versions,
            "layers": [{"name": n, "type": t} for n, t in zip(report.layer_names, report.layer_types)],
            "doc_lengths": report.doc_lengths,
            "notes": report.notes,
            "atol": report.atol,
            "grad_rtol": report.grad_rtol,
            "formats": {f.name: f.title for f in report.formats},
            "patch_supported": report.patch_supported,
            "patch_error": report.patch_error,
            "audited": report.audited,
            "verdict": report.verdict(),
            "exit_code": report.exit_code(),
            "seconds": round(report.seconds, 2),
            "states": states,
        }
    )


def plot(report: AuditReport, path: str, fmt: str | None = None) -> str:
    """A heatmap per state (layers + logits x documents, log10 max |diff|) for one input format, by default the one
    that leaks most before patching; returns the format name drawn (also in the title). The colour bar marks the
    tolerance (``report.atol``); a green frame marks each layer where a module leaks by itself (where a leak
    starts; later layers inherit it), named under the panel. Needs matplotlib; raises ImportError without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError as exc:
        raise ImportError(
            "--plot needs matplotlib (pip install matplotlib); the table and --json work without it"
        ) from exc
    states = list(report.states.values())
    name = fmt or _most_leaking_format(report)
    title = next((f.title for f in report.formats if f.name == name), name)
    docs = max((len(s.formats[name].docs) for s in states if name in s.formats), default=1)
    width = (3.2 + 0.9 * docs) * len(states) + 1.5
    height = 2.2 + 0.35 * (len(report.layer_types) + 1)
    fig, axes = plt.subplots(1, len(states), figsize=(width, height), squeeze=False, layout="constrained")
    image = None
    for ax, state in zip(axes[0], states):
        r = state.formats.get(name)
        if r is None or r.raised is not None:
            ax.set_title(f"{state.name}: {'raises' if r is not None else 'not run'}")
            ax.axis("off")
            continue
        rows = [*r.layers, r.logits]
        data = [[math.log10(max(v, 1e-12)) if v is not None else float("nan") for v in row] for row in rows]
        image = ax.imshow(data, aspect="auto", vmin=-12, vmax=1, cmap="magma")
        ax.set_yticks(range(len(rows)), [f"{i} {t}" for i, t in enumerate(report.layer_types)] + ["logits"])
        ax.set_xticks(range(len(r.docs)), [f"doc{d}" for d in r.docs])
        ax.set_title(f"{state.name}: {state.verdict(report.atol, report.grad_rtol)}")
        sources = leak_sources(r, report)
        for layer in sorted({i for s in sources for i in s["layers"]}):
            frame = Rectangle((-0.42, layer - 0.38), len(r.docs) - 0.16, 0.76, fill=False, edgecolor="lime", lw=2)
            ax.add_patch(frame)
            label = ax.get_yticklabels()[layer]
            label.set_color("green")
            label.set_fontweight("bold")
        if sources:
            starts = "; ".join(
                f"{s['module']} ({s['kind']}" + (f", layers {','.join(map(str, s['layers']))})" if s["layers"] else ")")
                for s in sources
            )
            ax.set_xlabel(f"a leak starts in the green layers (leaks by itself): {starts}", wrap=True, fontsize=8)
    if image is not None:
        bar = fig.colorbar(image, ax=axes[0].tolist(), label="max |diff| vs alone", pad=0.02)
        tol = math.log10(report.atol)
        ticks = [t for t in range(-12, 2, 2) if abs(t - tol) > 0.6]
        bar.set_ticks([*ticks, tol], labels=[f"1e{t}" for t in ticks] + [f"tolerance {report.atol:g}"])
        bar.ax.axhline(tol, color="cyan", linewidth=2)
    fig.suptitle(f"{report.arch}: packed vs each document alone; input format {name} ({title})")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return name


def _most_leaking_format(report: AuditReport) -> str:
    state = report.states.get("unpatched") or next(iter(report.states.values()))
    runs = [(r.worst(), f) for f, r in state.formats.items() if r.raised is None]
    return max(runs)[1] if runs else report.formats[0].name
