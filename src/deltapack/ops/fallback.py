"""What every fast backend shares: its check against the exact reference on first use, and the record of a kernel
that fails later, at run time, after which the exact reference runs for the rest of the process.

Both exist so that a kernel that does not work on this GPU (some FLA backwards refuse Hopper with some Triton
versions, a Triton build that does not compile) never crashes a training step and never gives a wrong answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

logger = logging.getLogger("deltapack")


class KernelFailure:
    """The first run-time failure of a fast kernel in this process (false until one fails).

    ``record(exc)`` keeps the first failure and logs it once as a warning saying that ``op`` runs on the exact
    reference from then on; the op's fast path (or its verifier) then takes the reference while it is true.
    """

    def __init__(self, kernel: str, op: str) -> None:
        self.kernel, self.op = kernel, op
        self.reason = ""

    def __bool__(self) -> bool:
        return bool(self.reason)

    def __repr__(self) -> str:
        return f"KernelFailure({self.kernel!r}: {self.reason or 'none'})"

    def record(self, exc: BaseException, stage: str = "") -> None:
        if not self.reason:
            where = f" in its {stage}" if stage else ""
            self.reason = f"{self.kernel} failed{where} ({type(exc).__name__}: {exc})"
            logger.warning("deltapack: %s; %s runs on the exact reference from now on", self.reason, self.op)


class Fallback(NamedTuple):
    """Where a kernel's run-time failure is recorded, and the exact function (the kernel's arguments) whose autograd
    then computes that call."""

    failure: KernelFailure
    reference: Callable[..., torch.Tensor]


def check_fast_backend(
    name: str,
    fast: Callable[..., torch.Tensor],
    ref: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    tol: float = 2e-2,
    failure: KernelFailure | None = None,
) -> None:
    """Run ``fast(*inputs)`` and the fp32 ``ref`` on upcast copies forward and backward; raise RuntimeError when
    ``fast`` raises, when ``failure`` recorded a kernel failure meanwhile (a fast path that catches its own kernel's
    exceptions), or when its output or a gradient is off by more than ``tol`` (relative L2; bf16 itself is ~4e-3).

    For a backend's ``load()``: a kernel that fails on this GPU (some FLA backwards refuse Hopper with some Triton
    versions) is then refused once per process, with a logged warning, and the exact reference runs instead of a
    crash in the middle of a training step.
    """

    def run(fn: Callable[..., torch.Tensor], xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = fn(*xs)
        up = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape).to(out.dtype)
        return [out, *torch.autograd.grad(out, xs, up)]

    with torch.enable_grad(), torch.autocast(inputs[0].device.type, enabled=False):
        try:
            got = run(fast, [t.detach().requires_grad_() for t in inputs])
        except Exception as exc:  # noqa: BLE001 - any failure: the kernel is not usable here
            raise RuntimeError(f"{name} raised on this device: {type(exc).__name__}: {exc}") from exc
        want = run(ref, [t.detach().float().requires_grad_() for t in inputs])
    if failure:
        raise RuntimeError(f"{name} failed on this device: {failure.reason}")
    for what, g, w in zip(("output", *(f"gradient {i}" for i in range(len(inputs)))), got, want):
        g, w = g.detach().double(), w.detach().double()
        err = float((g - w).norm() / w.norm().clamp_min(1e-30))
        if not err <= tol:  # also catches NaN
            raise RuntimeError(f"{name} is off on this device: {what} relative error {err:.3g} > {tol}")
