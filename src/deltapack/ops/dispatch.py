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
"""

from __future__ import annotations

import inspect
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deltapack.ops import opaque
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


FLA_HINT = "install deltapack[gpu] on a CUDA machine or choose backend='reference'"


def fla_backend(load: Callable[[], Callable[..., Any]], verify: Verifier, name: str = "fla") -> Backend:
    """A backend on FLA's kernels (flash-linear-attention, the ``gpu`` extra)."""
    return Backend(name, load=load, verify=verify, package="fla", hint=FLA_HINT)


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
        self.ran: Counter[str] = Counter()  # how many calls each backend took (clear it to watch a stretch of calls)
        # meta(*args, segments=..., **kwargs): empty tensors of the output's shapes and dtypes (None where the op
        # returns None), reading only shapes (the number of documents as segments.num_docs); with it, the op is one
        # opaque node of a torch.compile graph (deltapack.ops.opaque), without it a graph break
        self.meta: Callable[..., Any] | None = None

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
        self.ran[name] += 1
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
        if torch.compiler.is_compiling():  # one opaque node (deltapack.ops.opaque), or outside the graph
            options = {"segments": segments, "backend": backend, **kwargs}
            if self.meta is not None and opaque.supports(args, options):
                return opaque.call(self.name, self.meta, args, options)
            return _outside_graph(self, *args, **options)
        hooked = segments.run_op(self.name, *args, backend=backend, **kwargs)
        if hooked is not NotImplemented:
            return hooked
        return self.run(*args, segments=segments, backend=backend, **kwargs)

    def run(self, *args: Any, segments: Segments, backend: str | None = None, **kwargs: Any) -> Any:
        """The chosen backend on these inputs, without the segments' hook (what a hook itself calls)."""
        _, fn = self.choose(*args, segments=segments, backend=backend, **kwargs)
        return fn(*args, segments=segments, **kwargs)


OPS: dict[str, Op] = {}


def public_function(op: Op, doc: str, check: Callable[..., None] | None = None) -> Callable[..., Any]:
    """The public function of ``op``: the signature of its reference plus ``backend=None`` (mamba_ssm's ``fn`` /
    ``ref`` twins, with the argument list written once, in the reference), named after the op, documented by
    ``doc``. A call binds its arguments to that signature (TypeError for an unknown or missing one), runs
    ``check(*positional_args, segments)`` when given (ValueError on malformed inputs), then the op.

    Inside ``torch.compile`` the call is one opaque node that runs all of this eagerly (:mod:`deltapack.ops.opaque`)
    when the op has a ``meta``; otherwise the op runs outside the graph (a graph break)."""
    ref = inspect.signature(op.reference)
    backend = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | None")
    signature = ref.replace(parameters=[*ref.parameters.values(), backend])

    def fn(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            if op.meta is not None and opaque.supports(args, kwargs):
                return opaque.call(op.name, op.meta, args, kwargs)
            return _outside_graph(fn, *args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        if check is not None:
            check(*bound.args, bound.kwargs["segments"])
        return op(*bound.args, **bound.kwargs)

    fn.__name__ = fn.__qualname__ = op.name
    fn.__module__ = op.reference.__module__
    fn.__doc__ = doc
    fn.__signature__ = signature  # type: ignore[attr-defined]
    opaque.register(fn, op)
    return fn


@torch._dynamo.disable
def _outside_graph(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """An op without a meta function (or on a context-parallel shard) inside torch.compile: run eagerly."""
    return fn(*args, **kwargs)


def register_op(
    name: str,
    reference: Callable[..., Any],
    *backends: Backend,
    meta: Callable[..., Any] | None = None,
    env: str = ENV,
) -> Op:
    """Create and register the :class:`Op` ``name`` with its exact reference, its fast ``backends`` (fastest
    first; more with :meth:`Op.add_backend`) and its ``meta`` (the output's shapes, for torch.compile; see
    :attr:`Op.meta`). Raises ValueError when the name is taken."""
    if name in OPS:
        raise ValueError(f"deltapack: an op named {name!r} is already registered")
    OPS[name] = op = Op(name, reference, env=env)
    opaque.register(op, op)  # until public_function names the op's public function
    for backend in backends:
        op.add_backend(backend)
    op.meta = meta
    return op
