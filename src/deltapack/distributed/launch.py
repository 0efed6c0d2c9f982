"""Several processes for one training run: torchrun, the process groups, and one global batch split over the ranks.

    torchrun --nproc-per-node N -m deltapack.train --cp K [--fsdp] ...     # or: deltapack train --nproc N ...

N ranks form N / K data-parallel replicas of K consecutive ranks each (K = context parallelism). Every rank draws the
same global batch (the same packed rows in the same order). Replica d takes rows d, d + N/K, ...; inside a replica
the unpadded token stream of its rows is split across its K ranks by :class:`ContextShard` (padded first, with one
extra document whose labels are ignored, to the multiple the layout needs).

Each rank's loss is its summed token losses over the number of targets of the whole global batch, so the sum over
ranks is the one-process loss (the global token mean) and the sum over ranks of each rank's gradients is the
one-process gradient. Gradients are summed over all ranks: one all-reduce without FSDP; with FSDP, which divides by
the number of replicas, the rank's loss is scaled by that number before the backward.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deltapack.boundaries import IGNORE_INDEX, Boundaries
from deltapack.distributed.context_parallel import load_balancing_loss_share
from deltapack.distributed.sharding import ContextShard, padded_total

__all__ = [
    "LocalBatch",
    "Parallel",
    "check_parallel_sizes",
    "free_port",
    "init_parallel",
    "is_launched",
    "local_loss",
    "split_batch",
    "sum_gradients",
    "torchrun_command",
]

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_parallel_sizes(world_size: int, context_parallel: int) -> None:
    """Raise ValueError unless ``context_parallel`` (K) divides ``world_size`` (N)."""
    if context_parallel < 1 or world_size < 1:
        raise ValueError(f"deltapack: {world_size} processes with --cp {context_parallel}; expected both >= 1")
    if world_size % context_parallel:
        raise ValueError(
            f"deltapack: {world_size} processes do not split into groups of --cp {context_parallel}; expected a "
            f"process count that is a multiple of {context_parallel} (N / K data-parallel replicas of K ranks)"
        )


def is_launched() -> bool:
    """Whether this process was started by torchrun (or anything that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_command(
    nproc: int, argv: list[str], module: str = "deltapack.train", port: int | None = None
) -> list[str]:
    """The torchrun command line that runs ``python -m module *argv`` on ``nproc`` processes of this machine,
    rendezvous on 127.0.0.1 at ``port`` (default: a free one)."""
    port = free_port() if port is None else port
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "-m",
        module,
        *argv,
    ]


def run_torchrun(nproc: int, argv: list[str], module: str = "deltapack.train") -> int:
    """Run ``module`` on ``nproc`` local processes through torchrun's API; returns the first failed rank's exit
    status (0 when all succeed), without torchrun's traceback (rank 0 has printed what went wrong)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    options = get_args_parser().parse_args(torchrun_command(nproc, argv, module)[3:])
    try:
        torchrun(options)
    except ChildFailedError as err:
        codes = [failure.exitcode for failure in err.failures.values()]
        return next((code for code in codes if code > 0), 1)
    return 0


@dataclass(frozen=True)
class Parallel:
    """This process's place in the run.

    Attributes:
        rank, world_size, local_rank: from torchrun's environment.
        context_parallel: K, ranks per replica splitting one stream. data_parallel: N / K replicas.
        cp_group: the process group of this rank's replica (the default group when there is one replica).
        device: this rank's device. backend: "nccl" or "gloo".
    """

    rank: int
    world_size: int
    local_rank: int
    context_parallel: int
    cp_group: Any
    device: torch.device
    backend: str

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.context_parallel

    @property
    def replica(self) -> int:
        return self.rank // self.context_parallel

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_parallel(context_parallel: int, device: str | None = None, timeout_s: float = 600) -> Parallel:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU) and make the context-parallel groups.

    Args:
        context_parallel: K; consecutive ranks [d K, (d + 1) K) split the stream of replica d.
        device: "cpu" or "cuda" (default: cuda when there is one); a CUDA rank takes GPU LOCAL_RANK.

    Raises:
        ValueError: not started by torchrun, or a world size that K does not divide.
    """
    if not is_launched():
        raise ValueError("deltapack: no RANK / WORLD_SIZE in the environment; expected a process started by torchrun")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    check_parallel_sizes(world_size, context_parallel)
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
        backend = "nccl"
    else:
        where, backend = torch.device(kind), "gloo"
    if not dist.is_initialized():
        options: dict[str, Any] = {}
        host = os.environ.get("MASTER_ADDR", "")
        if backend == "gloo" and host in LOOPBACK:
            # one machine: keep gloo on the loopback interface (the hostname may resolve to an unreachable one)
            pg_options = dist.ProcessGroupGloo._Options()
            pg_options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            options["pg_options"] = pg_options
        if backend == "nccl":
            options["device_id"] = where
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **options)
    cp_group = dist.group.WORLD
    if context_parallel < world_size:
        for first in range(0, world_size, context_parallel):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(first, first + context_parallel)))
            if first <= rank < first + context_parallel:
                cp_group = group
    return Parallel(rank, world_size, local_rank, context_parallel, cp_group, where, backend)


@dataclass
class LocalBatch:
    """What one rank runs of a global batch.

    Attributes:
        inputs: the model's keyword arguments for this rank (a row subset [b, T], or the shard [1, T_local] with
            ``boundaries=``).
        shift_labels: [1, T_local] next-token targets of the shard (context parallelism only; None otherwise).
        labels: [b, T] labels of the rows (no context parallelism; None otherwise).
        targets: the number of targets of the whole global batch (the divisor of every rank's loss).
        shard: this rank's :class:`ContextShard` (context parallelism only).
        real: [T_local] bool, False on the padding document that makes the stream split (context parallelism with
            padding only; None otherwise).
    """

    inputs: dict[str, Any]
    shift_labels: torch.Tensor | None
    labels: torch.Tensor | None
    targets: int
    shard: ContextShard | None = None
    real: torch.Tensor | None = None


def count_targets(labels: torch.Tensor) -> int:
    """Targets of a batch of labels [B, T] (each token predicts the next label)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def split_batch(
    batch: dict[str, torch.Tensor], parallel: Parallel, pad_token_id: int, layout: str = "zigzag"
) -> LocalBatch:
    """This rank's part of a global batch from :class:`~deltapack.data.PackedCollator` (the same on every rank).

    Args:
        batch: ``input_ids``, ``labels`` [B, T] and the document layout (``attention_mask`` with document ids and/or
            restarting ``position_ids``), on this rank's device.
        parallel: this rank's place. pad_token_id: the id of the tokens that pad the stream to a length K splits.
        layout: "contiguous" or "zigzag" (context parallelism only).

    Raises:
        ValueError: fewer rows than data-parallel replicas, or context parallelism on a batch that does not say where
            its documents are.
    """
    rows = batch["input_ids"].shape[0]
    if rows < parallel.data_parallel:
        raise ValueError(
            f"deltapack: a global batch of {rows} rows for {parallel.data_parallel} data-parallel replicas; expected "
            f"at least one row per replica (--batch-rows >= {parallel.data_parallel})"
        )
    targets = count_targets(batch["labels"])
    mine = {k: v[parallel.replica :: parallel.data_parallel] for k, v in batch.items()}
    if parallel.context_parallel > 1 and "attention_mask" not in mine and "position_ids" not in mine:
        raise ValueError(
            "deltapack: context parallelism splits a packed stream, and this batch has no attention_mask with "
            "document ids nor restarting position_ids; expected packed rows (deltapack.data.PackedCollator)"
        )
    bounds = _batch_boundaries(mine)
    if parallel.context_parallel == 1:
        # explicit boundaries: every rank takes the packed path, so FSDP gathers the same groups in the same order
        return LocalBatch({"input_ids": mine["input_ids"], "boundaries": bounds}, None, mine["labels"], targets)
    ids, labels = bounds.unpad(mine["input_ids"]), bounds.unpad(mine["labels"])
    cu = list(bounds.cu_seqlens_host)
    total = padded_total(cu[-1], parallel.context_parallel, layout)
    if total > cu[-1]:  # one extra document, never a target: it changes nothing for the others
        extra = total - cu[-1]
        ids = torch.cat([ids, ids.new_full((1, extra), pad_token_id)], dim=1)
        labels = torch.cat([labels, labels.new_full((1, extra), IGNORE_INDEX)], dim=1)
        cu.append(total)
    stream = Boundaries.from_cu_seqlens(cu, (1, total), device=ids.device)
    shard = ContextShard.build(stream, parallel.cp_group, layout=layout)
    local = shard.shard(ids)
    return LocalBatch(
        inputs={"input_ids": local, "boundaries": shard.local},
        shift_labels=shard.shift_labels(shard.shard(labels)),
        labels=None,
        targets=targets,
        shard=shard,
        real=None if total == bounds.total_tokens else shard.local_index.to(ids.device) < bounds.total_tokens,
    )


def _batch_boundaries(batch: dict[str, torch.Tensor]) -> Boundaries:
    """The documents of a batch; each row one document when the batch describes no packing and no padding."""
    shape = tuple(batch["input_ids"].shape)
    bounds = Boundaries.from_inputs(
        shape, attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids")
    )
    if bounds is None:
        rows, width = shape
        bounds = Boundaries.from_cu_seqlens(list(range(0, rows * width + 1, width)), shape)
    return bounds.to(batch["input_ids"].device)


def local_loss(model: nn.Module, local: LocalBatch) -> torch.Tensor:
    """This rank's share of the global token-mean loss (fp32 scalar): its summed token losses over the targets of the
    whole global batch. Summed over ranks it is the loss of one process on the global batch.

    A MoE model whose config adds the load-balancing loss (``output_router_logits``) adds its share of that loss over
    the tokens of the whole global batch, weighted by ``router_aux_loss_coef``, as one process does.
    """
    config = model.config.get_text_config()
    outputs = model(**local.inputs)
    logits = outputs.logits
    if local.shift_labels is not None:
        shift = local.shift_labels
    else:  # rows: each token predicts the next label of its row (the collator put -100 where a document starts)
        shift = F.pad(local.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    summed = F.cross_entropy(logits.flatten(0, 1).float(), shift.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    loss = summed / max(local.targets, 1)
    if getattr(config, "output_router_logits", False):
        share = load_balancing_loss_share(
            tuple(outputs.router_logits),
            config.num_experts,
            config.num_experts_per_tok,
            None,
            dist.get_world_size(),
            token_mask=local.real,
        )
        loss = loss + config.router_aux_loss_coef * share
    return loss


def sum_gradients(params: list[nn.Parameter], group: Any = None) -> None:
    """Sum the gradients of ``params`` over the ranks of ``group`` in one all-reduce (a parameter without a gradient
    on some rank counts as zeros there)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def forwarded_argv(args: Any, parser: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """The options of ``args`` (parsed by ``parser``, an ``argparse.ArgumentParser``) that differ from the parser's
    defaults, as a command line for the ranks torchrun starts; options named in ``skip`` are left out."""
    import argparse

    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        argv += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, str(value)]
    return argv


def world_size_in_env() -> int:
    """The number of processes torchrun started (1 outside it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_in_env() -> int:
    """This process's rank under torchrun (0 outside it)."""
    return int(os.environ.get("RANK", "0"))
