"""The packing scope: the batch's boundaries, visible to every layer for the duration of a packed call.

The patched model sets it around a packed call, and every patched decoder layer sets it again around its own body,
so that gradient checkpointing, which recomputes a layer in the backward pass (outside the call), sees the same
boundaries. Layers read it with :func:`active_boundaries`; nothing re-derives the documents from masks or positions.

The scope lives in a thread-local (not a ``ContextVar``) so that ``torch.compile`` traces it without a graph break:
a compiled layer reads the active boundaries as an input of its graph, guarded by type and tensor shapes only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deltapack.boundaries import Boundaries

__all__ = ["active_boundaries", "packing_scope"]


class _Scope(threading.local):
    def __init__(self) -> None:
        self.bounds: Boundaries | None = None  # the active boundaries of this thread


_ACTIVE = _Scope()


def active_boundaries() -> Boundaries | None:
    """The boundaries of the packed call in progress, or None outside one."""
    return _ACTIVE.bounds


@contextmanager
def packing_scope(bounds: Boundaries | None) -> Iterator[None]:
    """Make ``bounds`` the active boundaries inside the ``with`` block (None: an unpacked region)."""
    previous = _ACTIVE.bounds
    _ACTIVE.bounds = bounds
    try:
        yield
    finally:
        _ACTIVE.bounds = previous
