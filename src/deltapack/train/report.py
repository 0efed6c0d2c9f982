"""What ``deltapack train`` reports: the summary of a run, the padding it saved, the progress bar."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsLog", "TrainReport", "padded_tokens", "progress"]


@dataclass
class TrainReport:
    """What a run did: counts, losses, time, and padding compared with one-document-per-row batches."""

    model: str
    device: str
    documents: int
    rows: int
    steps: int
    tokens: int
    fill: float
    packed_tokens_computed: int
    padded_tokens_computed: int
    first_loss: float
    last_loss: float
    wall_s: float
    skipped_steps: int = 0
    losses: list[float] = field(default_factory=list)
    ranks: int = 1
    context_parallel: int = 1
    fsdp: bool = False
    stream_pad_tokens: int = 0
    eval_loss: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "tokens_per_s": self.tokens_per_s}

    def _layout(self) -> str:
        if self.ranks == 1:
            return ""
        parts = [f"{self.ranks} ranks", f"{self.ranks // self.context_parallel} data-parallel"]
        parts += [f"context parallel {self.context_parallel}"] if self.context_parallel > 1 else []
        return " (" + ", ".join(parts + (["FSDP2"] if self.fsdp else [])) + ")"

    def __str__(self) -> str:
        packed_pad = 1 - self.tokens / self.packed_tokens_computed if self.packed_tokens_computed else 0.0
        padded_pad = 1 - self.tokens / self.padded_tokens_computed if self.padded_tokens_computed else 0.0
        saved = self.padded_tokens_computed / self.packed_tokens_computed if self.packed_tokens_computed else 0.0
        return "\n".join(
            [
                f"model            {self.model} on {self.device}" + self._layout(),
                f"data             {self.documents} documents packed into {self.rows} rows (fill {self.fill:.1%})",
                f"trained          {self.steps} steps, {self.tokens} tokens in {self.wall_s:.1f} s "
                f"({self.tokens_per_s:,.0f} tokens/s)",
                f"loss             {self.first_loss:.4f} -> {self.last_loss:.4f}"
                + (f" ({self.skipped_steps} batches without trained tokens skipped)" if self.skipped_steps else ""),
                *([f"eval loss        {self.eval_loss:.4f}"] if self.eval_loss is not None else []),
                f"padding          {packed_pad:.1%} of computed tokens packed vs {padded_pad:.1%} in padded batches "
                f"of the same documents ({saved:.2f}x the tokens computed without packing)",
            ]
        )


def padded_tokens(lengths: list[int], rows_per_batch: int) -> int:
    """Tokens computed when the documents (``lengths``, in data order) go one per row, ``rows_per_batch`` rows per
    batch, each batch padded to its longest document (what a padding collator does)."""
    return sum(
        len(lengths[i : i + rows_per_batch]) * max(lengths[i : i + rows_per_batch])
        for i in range(0, len(lengths), rows_per_batch)
    )


def progress(total: int, shown: bool = True) -> Any:
    """A progress bar over ``total`` steps (tqdm, else plain lines); a silent one when not ``shown`` (ranks > 0)."""
    if not shown:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the train extra
        return _PlainProgress(total)
    return tqdm(total=total, desc="deltapack train", unit="step", dynamic_ncols=True, file=sys.stderr)


class _NoProgress:
    """The progress bar of ranks other than 0."""

    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _PlainProgress:
    def __init__(self, total: int):
        self.total, self.n, self.postfix = total, 0, {}

    def update(self, n: int) -> None:
        self.n += n
        print(f"step {self.n}/{self.total} " + " ".join(f"{k}={v}" for k, v in self.postfix.items()), file=sys.stderr)

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = kw

    def close(self) -> None:
        pass


class MetricsLog:
    """``OUTPUT/metrics.jsonl``, one JSON line per step, and TensorBoard event files in ``OUTPUT/runs`` when
    ``tensorboard`` is installed.

    A line: ``{"step", "loss", "lr", "grad_norm", "tokens_per_s", "fill", "memory_gb"}`` (loss and grad_norm null
    for a batch without trained tokens; memory: the peak CUDA allocation, else the process's peak RSS). Resuming at
    step S drops the lines after S that the interrupted run had written, so the file reads as one run.
    """

    def __init__(self, output: str | Path, start_step: int = 0):
        out = Path(output).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        kept = []
        if start_step and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    break  # a line cut short by a crash ends the file
        self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.board = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            pass
        else:
            self.board = SummaryWriter(str(out / "runs"), purge_step=start_step + 1 if start_step else None)

    def write(
        self, step: int, loss: float | None, lr: float, grad_norm: float, tokens_per_s: float, fill: float, device: Any
    ) -> None:
        record = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": None if math.isnan(grad_norm) else grad_norm,
            "tokens_per_s": tokens_per_s,
            "fill": fill,
            "memory_gb": _memory_gb(device),
        }
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.board.add_scalar(f"train/{key}", value, step)

    def write_eval(self, step: int, eval_loss: float) -> None:
        """An eval line: ``{"step", "eval_loss"}``."""
        self.file.write(json.dumps({"step": step, "eval_loss": eval_loss}) + "\n")
        self.file.flush()
        if self.board is not None:
            self.board.add_scalar("eval/loss", eval_loss, step)

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def _memory_gb(device: Any) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux
