"""Public varlen primitives and the choice of backend behind them.

Backends: ``reference`` (pure PyTorch, any device, always there) and ``fla`` (FLA Triton kernels, CUDA).
The choice, in order: the ``backend=`` argument, the ``DELTAPACK_BACKEND`` environment variable, then automatic
(``fla`` for CUDA tensors when FLA imports, else ``reference``). A backend that is asked for by name and cannot run
raises; the automatic choice never silently drops document boundaries, since the reference is exact.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from deltapack.ops import reference

logger = logging.getLogger("deltapack")

BACKENDS = ("reference", "fla")
_logged: set[tuple[str, str]] = set()


def _fla_available() -> bool:
    try:
        from deltapack.ops import fla  # noqa: F401
    except ImportError:
        return False
    return fla.AVAILABLE


def resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """The backend that will run ``op`` on ``device``: argument, then DELTAPACK_BACKEND, then automatic."""
    requested = backend or os.environ.get("DELTAPACK_BACKEND") or "auto"
    if requested not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown deltapack backend {requested!r}; expected one of {BACKENDS} or 'auto'")
    if requested == "auto":
        chosen = "fla" if device.type == "cuda" and _fla_available() else "reference"
    else:
        chosen = requested
        if chosen == "fla" and not (device.type == "cuda" and _fla_available()):
            raise RuntimeError(
                f"deltapack backend 'fla' was requested for {op} but cannot run here "
                f"(device {device.type}, FLA importable: {_fla_available()}); install deltapack[gpu] on a CUDA machine "
                "or choose backend='reference'"
            )
    if (op, chosen) not in _logged:
        _logged.add((op, chosen))
        logger.info("deltapack: %s runs on the %s backend", op, chosen)
    return chosen


def _seq_idx_from_cu(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device, dtype=torch.int32)
    return ids.repeat_interleave(lengths, output_size=total).unsqueeze(0)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    cu_seqlens: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens_host: Sequence[int] | None = None,
    cache: dict[str, Any] | None = None,
    backend: str | None = None,
    context_parallel: Any = None,
) -> torch.Tensor:
    """Depthwise causal conv1d over a packed stream, cut at every document boundary.

    Args:
        x: [1, T, D] packed stream, channels last. weight: [D, W]. bias: [D] or None.
        activation: None or "silu".
        cu_seqlens: [N + 1] int32 document offsets (0, ..., T).
        seq_idx: [1, T] int32 document index per token (derived from cu_seqlens when not given).
        cu_seqlens_host: the offsets as host ints, so no backend needs a device sync.
        cache: a per-batch dict where a backend may keep index tensors it derives from the offsets.
        backend: "reference", "fla" or None (automatic).
        context_parallel: this rank's ``deltapack.distributed.ContextShard`` when x is one rank's part of a stream
            split across ranks (cu_seqlens are then its local pieces); the conv reads the earlier tokens of a cut
            document from the previous rank.

    Returns:
        [1, T, D] in the dtype of x.
    """
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(f"x must be one packed stream [1, T, D], got shape {tuple(x.shape)}")
    if context_parallel is not None:
        from deltapack.distributed import ops as cp_ops

        return cp_ops.causal_conv1d(x, weight, bias, activation, shard=context_parallel, backend=backend)
    if seq_idx is None:
        seq_idx = _seq_idx_from_cu(cu_seqlens, x.shape[1])
    chosen = resolve_backend(backend, x.device, "causal_conv1d")
    if chosen == "fla":
        from deltapack.ops import fla

        return fla.causal_conv1d(
            x,
            weight,
            bias,
            activation,
            cu_seqlens=cu_seqlens,
            seq_idx=seq_idx,
            cu_seqlens_host=cu_seqlens_host,
            cache=cache,
        )
    return reference.causal_conv1d_ref(x, weight, bias, activation, seq_idx=seq_idx)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor,
    cu_seqlens_host: Sequence[int] | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    output_final_state: bool = False,
    cache: dict[str, Any] | None = None,
    backend: str | None = None,
    context_parallel: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over a packed stream; the state starts at zero for each document.

    Args:
        q, k: [1, T, Hk, K]. v: [1, T, Hv, V], Hv = r * Hk (grouped value heads).
        g: [1, T, Hv] log-decay (fp32 preferred). beta: [1, T, Hv] in (0, 1).
        cu_seqlens: [N + 1] int32 document offsets. cu_seqlens_host: the same as host ints.
        scale: query scale (default K ** -0.5). use_qk_l2norm: L2-normalise q and k as the model does.
        output_final_state: also return [N, Hv, K, V] fp32 final states.
        cache, backend, context_parallel: as in :func:`causal_conv1d` (under context parallelism the state of a cut
            document is handed over from the previous rank; final states are not returned).

    Returns:
        (o [1, T, Hv, V] in the dtype of q, final states or None).
    """
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"q must be one packed stream [1, T, Hk, K], got shape {tuple(q.shape)}")
    if context_parallel is not None:
        from deltapack.distributed import ops as cp_ops

        if output_final_state:
            raise ValueError("deltapack: output_final_state under context parallelism; expected False")
        return cp_ops.gated_delta_rule(
            q, k, v, g, beta, shard=context_parallel, scale=scale, use_qk_l2norm=use_qk_l2norm, backend=backend
        )
    chosen = resolve_backend(backend, q.device, "gated_delta_rule")
    if chosen == "fla":
        from deltapack.ops import fla

        return fla.gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            cu_seqlens=cu_seqlens,
            cu_seqlens_host=cu_seqlens_host,
            scale=scale,
            use_qk_l2norm=use_qk_l2norm,
            output_final_state=output_final_state,
            cache=cache,
        )
    return reference.gated_delta_rule_ref(
        q,
        k,
        v,
        g,
        beta,
        cu_seqlens=cu_seqlens,
        cu_seqlens_host=cu_seqlens_host,
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
        output_final_state=output_final_state,
    )
