"""Comparing ``deltapack train`` runs by what they leave in --output: metrics.jsonl and the saved weights."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_close(a: float | None, b: float | None, what: str, rel: float = 1e-6) -> None:
    assert (a is None) == (b is None), what
    if a is not None:
        assert abs(a - b) <= rel * max(abs(a), abs(b), 1e-12), f"{what}: {a} vs {b}"


def assert_same_run(reference: Path, resumed: Path, rel: float = 1e-6) -> None:
    """Same per-step loss, lr and gradient norm in metrics.jsonl, and the same final weights (relative <= rel)."""
    ref, got = metrics(reference), metrics(resumed)
    assert [m["step"] for m in got] == [m["step"] for m in ref]
    for a, b in zip(ref, got, strict=True):
        for key in ("loss", "lr", "grad_norm", "eval_loss"):
            assert_close(a.get(key), b.get(key), f"step {a['step']} {key}", rel)
    w_ref, w_got = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert w_ref.keys() == w_got.keys()
    for name, tensor in w_ref.items():
        diff = (w_got[name] - tensor).norm() / tensor.norm().clamp_min(1e-12)
        assert diff <= rel, f"{name}: relative difference {diff:.2e}"
