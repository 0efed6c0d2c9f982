"""Causal varlen attention over a packed stream: each token attends to the earlier tokens of its own document.

One public op, :func:`varlen_attention`, and its reference :func:`varlen_attention_ref` with the same arguments.
Backends, in the order the automatic choice tries them (:mod:`deltapack.ops.dispatch` decides):

- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash attention inside torch, CUDA, fp16/bf16).
  Grouped KV heads are passed as they are (the flash kernel takes them), with ``enable_gqa`` where torch asks for it.
- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` when the flash-attn package is installed.
- ``reference``: SDPA with an exact block-diagonal causal mask [T, T]: quadratic in memory, any device and dtype.

The choice: the ``backend=`` argument, then the ``DELTAPACK_ATTENTION_BACKEND`` environment variable, then
automatic. A backend asked for by name that cannot run raises; the automatic choice falls back to the reference.
The measured speed of each is in ``benchmarks/RESULTS.md``.

Legend: T = tokens of the packed stream, Hq / Hkv = query / key-value heads, D = head dim, N = documents.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deltapack.ops import opaque
from deltapack.ops.dispatch import Backend, register_op
from deltapack.ops.segments import Segments

__all__ = [
    "ATTENTION_BACKENDS",
    "VARLEN_ATTENTION",
    "resolve_attention_backend",
    "varlen_attention",
    "varlen_attention_ref",
]

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, segments_k: Segments | None) -> None:
    keys = segments if segments_k is None else segments_k
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"expected q [T, Hq, D] and k, v [Tk, Hkv, D], got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if q.shape[0] != segments.total_tokens or k.shape[0] != keys.total_tokens:
        raise ValueError(
            f"q has {q.shape[0]} tokens and k {k.shape[0]}; expected the {segments.total_tokens} query and "
            f"{keys.total_tokens} key tokens the segments describe"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key-value heads ({k.shape[1]})")
    if keys.num_docs != segments.num_docs:
        raise ValueError(
            f"segments_k has {keys.num_docs} segments and segments {segments.num_docs}; expected one key segment per "
            "query segment"
        )


def _positions(segments: Segments, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([T] segment of each token, [T] its offset inside the segment)."""
    seg = segments.seq_idx.reshape(-1).to(device, torch.long)
    return seg, torch.arange(seg.numel(), device=device) - segments.cu_seqlens.to(device).long()[seg]


def varlen_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    segments: Segments,
    scale: float | None = None,
    segments_k: Segments | None = None,
) -> Tensor:
    """Reference: SDPA over the whole stream with an exact block causal mask. Same arguments as varlen_attention."""
    _check(q, k, v, segments, segments_k)
    q_seg, q_off = _positions(segments, q.device)
    if segments_k is None:
        pos = torch.arange(q.shape[0], device=q.device)
        allowed = (q_seg[:, None] == q_seg[None, :]) & (pos[None, :] <= pos[:, None])
    else:  # causal aligned bottom-right: a segment's last query sees its last key
        k_seg, k_off = _positions(segments_k, q.device)
        lengths_q, lengths_k = (s.cu_seqlens.to(q.device).long().diff() for s in (segments, segments_k))
        allowed = (q_seg[:, None] == k_seg[None, :]) & (
            k_off[None, :] <= (q_off + (lengths_k - lengths_q)[q_seg])[:, None]
        )
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (k, v))
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=allowed[None, None],
        scale=scale,
    )
    return out[0].transpose(0, 1)


def _expand_kv(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    group = heads // k.shape[1]
    if group == 1:
        return k, v
    return tuple(t.unsqueeze(2).expand(-1, -1, group, -1).reshape(t.shape[0], heads, t.shape[2]) for t in (k, v))


def _verify_flash(name: str) -> Any:
    def verify(q: Tensor, k: Tensor, v: Tensor, *, segments: Segments, **options: Any) -> tuple[bool, str]:
        ok = q.is_cuda and q.dtype in _FLASH_DTYPES and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
        return ok, (
            f"q is {q.dtype} on {q.device.type} with head_dim {q.shape[-1]}; {name} needs CUDA fp16/bf16 inputs "
            "with head_dim <= 256, a multiple of 8"
        )

    return verify


def _flash_runner(kernel: Any) -> Any:
    """The backend function around a flash-style varlen ``kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale)``."""

    def run(q: Tensor, k: Tensor, v: Tensor, *, segments: Segments, **options: Any) -> Tensor:
        keys, scale = options.get("segments_k") or segments, options.get("scale")
        return kernel(q, k, v, segments.cu_seqlens, keys.cu_seqlens, segments.max_seqlen, keys.max_seqlen, scale)

    return run


def _load_torch_varlen() -> Any:
    from torch.nn.attention.varlen import varlen_attn

    params = frozenset(inspect.signature(varlen_attn).parameters)
    fixed: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}  # later torch
    if "num_splits" in params:
        fixed["num_splits"] = 1  # no split-KV: a document's result never depends on the longest one in the batch

    def kernel(q: Tensor, k: Tensor, v: Tensor, *offsets: Any) -> Tensor:
        *offsets, scale = offsets
        # torch 2.10 / 2.11 take no enable_gqa and hand grouped heads straight to the flash kernel, which supports
        # them: the same output as expanded heads, and faster (benchmarks/RESULTS.md)
        gqa = {"enable_gqa": k.shape[1] != q.shape[1]} if "enable_gqa" in params else {}
        return varlen_attn(q, k, v, *offsets, scale=scale, **fixed, **gqa)

    return _flash_runner(kernel)


def _load_flash_attn() -> Any:
    from flash_attn import flash_attn_varlen_func

    def kernel(q: Tensor, k: Tensor, v: Tensor, *offsets: Any) -> Tensor:
        *offsets, scale = offsets
        return flash_attn_varlen_func(q, k, v, *offsets, dropout_p=0.0, softmax_scale=scale, causal=True)

    return _flash_runner(kernel)


VARLEN_ATTENTION = register_op(  # meta: [T, Hq, D] in the dtype of q
    "varlen_attention", varlen_attention_ref, meta=opaque.like_first, env="DELTAPACK_ATTENTION_BACKEND"
)
VARLEN_ATTENTION.add_backend(
    Backend("torch_varlen", load=_load_torch_varlen, verify=_verify_flash("torch's varlen_attn"))
)
VARLEN_ATTENTION.add_backend(
    Backend(
        "flash_attn",
        load=_load_flash_attn,
        verify=_verify_flash("flash-attn"),
        package="flash_attn",
        hint="install the flash-attn package",
    )
)
ATTENTION_BACKENDS = VARLEN_ATTENTION.names


@functools.cache
def _probe_segments() -> Segments:
    return Segments.from_cu_seqlens([0, 1])


def resolve_attention_backend(backend: str | None, q: torch.Tensor) -> str:
    """The backend :func:`varlen_attention` would run for queries like ``q`` (its device, dtype and head dim; the
    verifiers read nothing else): argument, DELTAPACK_ATTENTION_BACKEND, automatic.

    Inside ``torch.compile`` (a compiled model or layer) the choice is not traced: it runs once when the graph is
    traced and its answer is a constant of the graph, which dynamo's guards on q's device, dtype and shape keep
    valid (the environment variable is read then: changing it later does not recompile the graph)."""
    if torch.compiler.is_compiling():
        return _resolved_when_traced(backend, q.device, q.dtype, q.shape[-1])
    return _resolve(backend, q)


def _resolve(backend: str | None, q: torch.Tensor) -> str:
    return VARLEN_ATTENTION.choose(q, q, q, segments=_probe_segments(), backend=backend)[0]


@torch.compiler.assume_constant_result
def _resolved_when_traced(backend: str | None, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The choice for queries [0, 1, head_dim] of this device and dtype, run in Python while dynamo traces."""
    return _resolve(backend, torch.empty(0, 1, head_dim, dtype=dtype, device=device))


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segments: Segments,
    scale: float | None = None,
    segments_k: Segments | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention inside each document of a packed stream.

    Args:
        q: [T, Hq, D]. k, v: [T, Hkv, D] (or [Tk, Hkv, D] with ``segments_k``), Hq a multiple of Hkv.
        segments: the documents of the stream (query segments).
        scale: softmax scale, default D ** -0.5.
        segments_k: key segments when they differ from the query segments (flash-attn's varlen convention):
            segment n's queries are the *last* queries of a document whose keys are segment n of ``segments_k``,
            causal aligned bottom-right. Context parallelism uses it: a rank's piece of a document against the
            document's keys up to the piece's end.
        backend: "torch_varlen", "flash_attn", "reference" or None (automatic).

    Returns:
        [T, Hq, D] in the dtype of q.
    """
    if torch.compiler.is_compiling() and segments_k is None:  # one opaque node (max_seqlen is no graph constant)
        options = {"segments": segments, "scale": scale, "backend": backend}
        if opaque.supports((q, k, v), options):
            return opaque.call(VARLEN_ATTENTION.name, VARLEN_ATTENTION.meta, (q, k, v), options)
    _check(q, k, v, segments, segments_k)
    return VARLEN_ATTENTION(q, k, v, segments=segments, scale=scale, segments_k=segments_k, backend=backend)


opaque.register(varlen_attention, VARLEN_ATTENTION)
