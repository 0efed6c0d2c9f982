"""The op registry and the one place that decides which backend runs an op.

An op family registers one exact reference and zero or more fast backends, each with a verifier in FLA's style:
``verify(*args, segments=..., **kwargs) -> (ok, reason)``, which reads only shapes, dtypes, devices and host ints
(never a device value, so choosing costs no host sync). :class:`Op` then runs, for every call:

1. the segments' own hook (:meth:`Segments.run_op`: context parallelism hands the op to its exchange);
2. the backend asked for by name: the ``backend=`` argument, else the op's environment variable
   (``DELTAPACK_BACKEND`` unless the op names another). A name the op does not know raises ValueError (for the shared
   ``DELTAPACK_BACKEND``: the op chooses automatically and says so, since one setting covers every op); a known
   backend whose verifier refuses the inputs, or whose kernels do not import, raises RuntimeError with the reason;
3. else automatically: the fastest backend (registration order) whose verifier accepts the inputs and whose kernels
   import, else the reference, which runs everywhere and is exact.

The choice is logged once per (op, backend, reason) on the ``deltapack`` logger, with the reason whenever it is not
the fastest backend. Kernels are imported on first use; an import that fails on a CUDA machine (anything but the
package simply not being installed) is a warning that carries the exception.

The GDN primitives below (``causal_conv1d``, ``gated_delta_rule``) are the public functions of the GDN layers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deltapack.ops import reference
from deltapack.ops.segments import Segments

logger = logging.getLogger("deltapack")

REFERENCE = "reference"
ENV = "DELTAPACK_BACKEND"
Verifier = Callable[..., tuple[bool, str]]


@dataclass(frozen=True)
class Backend:
    """A fast backend of one op.

    Attributes:
        name: what ``backend=`` and the environment variable call it (e.g. "fla").
        load: imports the kernels and returns the function that runs the op, with the reference's signature
            (``fn(*args, segments=..., **kwargs)``); called once, on first use. Any exception means: not available.
        verify: ``verify(*args, segments=..., **kwargs) -> (ok, reason)``: whether these inputs run exactly on this
            backend (device, dtypes, shapes, sizes), and why not. Must not read device values.
        package: the optional package the kernels come from (e.g. "fla"): its absence is "not installed", not a
            broken install worth a warning.
        hint: how to make the backend available, appended to the error when it is asked for and cannot run.
    """

    name: str
    load: Callable[[], Callable[..., Any]]
    verify: Verifier
    package: str | None = None
    hint: str = ""


class Op:
    """One op family: its exact reference, its fast backends (fastest first) and the choice between them.

    ``op(*args, segments=segments, backend=None, **kwargs)`` runs the op; the arguments are the reference's.
    """

    def __init__(self, name: str, reference: Callable[..., Any], *, env: str = ENV) -> None:
        self.name = name
        self.reference = reference
        self.env = env
        self.backends: dict[str, Backend] = {}
        self._loaded: dict[str, Callable[..., Any] | BaseException] = {}
        self._logged: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={[*self.backends, REFERENCE]})"

    @property
    def names(self) -> tuple[str, ...]:
        """Every backend of the op, fastest first, the reference last."""
        return (*self.backends, REFERENCE)

    def add_backend(self, backend: Backend) -> None:
        """Register a fast backend after those already registered (so register the fastest first)."""
        if backend.name == REFERENCE or backend.name in self.backends:
            raise ValueError(f"deltapack: op {self.name!r} already has a backend named {backend.name!r}")
        self.backends[backend.name] = backend

    # ------------------------------------------------------------------ the choice
    def _load(self, backend: Backend) -> Callable[..., Any] | BaseException:
        if backend.name not in self._loaded:
            try:
                self._loaded[backend.name] = backend.load()
            except Exception as exc:  # noqa: BLE001 - any failure means: this backend is not available
                self._loaded[backend.name] = exc
                missing = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == backend.package
                if torch.cuda.is_available() and not missing:
                    logger.warning(
                        "deltapack: the %s backend of %s failed to import on this CUDA machine; the exact reference "
                        "runs instead: %s: %s",
                        backend.name,
                        self.name,
                        type(exc).__name__,
                        exc,
                    )
        return self._loaded[backend.name]

    def _runs(self, backend: Backend, args: tuple, segments: Segments, kwargs: dict) -> tuple[bool, str]:
        ok, reason = backend.verify(*args, segments=segments, **kwargs)
        if not ok:
            return False, reason
        loaded = self._load(backend)
        if isinstance(loaded, BaseException):
            return False, f"its kernels do not import ({type(loaded).__name__}: {loaded})"
        return True, ""

    def choose(
        self, *args: Any, segments: Segments, backend: str | None = None, **kwargs: Any
    ) -> tuple[str, Callable[..., Any]]:
        """(name, function) of the backend that runs these inputs; the rules are in the module docstring."""
        requested, source = backend, "the backend= argument"
        if requested is None and os.environ.get(self.env):
            requested, source = os.environ[self.env], self.env
        why = ""
        if requested is not None and requested not in self.names:
            if source == ENV:
                why = f"{ENV}={requested} names no backend of {self.name}"
                requested = None
            else:
                raise ValueError(
                    f"unknown deltapack backend {requested!r} for {self.name} (from {source}); expected one of "
                    f"{self.names}"
                )
        if requested == REFERENCE:
            return self._chose(REFERENCE, self.reference, f"asked for by {source}")
        if requested is not None:
            fast = self.backends[requested]
            ok, reason = self._runs(fast, args, segments, kwargs)
            if not ok:
                raise RuntimeError(
                    f"deltapack backend {requested!r} was requested for {self.name} (by {source}) but cannot run "
                    f"here: {reason}" + (f"; {fast.hint}" if fast.hint else "")
                )
            return self._chose(requested, self._loaded[requested], "")
        reasons = [why] if why else []
        for fast in self.backends.values():
            ok, reason = self._runs(fast, args, segments, kwargs)
            if ok:
                return self._chose(fast.name, self._loaded[fast.name], "; ".join(reasons))
            reasons.append(f"{fast.name}: {reason}")
        return self._chose(REFERENCE, self.reference, "; ".join(reasons))

    def _chose(self, name: str, fn: Callable[..., Any], reason: str) -> tuple[str, Callable[..., Any]]:
        if (name, reason) not in self._logged:
            self._logged.add((name, reason))
            logger.info("deltapack: %s runs on the %s backend%s", self.name, name, f" ({reason})" if reason else "")
        return name, fn

    # ------------------------------------------------------------------ running
    def __call__(self, *args: Any, segments: Segments, backend: str | None = None, **kwargs: Any) -> Any:
        if not isinstance(segments, Segments):
            raise TypeError(
                f"deltapack: {self.name} got segments of type {type(segments).__name__}; expected a "
                "deltapack.ops.Segments (a batch's Boundaries carries one as .segments)"
            )
        hooked = segments.run_op(self.name, *args, backend=backend, **kwargs)
        if hooked is not NotImplemented:
            return hooked
        _, fn = self.choose(*args, segments=segments, backend=backend, **kwargs)
        return fn(*args, segments=segments, **kwargs)


OPS: dict[str, Op] = {}


def register_op(name: str, reference: Callable[..., Any], *, env: str = ENV) -> Op:
    """Create and register the :class:`Op` ``name`` with its exact reference; add fast backends with
    :meth:`Op.add_backend`. Raises ValueError when the name is taken."""
    if name in OPS:
        raise ValueError(f"deltapack: an op named {name!r} is already registered")
    OPS[name] = op = Op(name, reference, env=env)
    return op


# ---------------------------------------------------------------------------------------------- the GDN primitives
# (moving onto the registry above; until then they choose with resolve_backend)
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
