"""``deltapack audit`` on the GDN family: exact after patching, and able to say when it is not."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import deltapack
from deltapack.audit import audit
from deltapack.audit.formats import FORMATS, Layout, Placement, make_documents
from deltapack.cli import main
from helpers import REFUSES_CU_SEQ_LENS_ON_CPU

GDN = ("qwen3_5", "qwen3_5_moe", "qwen3_next")
LEAKY_UNPATCHED = ("position_ids", "position_ids_cache", "indexed_mask", "indexed_mask_padded")


@pytest.mark.parametrize("arch", GDN)
def test_patched_gdn_is_exact_and_unpatched_leaks(arch: str) -> None:
    report = audit(arch)
    unpatched, patched = report.states["unpatched"], report.states["patched"]
    assert report.patch_supported and report.audited == "patched"
    # the same inputs leak without the patch (so the check below can fail) ...
    for name in LEAKY_UNPATCHED:
        assert unpatched.leaking(name, report.atol, report.grad_rtol), name
        assert unpatched.formats[name].worst() > 1e-2
        assert unpatched.formats[name].grad_rel > 1e-2
    if REFUSES_CU_SEQ_LENS_ON_CPU:
        assert unpatched.formats["cu_seq_lens"].raised is not None  # transformers refuses without the CUDA kernels
    else:  # older transformers run them and leak
        assert unpatched.leaking("cu_seq_lens", report.atol, report.grad_rtol)
    # ... and every format is exact, forward and gradient, with the patch
    for name, result in patched.formats.items():
        assert result.raised is None, (name, result.raised)
        assert result.worst() <= 1e-5, name
        assert result.grad_rel is not None and result.grad_rel <= 1e-4, name
        assert len(result.layers) == len(report.layer_types) and all(v is not None for r in result.layers for v in r)
    assert report.verdict() == "exact" and report.exit_code() == 0
    assert unpatched.verdict(report.atol, report.grad_rtol) == "leaks"


def test_localisation_names_the_leaking_mixers() -> None:
    report = audit("qwen3_5", formats=["position_ids", "position_ids_cache"], gradient=False)
    from deltapack.audit.report import leak_sources

    sources = {s["module"]: s for s in leak_sources(report.states["unpatched"].formats["position_ids"], report)}
    gdn_layers = [i for i, t in enumerate(report.layer_types) if t == "linear_attention"]
    assert sources["linear_attn"]["layers"] == gdn_layers
    # inside the GDN layer, the conv and the recurrence each leak by themselves (fed the clean per-document inputs)
    assert sources["causal_conv1d_fn()"]["kind"] == "conv"
    assert sources["torch_chunk_gated_delta_rule()"]["kind"] == "recurrence / linear attention"
    assert len(sources["causal_conv1d_fn()"]["calls"]) == len(gdn_layers)
    assert "self_attn" not in sources  # with use_cache=False transformers keeps the attention per document
    # with use_cache left on, the full-attention layer also leaks by itself (its mask ignores the documents)
    with_cache = {s["module"] for s in leak_sources(report.states["unpatched"].formats["position_ids_cache"], report)}
    assert {"linear_attn", "self_attn"} <= with_cache
    assert leak_sources(report.states["patched"].formats["position_ids"], report) == []


def test_a_no_op_patch_is_reported_as_leaking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deltapack, "patch", lambda model: model)
    report = audit("qwen3_5", formats=["position_ids", "indexed_mask"], gradient=False, localise=False)
    assert report.verdict("patched") == "leaks"
    assert report.exit_code() == 1


def test_cli_json_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["audit", "--json", "--format", "position_ids", "--format", "padding_left", "--no-localise"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["exit_code"] == 0 and out["verdict"] == "exact"
    assert out["states"]["unpatched"]["formats"]["position_ids"]["status"] == "leaks"
    assert out["states"]["patched"]["formats"]["position_ids"]["status"] == "exact"
    assert {layer["type"] for layer in out["layers"]} == {"linear_attention", "full_attention"}
    assert out["versions"] == {"transformers": transformers.__version__, "torch": torch.__version__}


def test_cli_table_has_a_row_per_layer_type_and_the_logits(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["audit", "--arch", "qwen3_next", "--format", "cu_seq_lens", "--no-grad"])
    text = capsys.readouterr().out
    assert code == 0
    if REFUSES_CU_SEQ_LENS_ON_CPU:
        assert "raises: ValueError" in text  # the unpatched model refuses cu_seq_lens on the CPU
    for row in ("linear_attention", "full_attention", "logits"):
        assert row in text
    assert "verdict (patched): exact" in text
    assert f"transformers {transformers.__version__}, torch {torch.__version__}" in text.splitlines()[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"deltapack {deltapack.__version__} (transformers {transformers.__version__}, torch {torch.__version__})"
    )


def test_cli_cannot_build_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--arch", "not_a_model_type"]) == 2
    assert "could not build" in capsys.readouterr().err


def test_layout_reads_padded_stream_and_flattened_tensors() -> None:
    layout = Layout((2, 5), (Placement(0, 0, 0, 3), Placement(1, 0, 3, 2), Placement(2, 1, 1, 4)))
    padded = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)
    stream = torch.cat([padded[0, :5], padded[1, 1:5]])[None]
    for x in (padded, stream, padded.reshape(-1, 1), stream.reshape(-1, 3)):
        parts = layout.split(x)
        assert parts is not None
        assert [p.shape[0] for p in parts] == [3, 2, 4]
        assert torch.equal(parts[2].reshape(4, 3), padded[1, 1:5])
    clean = [torch.full((n, 3), -1.0) for n in (3, 2, 4)]
    rebuilt = layout.assemble(padded, clean)
    assert torch.equal(rebuilt[1, 0], padded[1, 0])  # padding kept
    assert bool((rebuilt[0] == -1).all()) and bool((rebuilt[1, 1:] == -1).all())
    channels = padded.transpose(1, 2)  # [B, C, T] as nn.Conv1d sees it
    assert torch.equal(layout.split(channels, channels_first=True)[2], padded[1, 1:5])


def test_formats_place_every_document_once() -> None:
    docs = make_documents(128)
    for fmt in FORMATS:
        kwargs, layout = fmt.inputs(docs)
        ids = kwargs["input_ids"]
        assert tuple(ids.shape) == layout.batch_shape
        for p in layout.placements:
            assert torch.equal(ids[p.row, p.start : p.start + p.length], docs[p.doc])


def test_readme_leak_table_is_what_the_audit_prints() -> None:
    """The README's leak figures are the audit's own output (table and --json), for the versions it names."""
    import pathlib
    import re

    from deltapack.audit.report import _num

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    named = re.search(r"\(transformers (\d+\.\d+\.\d+) and torch\s+(\d+\.\d+\.\d+)", readme)
    assert named, "the README names the versions its leak table comes from"
    if transformers.__version__ != named[1] or torch.__version__.split("+")[0] != named[2]:
        pytest.skip(f"the README's figures are for transformers {named[1]}, torch {named[2]}")
    rows = dict(re.findall(r"^\| .*\(`(\w+)`\) \| (\S+ \(\S+?)[ )]", readme, flags=re.M))
    report = audit("qwen3_5", formats=list(rows), patched=False, gradient=False, localise=False)
    for name, printed in rows.items():
        worst = max(report.states["unpatched"].formats[name].logits)
        assert printed.startswith(f"{_num(worst)} (") and printed.endswith(f"({worst:.3f}"), name
