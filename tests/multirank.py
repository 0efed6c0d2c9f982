"""The harness of the multi-process tests: spawn one process per rank, give each a process group, run the test's
checks in it and collect what every rank measured (a JSON file per rank, written also when a check fails).

Processes cost seconds each to start, so a test module runs all its checks in one spawn (a module-scoped fixture)
and its tests assert on the measurements.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deltapack.distributed.launch import free_port

Checks = Callable[[int, dict[str, float], str], None]  # (rank, results to fill, out_dir)


def save(rank: int, results: dict[str, float], out_dir: str) -> None:
    """Keep what a rank measured so far (a run cut short still leaves it)."""
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _rank(rank: int, checks: Checks, port: int, out_dir: str, world: int, backend: str, timeout_s: int) -> None:
    options = {}
    if backend == "gloo":  # loopback only: the test machine may have no other interface
        torch.set_num_threads(1)
        pg_options = dist.ProcessGroupGloo._Options()
        pg_options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        options["pg_options"] = pg_options
    else:
        torch.cuda.set_device(rank)
        options["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
        **options,
    )
    results: dict[str, float] = {}
    try:
        checks(rank, results, out_dir)
        # every rank done before any tears its connections down (a rank that exits mid-teardown of the other's gloo
        # pairs can abort it: "terminate called without an active exception")
        dist.barrier()
    finally:
        save(rank, results, out_dir)
        dist.destroy_process_group()


def run_ranks(checks: Checks, world: int, out_dir: Path, backend: str = "gloo", timeout_s: int = 120) -> list[dict]:
    """Run ``checks`` (a module-level function, so that spawned processes can import it) on ``world`` ranks;
    returns what each rank measured, rank by rank."""
    args = (checks, free_port(), str(out_dir), world, backend, timeout_s)
    mp.start_processes(_rank, args=args, nprocs=world, start_method="spawn")
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
