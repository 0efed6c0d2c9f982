"""``deltapack train`` on 2 processes (gloo, CPU): the same losses per step as one process on the same global batches.

Two launches (each ~15 s: two processes importing transformers): ``deltapack train --nproc 2 --cp 2`` (the command
starts torchrun itself; context parallelism 2 over each packed stream, padded to split) and
``torchrun --nproc-per-node 2 -m deltapack.train --fsdp`` (FSDP2 over 2 data-parallel replicas of one row each).
Both compute in fp32 on the CPU, so one process is the exact reference (relative <= 1e-4). Rendezvous on a free
port of 127.0.0.1. Standard output must be one JSON summary: only rank 0 prints.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from deltapack.cli import build_parser, main
from deltapack.distributed.launch import Parallel, free_port, split_batch, torchrun_command
from deltapack.train import _forwarded_argv, train

pytest.importorskip("tqdm")
logging.getLogger("transformers").setLevel(logging.ERROR)

TOL = 1e-4  # fp32, relative
STEPS = ["--steps", "3", "--max-tokens", "256", "--batch-rows", "2"]


def _launch(command: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def one_process() -> list[float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks run; several OpenMP threads on busy cores crawl
    try:
        return train(build_parser().parse_args(["train", *STEPS])).losses
    finally:
        torch.set_num_threads(threads)


def _assert_same_losses(losses: list[float], reference: list[float]) -> None:
    assert len(losses) == len(reference) == 3
    for step, (mine, ref) in enumerate(zip(losses, reference)):
        assert abs(mine - ref) <= TOL * abs(ref), (step, losses, reference)
    # the steps themselves are far apart: a wrong batch order or a missed update would show
    assert all(abs(a - b) > 100 * TOL * abs(b) for a, b in zip(reference[1:], reference[:-1])), reference


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed with gloo is not available")
def test_cli_nproc_2_cp_2_matches_one_process(one_process: list[float]) -> None:
    command = [sys.executable, "-m", "deltapack.cli", "train", *STEPS, "--nproc", "2", "--cp", "2", "--json"]
    report = _launch(command)
    assert report["ranks"] == 2 and report["context_parallel"] == 2 and not report["fsdp"]
    assert report["stream_pad_tokens"] > 0  # some streams did not split: the padding document was exercised
    _assert_same_losses(report["losses"], one_process)


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed with gloo is not available")
def test_torchrun_fsdp_data_parallel_matches_one_process(one_process: list[float]) -> None:
    command = torchrun_command(2, [*STEPS, "--fsdp", "--json"], port=free_port())
    report = _launch(command)
    assert report["ranks"] == 2 and report["context_parallel"] == 1 and report["fsdp"]
    _assert_same_losses(report["losses"], one_process)


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed with gloo is not available")
def test_moe_load_balancing_loss_over_the_global_batch(tmp_path) -> None:
    """A MoE model that adds the load-balancing loss: with context parallelism 2 (padded streams), the loss of every
    step equals one process, whose loss counts every token of the global batch. A rank counting only its own tokens
    would give another loss, and so does the same run without the load-balancing loss."""
    from deltapack.tiny import tiny_config

    tiny_config("qwen3_5_moe", output_router_logits=True, router_aux_loss_coef=0.5).save_pretrained(tmp_path)
    args = [*STEPS, "--model", str(tmp_path)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = train(build_parser().parse_args(["train", *args])).losses
    finally:
        torch.set_num_threads(threads)
    report = _launch([sys.executable, "-m", "deltapack.cli", "train", *args, "--nproc", "2", "--cp", "2", "--json"])
    assert report["stream_pad_tokens"] > 0
    _assert_same_losses(report["losses"], reference)
    tiny_config("qwen3_5_moe", output_router_logits=False).save_pretrained(tmp_path)
    without = train(build_parser().parse_args(["train", *args, "--steps", "1"])).losses
    assert abs(without[0] - reference[0]) > 100 * TOL * abs(reference[0])


# ---------------------------------------------------------------------------------------------- in one process
def test_forwarded_options_round_trip() -> None:
    args = build_parser().parse_args(["train", "--nproc", "2", "--cp", "2", "--fsdp", "--lr", "0.01", "--steps", "4"])
    argv = _forwarded_argv(args)
    assert "--nproc" not in argv and "--fsdp" in argv
    again = build_parser().parse_args(["train", *argv])
    assert {k: v for k, v in vars(again).items() if k != "nproc"} == {
        k: v for k, v in vars(args).items() if k != "nproc"
    }


def test_torchrun_command_stays_on_loopback() -> None:
    command = torchrun_command(2, ["--cp", "2"], port=12345)
    assert command[command.index("--master-addr") + 1] == "127.0.0.1"
    assert command[command.index("--nproc-per-node") + 1] == "2"
    assert command[-4:] == ["-m", "deltapack.train", "--cp", "2"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nproc", "3", "--cp", "2"], "multiple of 2"),
        (["--cp", "2"], "need several processes"),
        (["--fsdp"], "need several processes"),
        (["--nproc", "2", "--batch-rows", "1"], "at least one row per replica"),
        (["--nproc", "0"], "expected at least 1"),
    ],
)
def test_parallel_option_errors(argv: list[str], message: str, capsys) -> None:
    assert main(["train", *argv, "--steps", "1"]) == 2
    assert message in capsys.readouterr().err


def test_context_parallel_needs_packed_rows() -> None:
    parallel = Parallel(0, 2, 0, 2, None, torch.device("cpu"), "gloo")
    batch = {"input_ids": torch.ones(2, 8, dtype=torch.long), "labels": torch.ones(2, 8, dtype=torch.long)}
    with pytest.raises(ValueError, match="expected packed rows"):
        split_batch(batch, parallel, pad_token_id=0)
    with pytest.raises(ValueError, match="at least one row per replica"):
        split_batch(batch, Parallel(0, 4, 0, 1, None, torch.device("cpu"), "gloo"), pad_token_id=0)
