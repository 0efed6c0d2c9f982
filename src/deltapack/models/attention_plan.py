"""GPU attention plan: placeholder (filled in below)."""

from __future__ import annotations

from typing import Any


class PackedMask:
    pass


def packed_mask(impl: str, bounds: Any, call: dict[str, Any]) -> PackedMask | None:
    return None


def run_packed_attention(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError
