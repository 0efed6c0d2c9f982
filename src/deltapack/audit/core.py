"""The audit of one model: every input format packed vs alone, before and after ``deltapack.patch``.

A state ("unpatched", "patched") is exact when every input format runs and, for every document, every decoder
layer's output and the logits are within ``atol`` of the document run alone, and the gradient of the summed
per-document loss is within ``grad_rtol`` (relative L2) of the sum of the documents' gradients alone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltapack.audit.compare import AloneRun, FormatResult, ModelParts, run_alone, run_format, short_reason
from deltapack.audit.formats import FORMATS, InputFormat, make_documents

__all__ = ["ATOL", "GRAD_RTOL", "AuditReport", "StateReport", "audit", "audit_model"]

ATOL = 1e-5  # fp32 max |diff| of layer outputs and logits
GRAD_RTOL = 1e-4  # relative L2 diff of the parameter gradients


@dataclass
class StateReport:
    """The audit of one model state ("unpatched" or "patched"): a :class:`FormatResult` per format name."""

    name: str
    formats: dict[str, FormatResult] = field(default_factory=dict)
    error: str | None = None

    def leaking(self, fmt: str, atol: float, grad_rtol: float) -> bool:
        r = self.formats[fmt]
        if r.raised is not None:
            return False
        return r.worst() > atol or (r.grad_rel is not None and r.grad_rel > grad_rtol)

    def verdict(self, atol: float, grad_rtol: float) -> str:
        """One of exact, leaks, raises (some format raised, none leaks) or fails (could not run at all)."""
        if self.error is not None or not self.formats:
            return "fails"
        if any(self.leaking(f, atol, grad_rtol) for f in self.formats):
            return "leaks"
        if all(r.raised is not None for r in self.formats.values()):
            return "fails"
        if any(r.raised is not None for r in self.formats.values()):
            return "raises"
        return "exact"


def library_versions() -> dict[str, str]:
    """The versions an audit's figures depend on: transformers and torch (as installed)."""
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__}


@dataclass
class AuditReport:
    """Everything one audit found; rendered by :mod:`deltapack.audit.report`."""

    arch: str
    model_class: str
    layer_names: list[str]
    layer_types: list[str]
    doc_lengths: list[int]
    notes: list[str]
    atol: float = ATOL
    grad_rtol: float = GRAD_RTOL
    formats: list[InputFormat] = field(default_factory=list)
    states: dict[str, StateReport] = field(default_factory=dict)
    patch_supported: bool = False
    patch_error: str | None = None
    seconds: float = 0.0
    module_classes: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=lambda: library_versions())

    @property
    def audited(self) -> str:
        """The state the verdict and exit status are about: patched when deltapack patched the model."""
        return "patched" if "patched" in self.states else "unpatched"

    def verdict(self, state: str | None = None) -> str:
        return self.states[state or self.audited].verdict(self.atol, self.grad_rtol)

    def exit_code(self) -> int:
        """0 exact, 1 leaks (or the patched model raised on a format), 2 could not run."""
        state = self.states[self.audited]
        verdict = state.verdict(self.atol, self.grad_rtol)
        if verdict == "fails":
            return 2
        if verdict == "leaks" or (verdict == "raises" and self.audited == "patched"):
            return 1
        return 0


def audit_model(
    model: nn.Module,
    arch: str,
    notes: Sequence[str] = (),
    formats: Sequence[InputFormat] = FORMATS,
    patched: bool = True,
    unpatched: bool = True,
    gradient: bool = True,
    localise: bool = True,
    atol: float = ATOL,
    grad_rtol: float = GRAD_RTOL,
    seed: int = 0,
) -> AuditReport:
    """Audit ``model`` (a causal LM, eval mode) on every input format, unpatched and then patched.

    Both states are compared with each document run alone through the original (unpatched) model: the contract
    is that packing through the patched model gives what the original model gives for each document alone.
    The model is patched with ``deltapack.patch`` for the patched state and left as it was found; a model
    deltapack does not support is audited unpatched only, and the report says why.
    """
    import deltapack

    start = time.perf_counter()
    parts = ModelParts.of(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = int(getattr(config, "vocab_size", None) or getattr(model.config, "vocab_size", 2))
    pad = getattr(config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
    documents = make_documents(vocab, seed=seed)
    report = AuditReport(
        arch=arch,
        model_class=type(model).__name__,
        layer_names=[n for n, _ in parts.layers],
        layer_types=parts.layer_types,
        doc_lengths=[len(d) for d in documents],
        notes=list(notes),
        atol=atol,
        grad_rtol=grad_rtol,
        formats=list(formats),
        module_classes={
            n: "function" if n in {p.label for p in parts.probes} else type(m).__name__ for n, m in parts.watched
        },
    )
    settings = dict(gradient=gradient, localise=localise, pad_token_id=pad, localise_above=atol)

    # every state is compared with the documents run alone through the original (unpatched) model
    was_patched = deltapack.is_patched(model)
    try:
        with parts.probing():
            _audit_states(model, report, parts, formats, documents, settings, patched, unpatched)
    finally:
        deltapack.unpatch(model)
        if was_patched:
            deltapack.patch(model)
    report.seconds = time.perf_counter() - start
    return report


def _audit_states(
    model: nn.Module,
    report: AuditReport,
    parts: ModelParts,
    formats: Sequence[InputFormat],
    documents: list[torch.Tensor],
    settings: dict[str, Any],
    patched: bool,
    unpatched: bool,
) -> None:
    """Fill ``report.states``: the documents alone through the original model, then each state's formats."""
    import deltapack

    used = sorted({d for f in formats for row in f.rows for d in row})
    deltapack.unpatch(model)
    try:
        alone = {d: run_alone(model, parts, d, documents[d], settings["gradient"]) for d in used}
    except Exception as exc:
        report.states["unpatched"] = StateReport(
            "unpatched", error=f"running a document alone raised {short_reason(exc)}"
        )
        return
    if unpatched:
        report.states["unpatched"] = _audit_state("unpatched", model, parts, formats, documents, alone, settings)
    if patched:
        try:
            deltapack.patch(model)
            report.patch_supported = True
        except ValueError as exc:
            report.patch_error = short_reason(exc, 200)
        if report.patch_supported:
            report.states["patched"] = _audit_state("patched", model, parts, formats, documents, alone, settings)


def _audit_state(
    name: str,
    model: nn.Module,
    parts: ModelParts,
    formats: Sequence[InputFormat],
    documents: list[torch.Tensor],
    alone: dict[int, AloneRun],
    settings: dict[str, Any],
) -> StateReport:
    state = StateReport(name)
    for fmt in formats:
        state.formats[fmt.name] = run_format(model, parts, fmt, documents, alone, **settings)
    return state


def audit(
    arch: str | None = "qwen3_5",
    config_path: str | None = None,
    *,
    patched: bool | None = None,
    formats: list[str] | None = None,
    shrink: bool | None = None,
    gradient: bool = True,
    localise: bool = True,
    seed: int = 0,
    atol: float = ATOL,
    threads: int | None = 1,
) -> AuditReport:
    """Build the model (see :func:`deltapack.audit.build.build_model`) and audit it; raises if it cannot be built.

    ``patched``: None audits the patched model too when deltapack supports the architecture; False audits the
    unpatched model only; True always tries (and reports why not). ``threads``: torch CPU threads while it runs
    (tiny models run fastest on one; None leaves the setting alone).
    """
    from deltapack.audit.build import build_model

    with _torch_threads(threads):
        built = build_model(arch, config_path, seed=seed, shrink=shrink)
        return _audit_built(built, patched, formats, gradient, localise, seed, atol)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch CPU threads (unchanged when None), restored afterwards."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _audit_built(
    built: Any,
    patched: bool | None,
    formats: list[str] | None,
    gradient: bool,
    localise: bool,
    seed: int,
    atol: float,
) -> AuditReport:
    chosen = [f for f in FORMATS if formats is None or f.name in formats]
    if formats is not None and len(chosen) != len(formats):
        unknown = sorted(set(formats) - {f.name for f in FORMATS})
        raise ValueError(f"unknown input format(s) {unknown}; expected some of {[f.name for f in FORMATS]}")
    return audit_model(
        built.model,
        built.arch,
        notes=built.notes,
        formats=chosen,
        patched=patched is not False,
        gradient=gradient,
        localise=localise,
        atol=atol,
        seed=seed,
    )
