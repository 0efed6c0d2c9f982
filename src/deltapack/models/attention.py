"""Full-attention layers under packing: each query sees only the earlier tokens of its own document.

The decoder runs on the unpadded stream [1, total]; what the transformers attention layers need to keep documents
apart is built here from the batch's boundaries, once per forward:

- ``eager`` / ``sdpa``: an exact block-diagonal causal mask [1, 1, total, total] (bool for sdpa, additive for
  eager). It is quadratic in memory: fine on the CPU and for tests, and the reason the GPU path uses varlen.
- flash-attention implementations: no mask, and the varlen kwargs ``cu_seq_lens_q/k``, ``max_length_q/k`` taken
  from the boundaries (transformers passes them straight to the varlen kernel).
- ``eager`` / ``sdpa`` on CUDA, when a varlen kernel runs there (see :mod:`deltapack.ops.attention`): no mask;
  the patched full-attention modules run :func:`packed_attention_forward`, which computes q, k, v, the output gate
  and rope exactly as the transformers module does and calls :func:`deltapack.ops.attention.varlen_attention`
  with the same segments. The decision is made once per batch (:func:`attention_inputs`) and kept in
  ``Boundaries.choices``, so the mask and the modules always agree.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from deltapack.boundaries import Boundaries
from deltapack.ops.attention import resolve_attention_backend, varlen_attention

MASKED = ("eager", "sdpa")
ATTENTION_MODULES = "_deltapack_attention_modules"  # on a patched decoder stack: its full-attention modules
CONTEXT_PARALLEL = "deltapack_context_parallel"  # deltapack.distributed.attention registers it with transformers
# the full-attention classes whose forward packed_attention_forward reproduces (q/k/v, output gate, rope)
FULL_ATTENTION_CLASSES = ("Qwen3_5Attention", "Qwen3_5MoeAttention", "Qwen3NextAttention")
WRAPPED_ATTR = "_deltapack_attn_inner"  # where patch() keeps a wrapped attention module's own forward
VARLEN_DEVICES = ("cuda",)  # devices whose batches may take the varlen path (tests add "cpu" with a CPU stand-in)


def is_full_attention(module: nn.Module) -> bool:
    """True for the transformers full-attention modules that :func:`packed_attention_forward` can run."""
    return type(module).__name__ in FULL_ATTENTION_CLASSES and hasattr(module, "q_proj")


def _varlen_backend(bounds: Boundaries, text_model: nn.Module | None, dtype: torch.dtype) -> str | None:
    """The varlen backend for this batch's full-attention layers, or None to keep the exact mask."""
    if bounds.device.type not in VARLEN_DEVICES or text_model is None:
        return None
    config = text_model.config
    if text_model.training and getattr(config, "attention_dropout", 0.0):
        return None  # varlen kernels run without dropout: keep the masked path, which applies it
    attention = text_model.__dict__.get(ATTENTION_MODULES)  # listed by deltapack.patch, so no walk per batch
    if attention is None:
        attention = [m for m in text_model.modules() if is_full_attention(m)]
    if not attention or not all(WRAPPED_ATTR in m.__dict__ for m in attention):
        return None
    probe = torch.empty(0, 1, attention[0].head_dim, dtype=dtype, device=bounds.device)
    backend = resolve_attention_backend(None, probe)  # under torch.compile: a constant of the graph, not traced
    return None if backend == "reference" else backend


def varlen_backend_of(bounds: Boundaries) -> str | None:
    """The varlen backend :func:`attention_inputs` chose for this batch (None: the masked path)."""
    return bounds.choices.varlen_attention


def _context_parallel_inputs(bounds: Boundaries, implementation: str) -> tuple[None, dict[str, Any]]:
    """One rank's tokens of a stream split across ranks: the context-parallel attention reads the shard itself."""
    if not bounds.segments.is_shard or implementation != CONTEXT_PARALLEL:
        raise ValueError(
            f"deltapack: attention implementation {implementation!r} with "
            f"{'a' if bounds.segments.is_shard else 'no'} context-parallel shard; expected "
            f"{CONTEXT_PARALLEL!r} exactly when the boundaries come from a ContextShard "
            "(deltapack.distributed.enable_context_parallel(model) selects it)"
        )
    return None, {}


def block_causal_mask(bounds: Boundaries) -> torch.Tensor:
    """[1, 1, total, total] bool, True where query i may attend key j (same document, j <= i)."""
    doc = bounds.seq_idx[0]
    pos = torch.arange(doc.numel(), device=doc.device)
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    return allowed[None, None]


def attention_inputs(
    bounds: Boundaries, implementation: str, dtype: torch.dtype, text_model: nn.Module | None = None
) -> tuple[Any, dict[str, Any]]:
    """(the mask for the full-attention layers, extra kwargs for the attention function).

    With ``text_model`` given (the decoder stack, its full-attention modules patched), eager/sdpa batches on CUDA
    take the varlen path: no mask, and the choice is recorded in ``bounds.choices`` for the modules to read.
    Raises ValueError for an attention implementation deltapack cannot keep exact.
    """
    if bounds.segments.is_shard or implementation == CONTEXT_PARALLEL:
        return _context_parallel_inputs(bounds, implementation)
    if implementation in MASKED:
        backend = _varlen_backend(bounds, text_model, dtype)
        bounds.choices.varlen_attention = backend
        if backend is not None:
            return None, {}
    if implementation == "sdpa":
        return block_causal_mask(bounds), {}
    if implementation == "eager":
        allowed = block_causal_mask(bounds)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min), {}
    if "flash" in implementation:
        return None, {
            "cu_seq_lens_q": bounds.cu_seqlens,
            "cu_seq_lens_k": bounds.cu_seqlens,
            "max_length_q": bounds.max_seqlen,
            "max_length_k": bounds.max_seqlen,
        }
    raise ValueError(
        f"deltapack: attention implementation {implementation!r} is not supported with packed inputs; "
        f"expected one of {MASKED} or a flash-attention implementation"
    )


def packed_attention_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    bounds: Boundaries,
) -> tuple[torch.Tensor, None]:
    """A Qwen3.5 / Qwen3.5-MoE / Qwen3-Next full-attention layer over a packed stream, through varlen attention.

    Computes what the transformers module computes (q projection split into query and output gate, q/k RMSNorm,
    rope, attention, sigmoid gate, o_proj), with the attention kept inside each document.

    Args:
        module: the transformers attention module. hidden_states: [1, T, hidden], the unpadded stream.
        position_embeddings: (cos, sin) [1, T, rotary_dim] from the model's rotary embedding.
        bounds: the batch's boundaries.

    Returns:
        ([1, T, hidden] in the dtype of hidden_states, None: no attention weights).
    """
    apply_rotary_pos_emb = sys.modules[type(module).__module__].apply_rotary_pos_emb
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    query, gate = torch.chunk(module.q_proj(hidden_states).view(*input_shape, -1, module.head_dim * 2), 2, dim=-1)
    gate = gate.reshape(*input_shape, -1)
    query = module.q_norm(query.view(hidden_shape))  # [1, T, Hq, D]: tokens first, as varlen kernels take them
    key = module.k_norm(module.k_proj(hidden_states).view(hidden_shape))
    value = module.v_proj(hidden_states).view(hidden_shape)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=2)
    out = varlen_attention(
        query[0],
        key[0],
        value[0],
        segments=bounds.segments,
        scale=module.scaling,
        backend=varlen_backend_of(bounds),
    )
    out = out.reshape(*input_shape, -1) * torch.sigmoid(gate)
    return module.o_proj(out), None
