"""Where the documents of one packed stream are, as every op takes it: ``segments=`` (one argument).

Legend: T = tokens of the packed stream, N = documents.

The varlen rule, as in flash-attn and FLA: a packed stream is one row (batch size 1) and ``cu_seqlens`` (int32,
length N + 1, starting at 0, strictly increasing, ending at T) says where each document starts. Everything an op
derives from the offsets once per batch (FLA's chunk indices, a backend's launch plan) is a typed, memoised plan of
the :class:`Segments` object, so every layer of the batch reuses it and nothing syncs the host to rebuild it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

__all__ = ["IGNORE_INDEX", "Segments"]

IGNORE_INDEX = -100  # the label a loss skips (PyTorch's cross_entropy default, transformers' convention)

PlanT = TypeVar("PlanT")


class _Plans:
    """The plans of one batch, keyed by the function that builds each. Not a dict or a dataclass on purpose: code that
    walks inputs and copies their containers (FSDP's input casting copies dataclasses field by field) passes it on as
    it is, so every copy of a :class:`Segments` shares the plans of its batch."""

    __slots__ = ("by_builder",)

    def __init__(self) -> None:
        self.by_builder: dict[Callable[..., Any], Any] = {}


@dataclass(frozen=True, eq=False)
class Segments:
    """The documents of one packed stream [1, T]. Immutable; build it with :meth:`from_cu_seqlens`.

    Attributes:
        cu_seqlens: [N + 1] int32 document offsets (0, ..., T) on the device of the stream.
        cu_seqlens_host: the same offsets as host ints (no op needs a device sync to read them).
        seq_idx: [1, T] int32 document index of every token, on the device of the stream.
        max_seqlen: length of the longest document (host int, as flash-attn takes it).
        cu_seqlens_cpu: the offsets as an [N + 1] int32 CPU tensor (filled in when not given): what an op reads its
            host offsets from inside a compiled graph (:mod:`deltapack.ops.opaque`), where host ints would be
            baked into the graph and recompile it for every new split of the same tokens.

    Per-batch plans: :meth:`chunk_indices` (FLA's (document, chunk) rows for a chunk length) and :meth:`plan` (any
    backend's own plan, keyed by the function that builds it) are built on first use and kept on this object.

    Subclasses describe streams an op cannot treat as independent documents on their own: under context
    parallelism (``deltapack.distributed``) a rank's segments are pieces of documents that go on in other ranks,
    and :meth:`run_op` hands the op to the exchange that keeps it exact (``is_shard`` is then True).
    """

    is_shard: ClassVar[bool] = False
    cu_seqlens: torch.Tensor
    cu_seqlens_host: tuple[int, ...]
    seq_idx: torch.Tensor
    max_seqlen: int
    _plans: _Plans = field(default_factory=_Plans, repr=False)
    cu_seqlens_cpu: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.cu_seqlens_cpu is None:
            object.__setattr__(self, "cu_seqlens_cpu", torch.tensor(self.cu_seqlens_host, dtype=torch.int32))
        for offsets in (self.cu_seqlens, self.cu_seqlens_cpu):  # the number of documents varies from batch to batch:
            torch._dynamo.maybe_mark_dynamic(offsets, 0)  # a compiled graph keeps it symbolic from the first batch

    # ------------------------------------------------------------------ construction
    @classmethod
    @torch._dynamo.disable  # host work on host values: under torch.compile it runs eagerly, never traced
    def from_cu_seqlens(
        cls, cu_seqlens: torch.Tensor | Sequence[int], device: torch.device | str | None = None
    ) -> Segments:
        """From document offsets (0, then strictly increasing, ending at T); one host read of a device tensor.

        Args:
            cu_seqlens: [N + 1] ints, a tensor or a sequence. device: where the device tensors go (default: the
                device of ``cu_seqlens`` when it is a tensor, else the CPU).

        Raises:
            ValueError: offsets that do not start at 0 or do not increase strictly (every document >= 1 token).
        """
        if device is None:
            device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else torch.device("cpu")
        host_cu = torch.as_tensor(cu_seqlens).detach().cpu()
        if host_cu.dim() != 1 or host_cu.numel() < 2 or host_cu.is_floating_point():
            raise ValueError(
                f"deltapack: cu_seqlens of shape {tuple(host_cu.shape)} and dtype {host_cu.dtype}; expected a 1-D "
                "integer tensor [N + 1]"
            )
        host = tuple(int(c) for c in host_cu.tolist())
        steps = [b - a for a, b in zip(host[:-1], host[1:])]
        if host[0] != 0 or min(steps) <= 0:
            raise ValueError(
                f"deltapack: cu_seqlens {list(host)}; expected offsets that start at 0 and increase strictly "
                "(every document at least one token long)"
            )
        lengths = torch.tensor(steps)
        seq_idx = torch.repeat_interleave(torch.arange(len(steps), dtype=torch.int32), lengths)
        return cls(
            cu_seqlens=torch.tensor(host, dtype=torch.int32).to(device),
            cu_seqlens_host=host,
            seq_idx=seq_idx.unsqueeze(0).to(device),
            max_seqlen=max(steps),
        )

    def to(self, device: torch.device | str) -> Segments:
        """The same segments with the device tensors on ``device`` (plans are not carried over)."""
        return dataclasses.replace(
            self,
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=True),
            seq_idx=self.seq_idx.to(device, non_blocking=True),
            _plans=_Plans(),
        )

    # ------------------------------------------------------------------ what every op reads
    # num_docs and total_tokens read tensor sizes (equal to the host offsets' in eager), so that a compiled layer
    # sees sizes it can keep symbolic rather than host ints it would guard on
    @property
    def num_docs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def total_tokens(self) -> int:
        return self.seq_idx.shape[-1]

    @property
    def doc_lengths(self) -> list[int]:
        c = self.cu_seqlens_host
        return [b - a for a, b in zip(c[:-1], c[1:])]

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    # ------------------------------------------------------------------ per-batch plans
    def plan(self, build: Callable[[Segments], PlanT]) -> PlanT:
        """``build(self)``, computed once per batch and kept here (keyed by ``build`` itself, not by a string).

        A backend's per-batch preparation goes in a module-level function ``build(segments) -> Plan``; every layer
        then reads the same plan, also when activation checkpointing recomputes a layer.
        """
        plans = self._plans.by_builder
        if build not in plans:
            plans[build] = build(self)
        return plans[build]

    def has_plan(self, build: Callable[[Segments], Any]) -> bool:
        """Whether ``build``'s plan was built for this batch already."""
        return build in self._plans.by_builder

    def chunk_indices(self, chunk: int) -> torch.Tensor:
        """[chunks, 2] int32 (document, chunk index inside it) for ``chunk``-token chunks, as FLA's kernels take
        them (every document starts a new chunk); built on the device without a host sync, once per chunk length."""
        return self.plan(_chunk_indices_builder(chunk))

    # ------------------------------------------------------------------ hooks for kinds of segments
    def run_op(self, op: str, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        """How op ``op`` runs on these segments when they are not plain documents, else ``NotImplemented`` (then the
        dispatcher picks a backend). Subclasses (context parallelism) return the op's result for the positional
        ``args`` and keyword ``kwargs`` of the op's signature, or raise ValueError for an op they cannot keep exact."""
        return NotImplemented

    def shift_labels(self, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """Next-token targets [1, T] for ``labels`` [1, T]: ``ignore_index`` at the last token of every document,
        so no document's first token is predicted from the previous document."""
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
        last = self.cu_seqlens[1:].long() - 1
        return shifted.index_fill(1, last, ignore_index)


@functools.cache
def _chunk_indices_builder(chunk: int) -> Callable[[Segments], torch.Tensor]:
    """One builder function per chunk length, so that :meth:`Segments.plan` keeps one plan per length."""

    def build(segments: Segments) -> torch.Tensor:
        return chunk_indices(segments.cu_seqlens, segments.doc_lengths, chunk)

    return build


def chunk_indices(cu_seqlens: torch.Tensor, lengths: Sequence[int], chunk: int) -> torch.Tensor:
    """[chunks, 2] (document, chunk inside it) in the dtype and on the device of ``cu_seqlens`` [N + 1], for
    documents of host ``lengths``; no host sync (the number of chunks comes from the host lengths)."""
    chunks = sum(-(-n // chunk) for n in lengths)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    counts = (lens + chunk - 1) // chunk
    docs = torch.arange(len(lengths), device=cu_seqlens.device)
    doc_of_chunk = docs.repeat_interleave(counts, output_size=chunks)
    first = counts.cumsum(0) - counts
    within = torch.arange(chunks, device=cu_seqlens.device) - first[doc_of_chunk]
    return torch.stack([doc_of_chunk, within], 1).to(cu_seqlens.dtype)
