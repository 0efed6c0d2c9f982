"""Shared pieces of the GPU benchmarks: the end-to-end spec (model and token stream), timing, environment."""

from __future__ import annotations

import datetime
import json
import logging
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

SPEC_PATH = Path(__file__).with_name("e2e-spec.json")
PEAK_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 / H200 SXM (no sparsity): the denominator of every MFU here


def load_spec() -> dict:
    return json.loads(SPEC_PATH.read_text())


def e2e_model(spec: dict) -> torch.nn.Module:
    """The spec's model: random init from its seed, bf16, on CUDA, sdpa attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_5_text", **spec["model"]["config"])
    torch.manual_seed(spec["model"]["seed"])
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(torch.bfloat16)


def document_lengths(total: int = 32768) -> list[int]:
    """The spec's lognormal lengths (median 600, clipped to [16, 4096]), summing exactly to ``total``."""
    gen = torch.Generator().manual_seed(1)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(min(4096, max(16, math.exp(math.log(600) + torch.randn(1, generator=gen).item())))))
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] < 1:
        rest = lengths.pop()
        lengths[-1] += rest
    assert sum(lengths) == total
    return lengths


def documents(lengths: list[int], vocab: int = 32000) -> list[torch.Tensor]:
    """The spec's token ids: one generator (seed 0), one randint per document in order."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def padded_batches(docs: list[torch.Tensor]) -> list[dict]:
    """The padded baseline: ``docs`` four to a batch in order, each row one document padded on the right (0/1
    attention_mask, labels -100 at padding), without a cache."""
    steps = []
    for i in range(0, len(docs), 4):
        group = docs[i : i + 4]
        ids = torch.zeros(len(group), max(len(d) for d in group), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, d in enumerate(group):
            ids[r, : len(d)], mask[r, : len(d)] = d, 1
        labels = ids.masked_fill(mask == 0, -100)
        steps.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False})
    return steps


def rows_of(docs: list[torch.Tensor], row: int) -> list[list[torch.Tensor]]:
    """``docs`` in order, greedily into rows of at most ``row`` tokens (a longer document fills a row alone)."""
    rows, current = [], []
    for d in docs:
        if current and sum(len(x) for x in current) + len(d) > row:
            rows.append(current)
            current = []
        current.append(d)
    return rows + [current]


def deltapack_batch(rows: list[list[torch.Tensor]], row: int) -> tuple[dict, torch.Tensor, list]:
    """``rows`` (documents per row) laid out left to right in rows of ``row`` tokens, zeros after: the batch
    (input_ids, labels -100 at padding), the document ids (1, 2, ... per row, 0 at padding) and each document's
    place (row, first column, length) in order."""
    ids = torch.zeros(len(rows), row, dtype=torch.long)
    doc_ids = torch.zeros_like(ids)
    places = []
    for r, docs in enumerate(rows):
        col = 0
        for n, d in enumerate(docs):
            ids[r, col : col + len(d)], doc_ids[r, col : col + len(d)] = d, n + 1
            places.append((r, col, len(d)))
            col += len(d)
    return {"input_ids": ids, "labels": ids.masked_fill(doc_ids == 0, -100)}, doc_ids, places


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters outside the input embeddings (each tensor once; a tied LM head is the embedding, not counted)."""
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in embedding)


def mfu(model: torch.nn.Module, tokens: int, seconds: float) -> dict:
    """Model FLOP utilisation of a forward+backward over ``tokens`` in ``seconds``: 6 x non-embedding parameters x
    tokens / seconds / :data:`PEAK_BF16_FLOPS` (attention's T^2 work and the embedding lookup not counted)."""
    params = non_embedding_parameters(model)
    flop = 6 * params * tokens
    return {
        "mfu": flop / seconds / PEAK_BF16_FLOPS,
        "model_flop": flop,
        "non_embedding_parameters": params,
        "tokens": tokens,
        "seconds": seconds,
        "peak_flops": PEAK_BF16_FLOPS,
        "formula": "6 x non_embedding_parameters x tokens / seconds / peak_flops",
    }


def cuda_time_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> dict:
    """Median and spread of ``fn`` in ms, timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def environment() -> dict:
    import transformers
    import triton

    try:
        import fla

        fla_version = getattr(fla, "__version__", "unknown")
    except ImportError:
        fla_version = None
    return {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "fla": fla_version,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def write(path: str | None, result: dict) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        Path(path).write_text(text)


def sample_documents(cu_host: list[int] | tuple[int, ...], budget: int = 8192) -> list[int]:
    """Indices of documents of a packed row to check exactness on: the first, the last, the shortest, the longest and
    the middle one, then evenly spaced ones while their tokens fit in ``budget`` (the first five always go in)."""
    n = len(cu_host) - 1
    length = [cu_host[i + 1] - cu_host[i] for i in range(n)]
    picks = dict.fromkeys([0, n - 1, min(range(n), key=length.__getitem__), max(range(n), key=length.__getitem__)])
    picks[n // 2] = None
    used = sum(length[i] for i in picks)
    for i in range(0, n, max(1, n // 16)):
        if i not in picks and used + length[i] <= budget:
            picks[i] = None
            used += length[i]
    return sorted(picks)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class FlaDispatchLog(logging.Handler):
    """The lines FLA's dispatcher logs ("[FLA Backend] <op> -> <backend>", once per backend taken) that name
    ``op``; attach with ``logging.getLogger("fla").addHandler(...)`` and the logger at INFO."""

    def __init__(self, op: str) -> None:
        super().__init__(logging.INFO)
        self.op = op
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "[FLA Backend]" in text and self.op in text:
            self.lines.append(text)
