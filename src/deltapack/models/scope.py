"""The packing scope: the batch's boundaries, visible to every layer for the duration of a packed call.

The patched model sets it around a packed call, and every patched decoder layer sets it again around its own body,
so that gradient checkpointing, which recomputes a layer in the backward pass (outside the call), sees the same
boundaries. Layers read it with :func:`active_boundaries`; nothing re-derives the documents from masks or positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deltapack.boundaries import Boundaries

__all__ = ["active_boundaries", "packing_scope"]

_ACTIVE: ContextVar[Boundaries | None] = ContextVar("deltapack_active_boundaries", default=None)


def active_boundaries() -> Boundaries | None:
    """The boundaries of the packed call in progress, or None outside one."""
    return _ACTIVE.get()


@contextmanager
def packing_scope(bounds: Boundaries | None) -> Iterator[None]:
    """Make ``bounds`` the active boundaries inside the ``with`` block (None: an unpacked region)."""
    token = _ACTIVE.set(bounds)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
