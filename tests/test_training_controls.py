"""``deltapack train``'s training controls: gradient accumulation, LR schedule with warmup, --bf16,
--gradient-checkpointing, the eval split, and the metrics file."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch.utils.checkpoint

from deltapack.cli import main

logging.getLogger("transformers").setLevel(logging.ERROR)

BASE = ["--max-tokens", "128", "--steps", "3", "--seed", "1"]


def run(capsys, tmp_path: Path, *argv: str) -> tuple[dict, list[dict]]:
    out = tmp_path / "out"
    assert main(["train", *BASE, *argv, "--output", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return report, lines


def assert_losses_close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


def test_gradient_accumulation_equals_one_batch_of_all_rows(tmp_path: Path, capsys) -> None:
    # micro-batches of 1 row at positions 2s, 2s+1 are the rows of one 2-row batch: the same token-mean gradients
    whole, _ = run(capsys, tmp_path, "--batch-rows", "2")
    accumulated, _ = run(capsys, tmp_path, "--batch-rows", "1", "--gradient-accumulation-steps", "2")
    single, _ = run(capsys, tmp_path, "--batch-rows", "1")
    assert_losses_close(accumulated["losses"], whole["losses"], 1e-5)
    assert abs(single["losses"][1] - whole["losses"][1]) > 1e-3 * abs(whole["losses"][1])  # the test can fail
    assert accumulated["tokens"] == whole["tokens"]


def test_linear_schedule_with_warmup_and_metrics_lines(tmp_path: Path, capsys) -> None:
    lr, steps, warmup = 1e-3, 5, 2
    argv = ["--lr", str(lr), "--lr-scheduler-type", "linear", "--warmup-steps", str(warmup), "--steps", str(steps)]
    _, lines = run(capsys, tmp_path, *argv, "--batch-rows", "2")
    expected = [lr * (s / warmup if s < warmup else (steps - s) / (steps - warmup)) for s in range(steps)]
    assert [m["lr"] for m in lines] == pytest.approx(expected, rel=1e-9)
    assert [m["step"] for m in lines] == list(range(1, steps + 1))
    for m in lines:
        assert {"loss", "grad_norm", "tokens_per_s", "fill", "memory_gb"} <= m.keys()
        assert m["loss"] is None or (math.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["memory_gb"] > 0)


def test_bf16_autocast_trains_close_to_fp32_but_not_identical(tmp_path: Path, capsys) -> None:
    fp32, _ = run(capsys, tmp_path, "--batch-rows", "2")
    bf16, _ = run(capsys, tmp_path, "--batch-rows", "2", "--bf16")
    assert_losses_close(bf16["losses"], fp32["losses"], 5e-2)
    assert bf16["losses"] != fp32["losses"]


def test_gradient_checkpointing_recomputes_and_gives_the_same_losses(tmp_path: Path, capsys, monkeypatch) -> None:
    plain, _ = run(capsys, tmp_path, "--batch-rows", "2")
    calls = []
    # what torch.utils.checkpoint.checkpoint(use_reentrant=False) runs (transformers binds `checkpoint` itself early)
    original = torch.utils.checkpoint._checkpoint_without_reentrant_generator

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "_checkpoint_without_reentrant_generator", counting)
    checkpointed, _ = run(capsys, tmp_path, "--batch-rows", "2", "--gradient-checkpointing")
    assert calls, "no layer was checkpointed"
    assert_losses_close(checkpointed["losses"], plain["losses"], 1e-5)


def test_eval_split_is_held_out_and_evaluated_every_n_steps(tmp_path: Path, capsys) -> None:
    report, lines = run(capsys, tmp_path, "--batch-rows", "2", "--eval-split", "0.1", "--eval-steps", "2")
    assert report["documents"] == 512 - round(0.1 * 512)
    evals = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 3]  # every 2 steps and at the end
    assert all(math.isfinite(m["eval_loss"]) for m in evals) and report["eval_loss"] == evals[-1]["eval_loss"]
    assert main(["train", *BASE, "--eval-split", "1.5"]) == 2
    assert "--eval-split 1.5; expected a fraction" in capsys.readouterr().err


def test_tensorboard_gets_the_metrics_when_installed(tmp_path: Path, capsys, monkeypatch) -> None:
    import sys
    import types

    scalars: list[tuple[str, float, int]] = []

    class Writer:  # stands in for tensorboard's SummaryWriter (tensorboard itself is optional)
        def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
            assert log_dir == str(tmp_path / "out" / "runs")

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            scalars.append((tag, value, step))

        def close(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    _, lines = run(capsys, tmp_path, "--batch-rows", "2", "--eval-split", "0.1")
    logged = {(tag, step): value for tag, value, step in scalars}
    for m in lines:
        if "eval_loss" in m:
            assert logged[("eval/loss", m["step"])] == m["eval_loss"]
        else:
            assert logged[("train/lr", m["step"])] == m["lr"]
            assert m["loss"] is None or logged[("train/loss", m["step"])] == m["loss"]
