"""``deltapack train`` checkpoints: a run killed with SIGKILL and resumed equals an uninterrupted one (per-step
losses, learning rates, gradient norms and final weights); damaged or foreign checkpoints are never loaded."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import deltapack
from deltapack.cli import main
from deltapack.train.checkpoint import MARKER, checkpoints
from deltapack.train.loop import batch_rows_at
from runs import assert_same_run

logging.getLogger("transformers").setLevel(logging.ERROR)

# a linear schedule with warmup and weight decay, so that the scheduler and optimizer states matter
RUN = ["--max-tokens", "128", "--batch-rows", "2", "--lr-scheduler-type", "linear", "--warmup-steps", "3"]
RUN += ["--weight-decay", "0.1", "--save-every", "4"]


def train(*argv: str) -> int:
    return main(["train", *RUN, *argv])


def test_data_order_is_a_pure_function_of_seed_and_step() -> None:
    steps = [batch_rows_at(s, 5, 2, seed=3) for s in range(5)]  # two epochs of 5 rows, 2 rows a step
    flat = [i for rows in steps for i in rows]
    assert sorted(flat[:5]) == sorted(flat[5:10]) == list(range(5))  # every row once per epoch
    assert batch_rows_at(3, 5, 2, seed=3) == steps[3]
    assert flat != [i for s in range(5) for i in batch_rows_at(s, 5, 2, seed=4)]


def test_sigkill_between_checkpoints_then_resume_equals_uninterrupted(tmp_path: Path, capsys) -> None:
    steps = ["--steps", "24"]
    reference = tmp_path / "reference"
    assert train(*steps, "--output", str(reference)) == 0

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(deltapack.__file__).parents[1])}
    cmd = [sys.executable, "-m", "deltapack.train", *RUN, *steps, "--output", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-4" / MARKER).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "model.safetensors").exists()
    done = [int(p.name.split("-")[1]) for p in checkpoints(out) if (p / MARKER).exists()]
    assert done and max(done) < 24

    capsys.readouterr()
    assert train(*steps, "--output", str(out), "--resume") == 0
    assert f"resuming from {out / f'checkpoint-{max(done)}'}" in capsys.readouterr().err
    assert_same_run(reference, out)


def test_damaged_or_foreign_checkpoints_are_never_loaded(tmp_path: Path, capsys) -> None:
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert train("--steps", "10", "--output", str(reference)) == 0
    assert train("--steps", "10", "--output", str(out)) == 0
    assert [p.name for p in checkpoints(out)] == ["checkpoint-4", "checkpoint-8"]
    # a folder without its completion marker (as a crash mid-write could leave) is skipped
    shutil.copytree(out / "checkpoint-8", out / "checkpoint-9")
    (out / "checkpoint-9" / MARKER).unlink()
    shard = next((out / "checkpoint-8").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated

    capsys.readouterr()
    assert train("--steps", "10", "--output", str(tmp_path / "other"), "--resume", str(out / "checkpoint-8")) == 2
    err = capsys.readouterr().err
    assert "checkpoint-8" in err and "expected" in err and "truncated" in err and "Traceback" not in err

    assert train("--steps", "10", "--output", str(out), "--resume") == 0
    err = capsys.readouterr().err
    assert f"{out / 'checkpoint-9'}' has no {MARKER}" in err and "truncated" in err
    assert f"resuming from {out / 'checkpoint-4'} (step 4)" in err
    assert_same_run(reference, out)  # the fallback continued exactly from step 4

    assert train("--steps", "10", "--output", str(out), "--resume", "--seed", "1") == 2
    assert "different run: seed 1 (checkpoint: 0)" in capsys.readouterr().err


def test_checkpoint_keeps_the_newest_k_and_needs_output(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert train("--steps", "12", "--save-every", "2", "--save-total-limit", "2", "--output", str(out)) == 0
    assert [p.name for p in checkpoints(out)] == ["checkpoint-10", "checkpoint-12"]
    assert not list(out.glob(".checkpoint-*"))
    state = torch.load(out / "checkpoint-12" / "trainer_state_rank0.pt", weights_only=False)
    assert state["step"] == 12 and {"scheduler", "rng", "state"} <= state.keys()
    capsys.readouterr()
    assert main(["train", "--steps", "2", "--save-every", "1"]) == 2
    assert "expected --output DIR" in capsys.readouterr().err
