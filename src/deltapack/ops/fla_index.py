"""Per-batch chunk indices for FLA kernels that build their own (no host sync).

FLA 0.6's ``chunk_kda`` and ``chunk_simple_gla`` take no ``chunk_indices`` argument: each builds the
(document, chunk) index from the host offsets ``cu_seqlens_cpu`` and copies it to the GPU, a blocking copy that
syncs the host on every call that misses FLA's small identity cache. deltapack builds that same index once per batch
on the device, without a sync (:meth:`Segments.chunk_indices`), and hands it to those kernels through their own
entry point: :func:`install` wraps the ``prepare_chunk_indices`` that the kernel's module calls, so that for the
host offsets of :func:`host_offsets` (one int64 tensor per batch, recognised by identity) it returns deltapack's
index, and for anything else it calls FLA's function unchanged.

Legend: N = documents.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from deltapack.ops.segments import Segments

__all__ = ["host_offsets", "install"]

_ATTR = "_deltapack_segments"  # on the host offsets tensor: a weak reference to the batch's Segments


def host_offsets(segments: Segments) -> torch.Tensor:
    """[N + 1] int64 host offsets to pass as ``cu_seqlens_cpu`` (with ``cu_seqlens=segments.cu_seqlens``): one
    tensor per batch (a plan of the segments: ``segments.plan(host_offsets)``), through which the wrapped
    ``prepare_chunk_indices`` finds the batch's device chunk indices (:meth:`Segments.chunk_indices`). The reference
    is weak: the tensor is kept among the segments' plans, and a strong one would make a cycle."""
    cpu = torch.tensor(segments.cu_seqlens_host, dtype=torch.long)
    setattr(cpu, _ATTR, weakref.ref(segments))
    return cpu


def _wrap(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def prepare_chunk_indices(
        cu_seqlens: torch.Tensor, chunk_size: int, cu_seqlens_cpu: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        ref = getattr(cu_seqlens_cpu, _ATTR, None)
        segments = ref() if ref is not None else None
        if segments is not None and segments.cu_seqlens is cu_seqlens and not kwargs:
            return segments.chunk_indices(chunk_size)
        return original(cu_seqlens, chunk_size, cu_seqlens_cpu=cu_seqlens_cpu, **kwargs)

    prepare_chunk_indices.deltapack_original = original  # type: ignore[attr-defined]
    return prepare_chunk_indices


def install(module: ModuleType) -> None:
    """Wrap ``module.prepare_chunk_indices`` (a FLA kernel module's own import of it) once; idempotent."""
    current = module.prepare_chunk_indices
    if not hasattr(current, "deltapack_original"):
        module.prepare_chunk_indices = _wrap(current)
