"""How many times the host waits for the GPU while a function runs: deltapack's layers keep it at zero (every
per-batch value the host needs is computed once, from host copies, before the layers run)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["count_host_syncs"]


def count_host_syncs(fn: Callable[[], Any]) -> int:
    """The host syncs CUDA reports while ``fn()`` runs (torch's sync debug mode, one warning per sync); CUDA only."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # torch words each one "called a synchronizing CUDA operation" (setting the mode adds an unrelated notice)
    return sum("called a synchronizing cuda operation" in str(w.message).lower() for w in caught)
