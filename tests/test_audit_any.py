"""``deltapack audit`` on architectures deltapack does not patch: the verdict matches what is known of them, and
a leak planted in a tiny custom module is found and localised."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from deltapack.audit import audit, audit_model
from deltapack.audit.build import build_model
from deltapack.audit.report import leak_sources
from deltapack.cli import main
from helpers import REFUSES_CU_SEQ_LENS_ON_CPU


def _sources(report, state: str, fmt: str) -> dict[str, dict]:
    return {s["module"]: s for s in leak_sources(report.states[state].formats[fmt], report)}


def test_llama_is_exact_with_restarting_positions_and_padding() -> None:
    report = audit("llama", patched=False, formats=["position_ids", "padding_left", "padding_right"])
    assert report.audited == "unpatched"
    assert report.verdict() == "exact" and report.exit_code() == 0
    for result in report.states["unpatched"].formats.values():
        assert result.worst() <= 1e-5 and result.grad_rel <= 1e-4


def test_llama_leaks_when_the_cache_is_left_on_and_the_attention_is_to_blame() -> None:
    report = audit("llama", patched=False, formats=["position_ids_cache"], gradient=False)
    assert report.verdict() == "leaks" and report.exit_code() == 1
    assert report.states["unpatched"].formats["position_ids_cache"].worst() > 1e-2
    assert set(_sources(report, "unpatched", "position_ids_cache")) == {"self_attn"}


@pytest.mark.parametrize(
    ("arch", "module", "kind"),
    [
        ("mamba", "mixer", "recurrence / linear attention"),  # selective scan + conv inside the mixer
        ("lfm2", "conv", "conv"),  # short convolution layers
        ("rwkv", "attention.time_shift", "token shift"),  # rwkv's token shift reads the previous document
        ("gpt_oss", "self_attn", "attention (mask / positions)"),  # its mask ignores restarting position_ids
    ],
)
def test_each_mixer_kind_leaks_where_it_should(arch: str, module: str, kind: str) -> None:
    report = audit(arch, patched=False, formats=["position_ids"], gradient=False)  # the unpatched model's leaks
    assert report.verdict() == "leaks" and report.exit_code() == 1
    sources = _sources(report, "unpatched", "position_ids")
    assert module in sources, sources
    assert sources[module]["kind"] == kind


@pytest.mark.skipif(not REFUSES_CU_SEQ_LENS_ON_CPU, reason="older transformers run cu_seq_lens on the CPU")
def test_a_model_that_refuses_packed_kwargs_is_reported_as_raising() -> None:
    report = audit("qwen3_5", patched=False, formats=["cu_seq_lens", "padding_right"], gradient=False)
    result = report.states["unpatched"].formats["cu_seq_lens"]
    assert result.raised is not None and "ValueError" in result.raised
    assert report.states["unpatched"].formats["padding_right"].worst() <= 1e-5
    assert report.verdict() == "raises" and report.exit_code() == 0  # refusing is not a silent leak
    only_raising = audit("qwen3_5", patched=False, formats=["cu_seq_lens"], gradient=False)
    assert only_raising.verdict() == "fails" and only_raising.exit_code() == 2  # nothing could run


class LeakyMLP(nn.Module):
    """The layer's MLP plus a small running mean over earlier tokens: mixes documents, as a bug would."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(1, x.shape[-2] + 1, device=x.device, dtype=x.dtype)[:, None]
        return self.inner(x) + 0.1 * x.cumsum(-2) / steps


def test_a_planted_leak_is_found_and_localised() -> None:
    model = build_model("llama").model
    clean = audit_model(model, "llama", formats=_formats("position_ids"))
    assert clean.verdict() == "exact"  # the same model and inputs, before planting
    model.model.layers[1].mlp = LeakyMLP(model.model.layers[1].mlp)
    report = audit_model(model, "llama (planted leak)", formats=_formats("position_ids"))
    assert report.verdict() == "leaks" and report.exit_code() == 1
    result = report.states["unpatched"].formats["position_ids"]
    assert result.layers[0] == [
        pytest.approx(v, abs=1e-5) for v in clean.states["unpatched"].formats["position_ids"].layers[0]
    ]
    assert max(result.layers[1]) > 1e-3 and result.grad_rel > 1e-4
    sources = _sources(report, "unpatched", "position_ids")
    assert set(sources) == {"mlp"} and sources["mlp"]["layers"] == [1]
    assert result.layers[1][0] <= 1e-5  # the first document of the row has nothing before it to leak from


def _formats(*names: str):
    from deltapack.audit.formats import FORMATS

    return [f for f in FORMATS if f.name in names]


def test_plot_without_matplotlib_says_so(tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    code = main(["audit", "--arch", "llama", "--format", "position_ids", "--plot", str(tmp_path / "h.png")])
    assert code == 2  # checked before the audit runs: nothing printed on stdout
    captured = capsys.readouterr()
    assert "needs matplotlib" in captured.err and captured.out == ""
    assert not (tmp_path / "h.png").exists()


@pytest.mark.parametrize(
    "where, message",
    [
        ("missing/h.png", "does not exist"),
        ("h.unknown", "unknown image type 'unknown'"),
        (".", "is a folder"),
        ("/proc/deltapack-audit.png", "cannot be written"),
    ],
)
def test_plot_to_a_path_that_cannot_be_written_exits_2_first(where, message, tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    path = where if where.startswith("/") else str(tmp_path / where)
    assert main(["audit", "--format", "position_ids", "--plot", path]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err and captured.out == ""


def test_plot_writes_a_heatmap(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "heat.png"
    assert main(["audit", "--format", "position_ids", "--no-grad", "--plot", str(path)]) == 0
    assert path.stat().st_size > 1000


def _summary(arch: str, patch: str, unpatched: str, patched: str | None = None) -> dict:
    line = {"arch": arch, "verdict": unpatched, "patch": patch, "unpatched": {"verdict": unpatched}}
    if patched is not None:
        line["patched"] = {"verdict": patched}
    return line


@pytest.mark.parametrize(
    "summaries, code",
    [
        ([_summary("qwen3_5", "supported", "leaks", "exact"), _summary("x", "not supported", "exact")], 0),
        ([_summary("x", "not supported", "raises")], 0),  # a model refusing a format does not leak
        ([_summary("qwen3_5", "supported", "leaks", "exact"), _summary("llama", "not supported", "leaks")], 1),
        ([_summary("qwen3_5", "supported", "leaks", "raises")], 1),
        ([_summary("qwen3_5", "supported", "leaks", "exact"), {"arch": "y", "verdict": "cannot build"}], 2),
        ([{"arch": "y", "verdict": "timeout"}, _summary("llama", "not supported", "leaks")], 1),  # a leak first
    ],
)
def test_all_exit_status(summaries: list[dict], code: int) -> None:
    """--all: 0 every architecture exact as deltapack leaves it, 1 any leaks there, else 2 any could not run."""
    from deltapack.audit.scoreboard import exit_status

    assert exit_status(summaries) == code


def test_all_cli_exits_2_when_an_architecture_cannot_be_built(capsys) -> None:
    assert main(["audit", "--all", "--arch", "not_a_model_type", "--workers", "1"]) == 2
    assert "not_a_model_type: cannot build" in capsys.readouterr().out
