"""Causal varlen attention over a packed stream: each token attends to the earlier tokens of its own document.

One public function, :func:`varlen_attention`, and its reference :func:`varlen_attention_ref` with the same
arguments. Backends, in the order the automatic choice tries them:

- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash attention inside torch, CUDA, fp16/bf16).
  Grouped KV heads are passed as they are (the flash kernel takes them), with ``enable_gqa`` where torch asks for it.
- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` when the flash-attn package is installed.
- ``reference``: SDPA with an exact block-diagonal causal mask [T, T]: quadratic in memory, any device and dtype.

The choice: the ``backend=`` argument, then the ``DELTAPACK_ATTENTION_BACKEND`` environment variable, then
automatic. A backend asked for by name that cannot run raises; the automatic choice falls back to the reference.
Measured on an H200 (32768 tokens of 40 documents, 16 query / 4 KV heads, head_dim 256, bf16, forward+backward,
torch 2.11): varlen 8.8 ms against 283 ms for SDPA with the block mask.

Legend: T = tokens of the packed stream, Hq / Hkv = query / key-value heads, D = head dim, N = documents.
"""

from __future__ import annotations

import inspect
import logging
import os
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("deltapack")

ATTENTION_BACKENDS = ("torch_varlen", "flash_attn", "reference")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_logged: set[str] = set()


@lru_cache(maxsize=1)
def _torch_varlen() -> tuple[Any, frozenset[str]] | None:
    """(varlen_attn, its keyword names) when this torch has it and CUDA is there, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@lru_cache(maxsize=1)
def _flash_attn() -> Any | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - a broken flash-attn build is the same as none
        return None
    return flash_attn_varlen_func


def _runnable(backend: str, q: torch.Tensor) -> bool:
    if backend == "reference":
        return True
    fast_inputs = q.is_cuda and q.dtype in _FLASH_DTYPES and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
    if backend == "torch_varlen":
        return fast_inputs and _torch_varlen() is not None
    return fast_inputs and _flash_attn() is not None


def resolve_attention_backend(backend: str | None, q: torch.Tensor) -> str:
    """The backend that runs :func:`varlen_attention` for ``q``: argument, DELTAPACK_ATTENTION_BACKEND, automatic."""
    requested = backend or os.environ.get("DELTAPACK_ATTENTION_BACKEND") or "auto"
    if requested not in (*ATTENTION_BACKENDS, "auto"):
        raise ValueError(
            f"unknown deltapack attention backend {requested!r}; expected one of {ATTENTION_BACKENDS} or 'auto'"
        )
    if requested == "auto":
        chosen = next(b for b in ATTENTION_BACKENDS if _runnable(b, q))
    elif not _runnable(requested, q):
        raise RuntimeError(
            f"deltapack attention backend {requested!r} cannot run here (device {q.device.type}, dtype {q.dtype}, "
            f"head_dim {q.shape[-1]}); it needs CUDA fp16/bf16 inputs, head_dim <= 256, and "
            f"{'torch.nn.attention.varlen' if requested == 'torch_varlen' else 'the flash-attn package'}"
        )
    else:
        chosen = requested
    if chosen not in _logged:
        _logged.add(chosen)
        logger.info("deltapack: full attention runs on the %s backend", chosen)
    return chosen


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor | None
) -> None:
    same_tokens = cu_seqlens_k is not None or k.shape[0] == q.shape[0]
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or not same_tokens or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"expected q [T, Hq, D] and k, v [{'Tk' if cu_seqlens_k is not None else 'T'}, Hkv, D], got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key-value heads ({k.shape[1]})")
    for name, cu in (("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k)):
        if cu is not None and (cu.dim() != 1 or cu.dtype != torch.int32):
            raise ValueError(f"{name} must be 1-D int32 [N + 1], got {tuple(cu.shape)} {cu.dtype}")
    if cu_seqlens_k is not None and cu_seqlens_k.shape != cu_seqlens.shape:
        raise ValueError(
            f"cu_seqlens_k has {cu_seqlens_k.numel()} offsets and cu_seqlens {cu_seqlens.numel()}; expected one key "
            "segment per query segment"
        )


def _segments(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([total] segment of each token, [total] its offset inside the segment) for offsets ``cu`` [N + 1]."""
    lengths = (cu[1:] - cu[:-1]).long()
    seg = torch.arange(lengths.numel(), device=cu.device).repeat_interleave(lengths, output_size=total)
    return seg, torch.arange(total, device=cu.device) - cu.long()[seg]


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Reference: SDPA over the whole stream with an exact block causal mask. Same arguments as varlen_attention.

    ``seq_idx`` ([1, T] int, the document of each token) saves deriving it from ``cu_seqlens`` (self-attention only).
    """
    _check(q, k, v, cu_seqlens, cu_seqlens_k)
    total = q.shape[0]
    if cu_seqlens_k is None:
        doc = seq_idx.reshape(-1) if seq_idx is not None else _segments(cu_seqlens, total)[0]
        pos = torch.arange(total, device=q.device)
        allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    else:  # causal aligned bottom-right: a segment's last query sees its last key
        q_seg, q_off = _segments(cu_seqlens, total)
        k_seg, k_off = _segments(cu_seqlens_k, k.shape[0])
        shift = ((cu_seqlens_k[1:] - cu_seqlens_k[:-1]) - (cu_seqlens[1:] - cu_seqlens[:-1])).long()
        allowed = (q_seg[:, None] == k_seg[None, :]) & (k_off[None, :] <= (q_off + shift[q_seg])[:, None])
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


def _run_torch_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_k: int,
) -> torch.Tensor:
    varlen_attn, params = _torch_varlen()
    kwargs: dict[str, Any] = {"scale": scale}
    if "is_causal" in params:  # torch 2.10 / 2.11
        kwargs["is_causal"] = True
    else:  # later torch: causal is the window (-1, 0)
        kwargs["window_size"] = (-1, 0)
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = k.shape[1] != q.shape[1]
    # torch 2.10 / 2.11 take no enable_gqa and hand grouped heads straight to the flash kernel, which supports them:
    # on an H200 (torch 2.11, 32768 tokens, 16/4 heads) the same output as expanded heads, bit for bit, 3-5% faster
    if "num_splits" in params:
        kwargs["num_splits"] = 1  # no split-KV: a document's result never depends on the longest one in the batch
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, **kwargs)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    seq_idx: torch.Tensor | None = None,
    backend: str | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Causal attention inside each document of a packed stream.

    Args:
        q: [T, Hq, D]. k, v: [T, Hkv, D] (or [Tk, Hkv, D] with ``cu_seqlens_k``), Hq a multiple of Hkv.
        cu_seqlens: [N + 1] int32 document offsets on q's device. max_seqlen: longest document (host int).
        scale: softmax scale, default D ** -0.5.
        seq_idx: optional [1, T] document index per token (used by the reference only).
        backend: "torch_varlen", "flash_attn", "reference" or None (automatic).
        cu_seqlens_k, max_seqlen_k: key segments when they differ from the query segments (flash-attn's varlen
            convention): segment n's queries ``cu_seqlens[n]:cu_seqlens[n + 1]`` are the *last* queries of a
            document whose keys are ``cu_seqlens_k[n]:cu_seqlens_k[n + 1]``, causal aligned bottom-right. Context
            parallelism uses it: a rank's piece of a document against the document's keys up to the piece's end.

    Returns:
        [T, Hq, D] in the dtype of q.
    """
    _check(q, k, v, cu_seqlens, cu_seqlens_k)
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
        reference_kwargs: dict[str, Any] = {"seq_idx": seq_idx}
    else:
        if max_seqlen_k is None:
            raise ValueError("cu_seqlens_k needs max_seqlen_k (the longest key segment, a host int)")
        reference_kwargs = {"cu_seqlens_k": cu_seqlens_k, "max_seqlen_k": max_seqlen_k}
    chosen = resolve_attention_backend(backend, q)
    if chosen == "torch_varlen":
        return _run_torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k, max_seqlen_k)
    if chosen == "flash_attn":
        return _flash_attn()(
            q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, dropout_p=0.0, softmax_scale=scale, causal=True
        )
    return varlen_attention_ref(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale, **reference_kwargs)
