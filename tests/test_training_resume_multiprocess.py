"""``deltapack train`` on 2 processes (gloo, CPU), with context parallelism 2 and with FSDP2: a run killed with
SIGKILL (the whole torchrun process group, as a pre-emption does) between two checkpoints and resumed equals an
uninterrupted run (losses, eval losses, learning rates, gradient norms, weights); a checkpoint written by 2
processes resumes on 1 with the same loss curve within fp32 noise.

Each case launches torchrun three times (~15 s each: two processes importing transformers)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import deltapack
from deltapack.cli import main
from deltapack.train.checkpoint import MARKER, checkpoints
from runs import assert_close, assert_same_run, metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"),
]

RUN = ["--max-tokens", "256", "--batch-rows", "2", "--steps", "8", "--save-every", "2"]
RUN += ["--lr-scheduler-type", "cosine", "--warmup-steps", "2", "--eval-split", "0.05", "--eval-steps", "4"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(deltapack.__file__).parents[1])}


def _command(layout: list[str], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deltapack.cli", "train", *RUN, "--nproc", "2", *layout, "--output", str(out), *extra]


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def _descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, at any depth (Linux /proc; torchrun puts its ranks in new sessions)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _run_killed(command: list[str], out: Path) -> int:
    """Start ``command``, SIGKILL it and every process it started once checkpoint-2 is complete (a pre-emption);
    returns the newest complete checkpoint's step."""
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-2" / MARKER).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    time.sleep(0.5)  # let the kernel reap the ranks before the files are looked at
    assert not (out / "model.safetensors").exists()
    done = [int(p.name.split("-")[1]) for p in checkpoints(out) if (p / MARKER).exists()]
    assert done and max(done) < 8
    return max(done)


@pytest.mark.parametrize("layout", [["--cp", "2", "--fsdp"]], ids=["cp2-fsdp"])
def test_two_processes_killed_and_resumed_equal_an_uninterrupted_run(layout: list[str], tmp_path: Path, capsys) -> None:
    reference, out = tmp_path / "reference", tmp_path / "killed"
    _run(_command(layout, reference))
    step = _run_killed(_command(layout, out), out)
    err = _run(_command(layout, out, "--resume"))
    assert err.count(f"resuming from {out / f'checkpoint-{step}'}") == 1  # said once, by rank 0
    assert_same_run(reference, out)
    if "--fsdp" not in layout:
        return
    # the sharded checkpoint of 2 FSDP processes, resumed on 1 process: the same curve within fp32 noise
    single = tmp_path / "single"
    shutil.copytree(out / f"checkpoint-{step}", single / f"checkpoint-{step}")
    capsys.readouterr()
    assert main(["train", *RUN, "--output", str(single), "--resume"]) == 0
    assert f"resuming from {single / f'checkpoint-{step}'}" in capsys.readouterr().err
    assert [m["step"] for m in metrics(single) if "loss" in m] == list(range(step + 1, 9))
    ref = {m["step"]: m for m in metrics(reference) if "loss" in m}
    ref_eval = {m["step"]: m["eval_loss"] for m in metrics(reference) if "eval_loss" in m}
    assert ref_eval.keys() == {4, 8}
    for m in metrics(single):
        if "eval_loss" in m:
            assert_close(m["eval_loss"], ref_eval[m["step"]], f"step {m['step']} eval loss", rel=1e-5)
            continue
        assert_close(m["loss"], ref[m["step"]]["loss"], f"step {m['step']} loss", rel=1e-5)
        assert_close(m["lr"], ref[m["step"]]["lr"], f"step {m['step']} lr")
