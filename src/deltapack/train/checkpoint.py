"""Checkpoints of ``deltapack train``: written aside and renamed, verified before loading, the last K kept.

A checkpoint is a folder ``OUTPUT/checkpoint-STEP`` holding

- the model and optimizer states, through ``torch.distributed.checkpoint`` (``get_state_dict`` / ``dcp.save``): one
  process writes one shard; under FSDP2 every rank writes its own shards, so no rank gathers the whole model;
- ``trainer_state_rankR.pt`` per rank: the step, the scheduler, the RNG states and the run's counters;
- ``complete.json``, written last: the size of every file of the folder.

It is written to ``OUTPUT/.checkpoint-STEP.tmp`` and renamed when complete, so a crash mid-write leaves only a
temporary folder that is never loaded. Before loading, every file listed in ``complete.json`` must be there with its
recorded size (a truncated file is refused). The data order is a pure function of the seed and the step
(:func:`deltapack.train.loop.batch_rows_at`), so the step is the whole data position.

A checkpoint loads on any number of processes, with or without FSDP or context parallelism: DCP reshards the model
and optimizer states to the layout of the loading run, and every global batch is the same whatever the layout.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltapack.train.inputs import TrainError

__all__ = [
    "MARKER",
    "CheckpointError",
    "checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "rank_world",
    "save_checkpoint",
    "verify_checkpoint",
]

MARKER = "complete.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(TrainError):
    """A checkpoint that cannot be loaded: incomplete, truncated, or from a different run."""


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoints(output: str | Path) -> list[Path]:
    """The ``checkpoint-STEP`` folders of ``output`` (complete or not), oldest step first."""
    out = Path(output).expanduser()
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; CheckpointError naming what is missing or truncated otherwise."""
    path = Path(path).expanduser()
    marker = path / MARKER
    if not path.is_dir():
        raise CheckpointError(f"deltapack train: checkpoint {str(path)!r} is not a directory")
    if not marker.is_file():
        raise CheckpointError(
            f"deltapack train: checkpoint {str(path)!r} has no {MARKER}; it was not written completely"
        )
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"deltapack train: checkpoint {str(path)!r}: unreadable {MARKER} ({err})") from err
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"deltapack train: checkpoint {str(path)!r} lacks {name}; it is damaged")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"deltapack train: checkpoint {str(path)!r}: {name} has {f.stat().st_size} bytes, expected {size} "
                "(truncated or overwritten); it is damaged"
            )
    return manifest


def latest_checkpoint(output: str | Path) -> Path | None:
    """The newest complete checkpoint of ``output``; damaged ones are skipped with a warning on stderr."""
    for path in reversed(checkpoints(output)):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            if rank_world()[0] == 0:
                print(f"{err}; skipping it", file=sys.stderr)
            continue
        return path
    return None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    output: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write ``OUTPUT/checkpoint-STEP`` (on every rank: a collective under torchrun) and keep the newest ``keep``.

    ``state``: the run's own counters and settings (JSON-able), stored with the step, scheduler and RNG states.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = rank_world()
    out = Path(output).expanduser()
    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while writing
        tmp.mkdir()
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp), no_dist=world == 1)
    trainer = {
        "step": step,
        "world_size": world,
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "state": state,
    }
    torch.save(trainer, tmp / f"trainer_state_rank{rank}.pt")
    _barrier()
    if rank == 0:
        files = {}
        for f in sorted(tmp.iterdir()):
            _fsync(f)
            files[f.name] = f.stat().st_size
        marker = tmp / MARKER
        marker.write_text(json.dumps({"step": step, "world_size": world, "files": files}, indent=1))
        _fsync(marker)
        if final.exists():  # the same step written again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep is not None:
            complete = [p for p in checkpoints(out) if (p / MARKER).is_file()]
            for old in complete[: max(0, len(complete) - keep)]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Load a verified checkpoint into ``model``, ``optimizer`` and ``scheduler`` and restore this rank's RNG
    states; returns ``{"step": ..., "state": ..., "world_size": ...}`` as saved (world_size: the processes that
    wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path).expanduser()
    verify_checkpoint(path)
    rank, world = rank_world()
    model_state, optim_state = get_state_dict(model, optimizer)
    states = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(states, checkpoint_id=str(path), no_dist=world == 1)
    except Exception as err:  # DCP raises its own CheckpointException for unreadable shards
        raise CheckpointError(f"deltapack train: checkpoint {str(path)!r} could not be read: {err}") from err
    set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optim"])
    own = path / f"trainer_state_rank{rank}.pt"
    # on more processes than wrote it, the new ranks take rank 0's RNG states (they matter for dropout only)
    trainer = torch.load(own if own.exists() else path / "trainer_state_rank0.pt", weights_only=False)
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"])
    return {"step": trainer["step"], "state": trainer["state"], "world_size": trainer["world_size"]}
