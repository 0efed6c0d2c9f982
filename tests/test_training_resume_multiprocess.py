"""``deltapack train`` on 2 processes (gloo, CPU), with context parallelism 2 and, separately, with FSDP2:

- a run killed with SIGKILL between two checkpoints (all its processes, as a pre-emption does; or its launcher
  alone, whose ranks then stop by themselves) and resumed equals an uninterrupted run of the same steps: per-step
  losses, eval losses, learning rates, gradient norms and final weights, fp32, relative <= 1e-6;
- a truncated shard in the newest sharded checkpoint: ``--resume`` skips it with a warning and continues from the
  previous complete one (still equal to the uninterrupted run); ``--resume DIR`` of it refuses with the reason;
- a checkpoint written by 2 processes resumes on 1, and one written by 1 process resumes on 2 (DCP reshards it),
  with the same loss curve within fp32 noise (CP=2, FSDP2, and both); a process count the global batch cannot be
  split over is refused.

Starting processes costs seconds, so the module runs everything once (a module-scoped fixture) and the tests assert
on what the runs left: the two killed runs through the CLI (torchrun); the other 2-process runs one after another in
one pair of spawned ranks; the 1-process runs in this process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import deltapack
from deltapack.cli import main
from deltapack.distributed.launch import free_port
from deltapack.train.checkpoint import MARKER, checkpoints
from runs import assert_close, assert_same_run, metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"),
]

STEPS = 8
RUN = ["--max-tokens", "256", "--batch-rows", "2", "--steps", str(STEPS), "--save-every", "2"]
RUN += ["--lr-scheduler-type", "cosine", "--warmup-steps", "2", "--eval-split", "0.05", "--eval-steps", "4"]
ENGINES = {"cp2": ["--cp", "2"], "fsdp": ["--fsdp"], "cp2-fsdp": ["--cp", "2", "--fsdp"]}
# a killed run costs a torchrun launch; CP=2 with FSDP2 is resharded below, not killed. True: only the launcher is
# killed (its ranks must stop by themselves)
KILLED = {"cp2": False, "fsdp": True}
FP32_NOISE = 1e-5  # relative: the same run on another process count sums its floats in another order


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(deltapack.__file__).parents[1])}


def _descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, at any depth (Linux /proc; torchrun puts its ranks in new sessions)."""
    parents: dict[int, list[int]] = {}
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


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended


def _run_killed(layout: list[str], out: Path, launcher_only: bool) -> dict:
    """``deltapack train --nproc 2`` SIGKILLed once checkpoint-2 is complete: with every process it started (a
    pre-emption), or alone (its ranks, in sessions of their own, must then stop by themselves). What it left: the
    exit status, the steps of its complete checkpoints, the ranks still running 60 s after the kill."""
    command = [sys.executable, "-m", "deltapack.cli", "train", *RUN, "--nproc", "2", *layout, "--output", str(out)]
    log = out.with_name(out.name + ".stderr")
    with log.open("w") as stderr:
        proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-2" / MARKER).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    ranks = _descendants(proc.pid)
    for pid in [proc.pid] if launcher_only else [proc.pid, *ranks]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    code = proc.wait()
    deadline = time.monotonic() + 60
    while any(map(_running, ranks)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in ranks if _running(pid)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)  # let the kernel reap the ranks before the files are looked at
    done = [int(p.name.split("-")[1]) for p in checkpoints(out) if (p / MARKER).exists()]
    saved = (out / "model.safetensors").exists()
    return {"returncode": code, "stderr": log.read_text()[-4000:], "checkpoints": done, "saved": saved, "left": left}


def _truncate_newest(reference: str, out: str) -> None:
    """``out``: the checkpoints 2, 4 and 6 of ``reference`` and its metrics up to step 6, rank 1's shard of
    checkpoint-6 cut to half its size."""
    for step in (2, 4, 6):
        shutil.copytree(Path(reference, f"checkpoint-{step}"), Path(out, f"checkpoint-{step}"))
    lines = [m for m in metrics(Path(reference)) if m["step"] <= 6]
    Path(out, "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    shard = Path(out, "checkpoint-6", "__1_0.distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _port(rank: int, index: int, out_dir: str) -> int:
    """The rendezvous port of run ``index``: a free one rank 0 picks when it is ready (after its preparation), so
    that nothing else takes it meanwhile; rank 1 waits for it."""
    path = Path(out_dir, f"port{index}")
    if rank == 0:
        Path(out_dir, "port.tmp").write_text(str(free_port()))
        Path(out_dir, "port.tmp").replace(path)
    deadline = time.monotonic() + 300
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not start run {index}")
        time.sleep(0.01)
    return int(path.read_text())


def _ranks(rank: int, runs: list[tuple], out_dir: str) -> None:
    """One of 2 spawned ranks: each run of ``runs`` (name, argv, preparation done by rank 0 first) as torchrun would
    start it, at its own rendezvous port."""
    from deltapack.train import main as train_main

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    results: dict[str, dict] = {}
    for index, (name, argv, prepare) in enumerate(runs):
        err = io.StringIO()
        try:
            if prepare is not None and rank == 0:
                prepare[0](*prepare[1:])
            os.environ["MASTER_PORT"] = str(_port(rank, index, out_dir))
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                results[name] = {"returncode": train_main(argv)}
        except BaseException:
            results[name] = {"returncode": None, "traceback": traceback.format_exc()}
            raise
        finally:
            results.setdefault(name, {})["stderr"] = err.getvalue()[-4000:]
            Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _spawn(runs: list[tuple], out_dir: Path) -> list[dict]:
    """Run ``runs`` on 2 spawned ranks; what each rank recorded (a run that raised stops the rest)."""
    try:
        mp.start_processes(_ranks, args=(runs, str(out_dir)), nprocs=2)
    except Exception:  # the ranks recorded the traceback; the tests that need the missing runs fail on it
        pass
    return [json.loads(p.read_text()) if (p := out_dir / f"rank{r}.json").exists() else {} for r in range(2)]


def _train_here(*argv: str) -> dict:
    """``deltapack train`` on this process: its exit status and what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", *RUN, *argv])
    return {"returncode": code, "stderr": err.getvalue()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict]]:
    """Every run of the module: ``(root, one-process results and killed runs, each spawned rank's results)``."""
    root = tmp_path_factory.mktemp("resume2")
    local: dict[str, dict] = {}
    local["one"] = _train_here("--output", str(root / "one"))
    for engine, launcher_only in KILLED.items():
        local[f"killed-{engine}"] = _run_killed(ENGINES[engine], root / f"killed-{engine}", launcher_only)
    for engine in ENGINES:
        (root / f"from1-{engine}").mkdir()
        shutil.copytree(root / "one" / "checkpoint-4", root / f"from1-{engine}" / "checkpoint-4")
    spawned = []
    for engine, layout in ENGINES.items():
        spawned.append((f"reference-{engine}", [*RUN, *layout, "--output", str(root / f"reference-{engine}")], None))
    for engine in KILLED:
        resumed = [*RUN, *ENGINES[engine], "--output", str(root / f"killed-{engine}"), "--resume"]
        spawned.append((f"resumed-{engine}", resumed, None))
    for engine, layout in ENGINES.items():
        spawned.append(
            (f"from1-{engine}", [*RUN, *layout, "--output", str(root / f"from1-{engine}"), "--resume"], None)
        )
    fsdp, trunc = ENGINES["fsdp"], root / "truncated"
    named = [*RUN, *fsdp, "--output", str(root / "elsewhere"), "--resume", str(trunc / "checkpoint-6")]
    spawned.append(("truncated-named", named, (_truncate_newest, str(root / "reference-fsdp"), str(trunc))))
    spawned.append(("truncated-latest", [*RUN, *fsdp, "--output", str(trunc), "--resume"], None))
    ranks = _spawn(spawned, root)
    for engine in ENGINES:
        if ranks[0].get(f"reference-{engine}", {}).get("returncode") == 0:
            shutil.copytree(root / f"reference-{engine}" / "checkpoint-4", root / f"to1-{engine}" / "checkpoint-4")
            local[f"to1-{engine}"] = _train_here("--output", str(root / f"to1-{engine}"), "--resume")
    return root, local, ranks


def _ok(result: dict | None, what: str) -> str:
    """The stderr of a run that must have succeeded."""
    assert result is not None, f"{what}: did not run (an earlier run failed)"
    assert result["returncode"] == 0, (
        f"{what}: exit status {result['returncode']}\n{result.get('traceback', '')}\n{result['stderr']}"
    )
    return result["stderr"]


def _spawned(ranks: list[dict], name: str) -> tuple[str, str]:
    """The stderr of rank 0 and rank 1 of a spawned run that must have succeeded."""
    return _ok(ranks[0].get(name), f"{name} rank 0"), _ok(ranks[1].get(name), f"{name} rank 1")


def _assert_same_curve(reference: Path, resumed: Path, first: int) -> None:
    """Steps ``first``.. of ``resumed``: the losses, eval losses and learning rates of ``reference``, within fp32
    noise."""
    ref = {(m["step"], "eval_loss" in m): m for m in metrics(reference)}
    got = [m for m in metrics(resumed) if m["step"] >= first]
    assert [m["step"] for m in got if "loss" in m] == list(range(first, STEPS + 1))
    assert [m["step"] for m in got if "eval_loss" in m] == [s for s in (4, 8) if s >= first]
    for m in got:
        r = ref[m["step"], "eval_loss" in m]
        for key in ("loss", "eval_loss", "lr"):
            assert_close(m.get(key), r.get(key), f"step {m['step']} {key}", rel=FP32_NOISE)


@pytest.mark.parametrize("engine", KILLED)
def test_killed_between_checkpoints_and_resumed_equals_an_uninterrupted_run(runs, engine: str) -> None:
    root, local, ranks = runs
    _spawned(ranks, f"reference-{engine}")
    killed = local[f"killed-{engine}"]
    assert killed["returncode"] == -signal.SIGKILL, f"the run ended before it could be killed:\n{killed['stderr']}"
    out = root / f"killed-{engine}"
    assert killed["checkpoints"] and max(killed["checkpoints"]) < STEPS
    assert not killed["saved"]
    assert killed["left"] == [], "ranks still running 60 s after their launcher was killed"
    if KILLED[engine]:  # only the launcher was killed: its ranks stopped by themselves at the next step
        assert "the process that started this rank" in killed["stderr"] and "has ended; stopping" in killed["stderr"]
    err0, err1 = _spawned(ranks, f"resumed-{engine}")
    step = max(killed["checkpoints"])
    assert err0.count(f"resuming from {out / f'checkpoint-{step}'} (step {step})") == 1
    assert "resuming" not in err1  # said once, by rank 0
    assert_same_run(root / f"reference-{engine}", out)


def test_truncated_newest_sharded_checkpoint_is_never_loaded(runs) -> None:
    root, _, ranks = runs
    _spawned(ranks, "reference-fsdp")
    trunc = root / "truncated"
    # sharded: each of the 2 FSDP ranks wrote its own part of the model and optimizer
    assert sorted(p.name for p in (root / "reference-fsdp" / "checkpoint-6").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    named = [ranks[r].get("truncated-named") for r in range(2)]
    assert all(n is not None and n["returncode"] == 2 for n in named), named
    reason = f"checkpoint {str(trunc / 'checkpoint-6')!r}: __1_0.distcp has"
    assert reason in named[0]["stderr"] and "truncated" in named[0]["stderr"] and "Traceback" not in named[0]["stderr"]
    assert named[1]["stderr"] == ""  # said once, by rank 0
    assert not (root / "elsewhere" / "model.safetensors").exists()

    err0, err1 = _spawned(ranks, "truncated-latest")
    assert err0.count(reason) == 1 and "truncated" in err0 and "skipping it" in err0 and reason not in err1
    assert err0.count(f"resuming from {trunc / 'checkpoint-4'} (step 4)") == 1
    assert_same_run(root / "reference-fsdp", trunc)  # continued from step 4 exactly


@pytest.mark.parametrize("engine", ENGINES)
def test_resume_on_another_process_count_continues_the_same_curve(runs, engine: str) -> None:
    root, local, ranks = runs
    _ok(local["one"], "1-process reference")
    # 1 -> 2: the 1-process checkpoint of step 4 continued on 2 processes
    err0, _ = _spawned(ranks, f"from1-{engine}")
    out = root / f"from1-{engine}"
    assert f"resuming from {out / 'checkpoint-4'} (step 4; written by 1 process, resharded for 2 processes)" in err0
    _assert_same_curve(root / "one", out, first=5)
    # 2 -> 1: the 2-process checkpoint of step 4 continued on 1 process
    _spawned(ranks, f"reference-{engine}")
    out = root / f"to1-{engine}"
    err = _ok(local.get(f"to1-{engine}"), f"to1-{engine}")
    assert f"resuming from {out / 'checkpoint-4'} (step 4; written by 2 processes, resharded for 1 process)" in err
    _assert_same_curve(root / f"reference-{engine}", out, first=5)


def test_a_process_count_the_batch_cannot_be_split_over_is_refused(tmp_path: Path, capsys) -> None:
    """4 FSDP replicas for a global batch of 2 rows: refused before any process starts, naming the fix."""
    assert main(["train", *RUN, "--nproc", "4", "--fsdp", "--output", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--batch-rows 2 for 4 data-parallel replicas" in err and "expected at least one row per replica" in err
