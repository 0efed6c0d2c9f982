"""The chunked LM-head cross-entropy of packed training calls (``deltapack.patch(model, chunked_loss=True)``).

The loss of a causal LM is ``ForCausalLMLoss(lm_head(h), labels)``: [N, V] logits in fp32 for N tokens. Here the
LM head and the cross-entropy run on ``chunk`` tokens at a time, each chunk under activation checkpointing, so only
one chunk's logits exist at once, in the forward and in the backward pass (which recomputes them). The result is
transformers' ``ForCausalLMLoss`` up to fp32 summation order: the sum over tokens divided by
``num_items_in_batch`` when it is given, else by the number of labels that are not ``ignore_index``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.loss.loss_utils import ForCausalLMLoss

__all__ = ["DEFAULT_CHUNK_TOKENS", "chunked_lm_loss", "chunked_lm_loss_ref", "why_not_chunked"]

DEFAULT_CHUNK_TOKENS = 4096
# config fields through which a model scales or caps its logits before the loss (the chunked path would skip them)
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "logits_scale",
    "output_multiplier",
    "output_multiplier_scale",
    "lm_head_multiplier",
    "mup_enabled",
    "mup_width_multiplier",
)


def _chunk_loss_sum(
    head: nn.Linear, hidden_CD: torch.Tensor, labels_C: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    logits_CV = head(hidden_CD).float()
    return F.cross_entropy(logits_CV, labels_C, ignore_index=ignore_index, reduction="sum")


def chunked_lm_loss(
    head: nn.Linear,
    hidden_NTD: torch.Tensor,
    shift_labels_NT: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    chunk: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Causal-LM cross-entropy of ``head(hidden)`` against ``shift_labels`` (target of token t at t), in chunks.

    hidden_NTD: [N, T, D] any float dtype; shift_labels_NT: [N, T] int64, ``ignore_index`` where no target;
    returns a 0-dim fp32 loss. Peak memory for logits: one [chunk, V] block (fp32), forward and backward.
    """
    if chunk < 1:
        raise ValueError(f"deltapack: chunked loss chunk of {chunk} tokens; expected a positive number of tokens")
    hidden_ND = hidden_NTD.reshape(-1, hidden_NTD.shape[-1])
    labels_N = shift_labels_NT.reshape(-1).to(hidden_ND.device)
    if labels_N.shape[0] != hidden_ND.shape[0]:
        raise ValueError(
            f"deltapack: shift_labels of shape {tuple(shift_labels_NT.shape)}; expected "
            f"{tuple(hidden_NTD.shape[:-1])}, one label per hidden state"
        )
    total = hidden_ND.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden_ND.shape[0], chunk):
        h_CD, y_C = hidden_ND[start : start + chunk], labels_N[start : start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, head, h_CD, y_C, ignore_index, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, h_CD, y_C, ignore_index)
    if num_items_in_batch is None:
        return total / (labels_N != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def chunked_lm_loss_ref(
    head: nn.Linear,
    hidden_NTD: torch.Tensor,
    shift_labels_NT: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    chunk: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """The reference twin of :func:`chunked_lm_loss`: full logits, transformers' ``ForCausalLMLoss``; ``chunk``
    unused."""
    logits = head(hidden_NTD)
    return ForCausalLMLoss(
        logits,
        None,
        logits.shape[-1],
        num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index,
        shift_labels=shift_labels_NT,
    )


def why_not_chunked(model: nn.Module, stack: nn.Module | None, call: dict) -> str | None:
    """None when the packed call of ``model`` (a ``*ForCausalLM``) may take the chunked loss, else the reason not.

    It may when the model's loss is plain causal-LM cross-entropy on ``lm_head(decoder(...))``: its
    ``loss_function`` is transformers' ``ForCausalLMLoss``, its LM head an ``nn.Linear`` at ``lm_head``, its decoder
    stack its ``model`` attribute, no logit scaling or soft-capping in its config, and no router (MoE auxiliary)
    loss asked for.
    """
    loss_fn = getattr(model, "loss_function", None)
    if getattr(loss_fn, "__func__", loss_fn) is not ForCausalLMLoss:
        return "its loss_function is not transformers' ForCausalLMLoss"
    if not isinstance(getattr(model, "lm_head", None), nn.Linear) or model.get_output_embeddings() is not model.lm_head:
        return "its output embedding is not an nn.Linear lm_head"
    if stack is None or getattr(model, "model", None) is not stack:
        return "its decoder stack is not its `model` attribute"
    config = model.config
    configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    for cfg in configs:
        for name in LOGIT_TRANSFORMS:
            value = getattr(cfg, name, None)
            if value is not None and value is not False and value != 1:
                return f"its config sets {name}={value!r}, a logit transform the chunked loss would skip"
    asked = call.get("output_router_logits")
    if asked or (asked is None and any(getattr(cfg, "output_router_logits", False) for cfg in configs)):
        return "it adds a router auxiliary loss"
    return None
