"""Kimi delta attention (KDA) over a packed stream: the gated delta rule with a per-channel decay, state reset per
document.

The recurrence per value head h, token t (S is [K, V], g_t is a [K] log-decay, one per key channel):
    S = diag(exp(g_t)) S;  S = S + beta_t * k_t (v_t - S^T k_t)^T;  o_t = S^T (scale * q_t)
with q and k L2-normalised first when ``use_qk_l2norm`` (what kimi_linear, bailing_hybrid and glm5_next ask for),
``scale`` = K ** -0.5 by default. This is FLA's ``chunk_kda`` / ``naive_recurrent_kda`` and transformers' torch
fallback ``chunk_kimi_delta_attention`` on each document alone.

- :func:`kda_ref`: exact, chunked, pure PyTorch (autograd, any device): the oracle and the CPU path; the gated
  delta rule's reference (:func:`deltapack.ops.reference.gated_delta_rule_ref`), which takes a per-channel decay.
- :func:`kda`: the public op; FLA's ``chunk_kda`` with ``cu_seqlens`` for bf16 / fp16 on CUDA, else the reference.
  FLA builds its chunk index from the host offsets (a host sync per call); deltapack hands it the batch's device
  index instead (:mod:`deltapack.ops.fla_index`), so a packed forward+backward makes no host sync.

Legend: T = tokens of the packed stream, N = documents, H / Hv = key / value heads (Hv = r * H), K / V = head dims,
C = chunks, L = chunk length.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from deltapack.ops import opaque
from deltapack.ops.dispatch import fla_backend, public_function, register_op
from deltapack.ops.fallback import KernelFailure, check_fast_backend
from deltapack.ops.fla import verify_chunked
from deltapack.ops.fla_index import host_offsets
from deltapack.ops.fla_index import install as install_chunk_index
from deltapack.ops.reference import gated_delta_rule_ref
from deltapack.ops.segments import Segments
from deltapack.ops.varlen import check_stream

__all__ = ["KDA", "kda", "kda_ref"]


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, segments: Segments
) -> None:
    check_stream("q", q, segments, 4)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    _, total, heads, head_k = q.shape
    if v.dim() != 4 or v.shape[:2] != q.shape[:2] or v.shape[2] % heads:
        raise ValueError(
            f"v must be [1, T, Hv, V] with T = {total} and Hv a multiple of H = {heads}, got {tuple(v.shape)}"
        )
    hv = v.shape[2]
    if tuple(g.shape) != (1, total, hv, head_k):
        raise ValueError(
            f"g must be [1, T, Hv, K] = {(1, total, hv, head_k)} (per-channel decay), got {tuple(g.shape)}"
        )
    if tuple(beta.shape) != (1, total, hv):
        raise ValueError(f"beta must be [1, T, Hv] = {(1, total, hv)}, got {tuple(beta.shape)}")


# KDA is the gated delta rule with one decay per key channel: one reference serves both ops
kda_ref = gated_delta_rule_ref


_fla_failure = KernelFailure("FLA's chunk_kda", "kda")  # its first run-time failure in this process, if any


class _WithReference(torch.autograd.Function):
    """A fast kernel with the exact reference as its net: a kernel that raises, in the forward or in the backward,
    is caught (once per process: the verifier refuses FLA afterwards) and the reference computes that call. (The
    first-use check catches a kernel that fails or is off on a small probe; this catches one that fails later, on a
    length the probe did not reach.)"""

    @staticmethod
    def forward(ctx, fast: Callable[..., torch.Tensor], ref: Callable[..., torch.Tensor], *inputs: torch.Tensor):
        ctx.ref = ref
        ctx.leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
        with torch.enable_grad():
            try:
                ctx.out = fast(*ctx.leaves)
            except Exception as exc:  # noqa: BLE001 - any kernel failure: the reference is exact
                _fla_failure.record(exc, "forward")
                ctx.out = ref(*ctx.leaves)
        return ctx.out.detach()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        wanted = [t for t in ctx.leaves if t.requires_grad]
        try:
            grads = torch.autograd.grad(ctx.out, wanted, grad_out, allow_unused=True)
        except Exception as exc:  # noqa: BLE001 - any kernel failure: the reference is exact
            _fla_failure.record(exc, "backward")
            with torch.enable_grad():
                grads = torch.autograd.grad(ctx.ref(*ctx.leaves), wanted, grad_out, allow_unused=True)
        ctx.out = None
        it = iter(grads)
        return (None, None, *(next(it) if t.requires_grad else None for t in ctx.leaves))


_checked: set[tuple] = set()  # the head shapes and dtypes FLA's chunk_kda was checked on in this process


def _checked_on_first_use(chunk_kda: Callable[..., tuple], q: torch.Tensor, v: torch.Tensor, g, beta) -> bool:
    """Forward and backward of FLA's chunk_kda against the reference, once per head shape and dtypes, on a 76-token
    probe (a 1-token document, one inside a chunk, one across): a kernel that raises or is off on this GPU is refused
    for the process, with a warning. The probe has the call's heads and head dims, so it tunes the very kernels the
    call then runs (FLA's autotuning keys on heads and dims, not on length): it costs no extra compilation."""
    key = (q.shape[2], v.shape[2], q.shape[3], v.shape[3], q.dtype, g.dtype, beta.dtype, q.device)
    if key in _checked:
        return not _fla_failure
    _checked.add(key)
    heads, hv, dk, dv = key[:4]
    probe = Segments.from_cu_seqlens([0, 1, 6, 76], q.device)
    gen = torch.Generator(device=q.device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=q.device, generator=gen)

    inputs = [
        rand(1, 76, heads, dk).to(q.dtype),
        rand(1, 76, heads, dk).to(q.dtype),
        rand(1, 76, hv, dv).to(v.dtype),
        (-rand(1, 76, hv, dk).abs() * 0.5).to(g.dtype),
        rand(1, 76, hv).sigmoid().to(beta.dtype),
    ]
    cu_cpu = probe.plan(host_offsets)

    def fast(*xs: torch.Tensor) -> torch.Tensor:
        return chunk_kda(*xs, use_qk_l2norm_in_kernel=True, cu_seqlens=probe.cu_seqlens, cu_seqlens_cpu=cu_cpu)[0]

    try:
        check_fast_backend("FLA's chunk_kda", fast, lambda *xs: kda_ref(*xs, segments=probe)[0], inputs)
    except RuntimeError as exc:
        _fla_failure.record(exc, "first-use check")
        return False
    return not _fla_failure


def _load_fla() -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    from fla.ops.kda import chunk_kda

    # the batch's device chunk index instead of the one FLA builds on the host
    install_chunk_index(importlib.import_module("fla.ops.kda.chunk"))

    def run(
        q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, segments: Segments, **options: Any
    ) -> tuple[Tensor, Tensor | None]:
        scale, use_qk_l2norm = options.get("scale"), options.get("use_qk_l2norm", True)
        output_final_state, initial_state = options.get("output_final_state", False), options.get("initial_state")

        # the decay and beta come in as the model forms them; the L2 norm runs in the kernel, as transformers calls it
        def fast(*inputs: torch.Tensor) -> torch.Tensor:
            o, _ = chunk_kda(
                *inputs,
                scale=scale,
                use_qk_l2norm_in_kernel=use_qk_l2norm,
                cu_seqlens=segments.cu_seqlens,
                cu_seqlens_cpu=segments.plan(host_offsets),
            )
            return o

        def ref(*inputs: torch.Tensor) -> torch.Tensor:
            return kda_ref(*inputs, segments=segments, scale=scale, use_qk_l2norm=use_qk_l2norm)[0]

        if not _checked_on_first_use(chunk_kda, q, v, g, beta):
            return kda_ref(q, k, v, g, beta, segments=segments, scale=scale, use_qk_l2norm=use_qk_l2norm)
        if output_final_state or initial_state is not None:  # not what the layers ask for: FLA as it is
            return chunk_kda(
                q,
                k,
                v,
                g,
                beta,
                scale=scale,
                initial_state=initial_state,
                output_final_state=output_final_state,
                use_qk_l2norm_in_kernel=use_qk_l2norm,
                cu_seqlens=segments.cu_seqlens,
                cu_seqlens_cpu=segments.plan(host_offsets),
            )
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta))):
            try:  # no backward to come: no graph to keep
                return fast(q, k, v, g, beta), None
            except Exception as exc:  # noqa: BLE001 - any kernel failure: the reference is exact
                _fla_failure.record(exc, "forward")
                return ref(q, k, v, g, beta), None
        return _WithReference.apply(fast, ref, q, k, v, g, beta), None

    return run


def _verify_fla(q: Tensor, k: Tensor, v: Tensor, *_: Tensor, segments: Segments, **__: object) -> tuple[bool, str]:
    if _fla_failure:
        return False, _fla_failure.reason
    return verify_chunked(q, k, v, segments, "FLA's chunk_kda")


# meta as the gated delta rule's: o like v in the dtype of q, final states
KDA = register_op("kda", kda_ref, fla_backend(_load_fla, _verify_fla), meta=opaque.delta_rule_outputs)


kda = public_function(
    KDA,
    """KDA over a packed stream, state reset per document (arguments and results as in :func:`kda_ref`).

    Backends: "fla" (CUDA, bf16 / fp16, head dims <= 256: FLA's ``chunk_kda`` with ``cu_seqlens``, the host
    offsets and the batch's device chunk index, no host sync; see :mod:`deltapack.ops.fla_index`) or "reference";
    None chooses (see :mod:`deltapack.ops.dispatch`).
    """,
    check=_check,
)
