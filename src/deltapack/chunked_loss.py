"""The chunked LM-head cross-entropy of packed training calls (``deltapack.patch(model, chunked_loss=True)``).

The loss of a causal LM is ``ForCausalLMLoss(lm_head(h), labels)``: [N, V] logits in fp32 for N tokens. Here the
LM head and the cross-entropy run on ``chunk`` tokens at a time, so only one chunk's logits exist at once. Where
the head is a plain ``nn.Linear`` (no hooks, as FSDP's would gather its weight; a plain tensor weight), each
chunk's gradients with respect to the hidden states, the weight and the bias are computed in the forward pass,
while its logits exist, and the backward pass only scales them (:class:`_LinearCrossEntropySum`): one LM-head
matrix product per chunk in the forward, two in the backward's place, none recomputed. Any other head runs each
chunk under activation checkpointing (the backward recomputes its logits). Either way the result is
transformers' ``ForCausalLMLoss`` up to fp32 summation order: the sum over tokens divided by
``num_items_in_batch`` when it is given, else by the number of labels that are not ``ignore_index``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.loss.loss_utils import ForCausalLMLoss

from deltapack.ops import fla

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "chunked_lm_loss",
    "chunked_lm_loss_ref",
    "logit_grad_fla",
    "logit_grad_ref",
    "why_not_chunked",
]

logger = logging.getLogger("deltapack")

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


def _plain_linear(head: nn.Module) -> bool:
    """Whether ``head(x)`` is exactly ``F.linear(x, head.weight, head.bias)`` on plain tensors: an ``nn.Linear``
    with no hooks of its own or global ones (FSDP gathers a sharded weight in a pre-forward hook) and a weight
    that is no tensor subclass (a DTensor)."""
    hooks = (head._forward_hooks, head._forward_pre_hooks, nn.modules.module._global_forward_hooks,
             nn.modules.module._global_forward_pre_hooks)  # fmt: skip
    plain = type(head.weight) is nn.Parameter or type(head.weight) is torch.Tensor
    return type(head) is nn.Linear and plain and not any(hooks)


def logit_grad_ref(
    logits_CV: torch.Tensor, labels_C: torch.Tensor, ignore_index: int, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's cross-entropy: (the sum over its tokens, a 0-dim fp32 tensor; with ``grad``, the gradient of
    that sum with respect to the logits, ``softmax - one_hot`` with zero rows where the label is ``ignore_index``,
    in the logits' dtype, else None). logits_CV: [C, V] in the LM head's dtype, upcast to fp32 as the model's loss
    does; labels_C: [C] int64. May overwrite ``logits_CV``."""
    dtype = logits_CV.dtype
    logits_CV = logits_CV.float()
    valid_C = labels_C != ignore_index
    target_C = torch.where(valid_C, labels_C, 0)
    lse_C = torch.logsumexp(logits_CV, dim=-1)
    picked_C = logits_CV.gather(1, target_C[:, None])[:, 0]
    loss = torch.where(valid_C, lse_C - picked_C, 0.0).sum()
    if not grad:
        return loss, None
    g_CV = logits_CV.sub_(lse_C[:, None]).exp_()  # softmax, in place of the fp32 logits
    g_CV[torch.arange(len(labels_C), device=labels_C.device), target_C] -= 1.0
    return loss, g_CV.mul_(valid_C[:, None]).to(dtype)


def logit_grad_fla(
    logits_CV: torch.Tensor, labels_C: torch.Tensor, ignore_index: int, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`logit_grad_ref` on FLA's fused cross-entropy Triton kernels (CUDA, fp16 / bf16 logits): one pass for
    the loss and the log-sum-exp, one that writes the gradient over the logits (fp32 math in both)."""
    from fla.modules.fused_cross_entropy.ops import cross_entropy_bwd, cross_entropy_fwd

    losses_C, _, lse_C, classes, first = cross_entropy_fwd(logits_CV, labels_C, ignore_index=ignore_index)
    if not grad:
        return losses_C.sum(), None
    g_CV = cross_entropy_bwd(
        logits_CV, labels_C, lse_C, torch.ones_like(losses_C), ignore_index=ignore_index, total_classes=classes,
        class_start_idx=first, inplace_backward=True,
    )  # fmt: skip
    return losses_C.sum(), g_CV


# the chosen chunk step per (dtype, vocabulary) on CUDA: FLA's kernels once they matched the reference, else it
_LOGIT_GRAD: dict[tuple[torch.dtype, int], object] = {}
LOGIT_GRAD_TOL = {"loss": 1e-5, "grad": 1e-2}  # relative L2; the gradient is rounded to bf16 / fp16 (2^-8 / 2^-11)


def _logit_grad_fn(weight_VD: torch.Tensor):
    """The chunk step for this head: on CUDA in half precision FLA's kernels if they match :func:`logit_grad_ref`
    on random logits of its vocabulary and dtype (checked once per process; a mismatch or a failure is logged and
    the reference runs from then on), else (CPU, fp32, under torch.compile) the reference."""
    half = weight_VD.dtype in (torch.float16, torch.bfloat16)
    if not (weight_VD.is_cuda and half) or torch.compiler.is_compiling():
        return logit_grad_ref
    key = (weight_VD.dtype, weight_VD.shape[0])
    if key not in _LOGIT_GRAD:
        _LOGIT_GRAD[key] = checked(logit_grad_fla, weight_VD) if fla.AVAILABLE else logit_grad_ref
    return _LOGIT_GRAD[key]


def checked(candidate, weight_VD: torch.Tensor):  # noqa: ANN001, ANN201
    """``candidate`` (a chunk step with :func:`logit_grad_ref`'s signature) if it matches the reference on random
    logits of this head's vocabulary, dtype and device within :data:`LOGIT_GRAD_TOL`, else the reference (logged)."""
    try:
        with torch.no_grad():
            gen = torch.Generator(device=weight_VD.device).manual_seed(0)
            shape = (64, weight_VD.shape[0])
            logits = (4 * torch.randn(shape, generator=gen, device=weight_VD.device)).to(weight_VD.dtype)
            labels = torch.randint(0, shape[1], shape[:1], generator=gen, device=weight_VD.device)
            labels[::7] = -100
            ref_loss, ref_grad = logit_grad_ref(logits.clone(), labels, -100, True)
            loss, grad = candidate(logits.clone(), labels, -100, True)
            errors = {
                "loss": float((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-30)),
                "grad": float((grad.float() - ref_grad.float()).norm() / ref_grad.float().norm().clamp_min(1e-30)),
            }
    except Exception as err:  # noqa: BLE001 - any failure means: not this backend
        logger.warning("deltapack: %s failed (%r); the chunked loss runs its reference", candidate.__name__, err)
        return logit_grad_ref
    if any(errors[k] > LOGIT_GRAD_TOL[k] for k in errors):
        logger.warning(
            "deltapack: %s differs from the reference (relative %s, tolerance %s); the chunked loss runs its "
            "reference", candidate.__name__, errors, LOGIT_GRAD_TOL,
        )  # fmt: skip
        return logit_grad_ref
    logger.info("deltapack: the chunked loss runs %s (checked: relative %s)", candidate.__name__, errors)
    return candidate


class _LinearCrossEntropySum(torch.autograd.Function):
    """Sum over tokens of ``cross_entropy(F.linear(h, W, b).float(), y)``, chunk by chunk, its gradients
    computed in the forward while each chunk's logits exist.

    hidden_ND [N, D], weight_VD [V, D] (and bias_V) in the head's dtype; labels_N int64. Per chunk of C tokens the
    logits [C, V] give (the chunk step, :func:`logit_grad_ref` or FLA's kernels) the loss and the gradient
    ``softmax - one_hot`` (fp32 math, zero on ignored labels) in the head's dtype, as autograd would cast it; then
    dh = g @ W, dW += g^T @ h (fp32 accumulator) and db += sum(g). The backward multiplies them by the incoming
    gradient of the sum.
    """

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, bias_V, labels_N, ignore_index: int, chunk: int):  # noqa: ANN001
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total = hidden_ND.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(hidden_ND) if need_h else None
        grad_w = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if need_w else None
        grad_b = torch.zeros(bias_V.shape, dtype=torch.float32, device=bias_V.device) if need_b else None
        logit_grad = _logit_grad_fn(weight_VD)
        for start in range(0, hidden_ND.shape[0], chunk):
            h_CD, y_C = hidden_ND[start : start + chunk], labels_N[start : start + chunk]
            loss, g_CV = logit_grad(F.linear(h_CD, weight_VD, bias_V), y_C, ignore_index, need_h or need_w or need_b)
            total = total + loss
            if g_CV is None:
                continue
            if need_h:
                grad_h[start : start + chunk] = g_CV @ weight_VD
            if need_w:
                grad_w += (g_CV.transpose(0, 1) @ h_CD).float()
            if need_b:
                grad_b += g_CV.float().sum(0)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight_VD.dtype, None if bias_V is None else bias_V.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: ANN001
        if ctx.grads is None:
            raise RuntimeError(
                "deltapack: the chunked loss's gradients were already used by an earlier backward; expected one "
                "backward per forward (retain_graph is not supported by the chunked loss)"
            )
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        weight_dtype, bias_dtype = ctx.dtypes
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_total.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_total).to(weight_dtype)
        if grad_b is not None:
            grad_b = grad_b.mul_(grad_total).to(bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None


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
    returns a 0-dim fp32 loss. Peak memory for logits: one [chunk, V] block (fp32) and, with gradients, its
    softmax gradient in the head's dtype; the gradients of hidden (its dtype) and of the weight (fp32) are held from
    the forward to the backward.
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
    if _plain_linear(head):
        total = _LinearCrossEntropySum.apply(hidden_ND, head.weight, head.bias, labels_N, ignore_index, chunk)
    else:
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
