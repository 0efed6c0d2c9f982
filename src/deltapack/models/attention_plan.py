"""Which kernel runs a layer's attention over a packed stream on a GPU: decided here, per layer, logged once.

On a GPU no [T, T] mask is built for an attention implementation that runs through transformers'
``ALL_ATTENTION_FUNCTIONS`` (``sdpa``, ``flex_attention``): the mask builder returns a :class:`PackedMask`, which
describes the layer's mask (the model's own mask function over per-document positions, and the documents), and
the wrapped attention function runs, for that layer:

- ``varlen``: :func:`deltapack.ops.attention.varlen_attention` with the batch's ``cu_seqlens`` (flash attention
  inside torch), when the layer's mask is plain causal within documents and it has no score modifier;
- ``flex``: transformers' own flex-attention forward with a ``BlockMask`` of (mask function AND same document)
  built once per mask per batch; it applies soft-capping in its score modifier and sinks through the log-sum-exp.
  Used for sliding windows, chunks, overlays, soft-capping and sinks;
- ``dense``: the original attention function with the exact dense mask (no varlen kernel or no flex here, attention
  dropout in training, or inputs flex attention cannot compile: :func:`verify_flex`). Exact, quadratic in memory.

A flex call that raises at run time (inductor failing to lower it on this GPU, say) is caught once per process: a
warning with the exception, that call recomputed on the dense plan, and the dense plan for every later flex layer.

The layer's mask kind is read off its mask function by evaluating it on the positions [0, n) x [0, n) that occur
inside documents (n covers the window and a margin), against plain causal and causal-with-window; anything else is
``general`` and goes to flex (a mask built inside a ``torch.compile`` graph is ``causal`` only when it is
transformers' causal mask function, else ``general``: no probe in the graph). Under ``torch.compile`` the plan's
backend choice and its log line run while a layer is traced, not in its graph (:func:`resolve_attention_backend`),
so a layer compiles with ``fullgraph=True``. ``eager`` attention is each model's own function and keeps the dense mask
(a warning says so once on a GPU); models that add biases to the mask themselves (ALiBi) are never given a
:class:`PackedMask` (:func:`register_model` decides per model at patch time).

Legend: T = tokens of the packed stream; H / Hkv = query / key-value heads; D = head dim.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltapack.ops.fallback import KernelFailure

logger = logging.getLogger("deltapack")

__all__ = [
    "PackedMask",
    "mask_kind",
    "packed_mask",
    "register_model",
    "run_packed_attention",
    "unregister_model",
    "verify_flex",
]

PLANS = ("varlen", "flex", "dense")
PLAN_DEVICES = ("cuda",)  # devices where masks become PackedMask (tests add "cpu" to run the plan's dense path)
FLEX_DEVICES = ("cuda",)  # devices where the flex plan may run (tests add "cpu" to force it)
FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLEX_MIN_HEAD_DIM = 16  # inductor's flex templates use tl.dot, which needs head dims of at least 16
_HOOKED = ("sdpa", "flex_attention")  # implementations whose attention function deltapack wraps
_MAX_PROBE = 8192  # positions the mask-kind probe evaluates at most (per side)
_configs: dict[int, weakref.ref] = {}  # id(config) -> config of models whose attention runs through the registry
_logged: set[tuple[str, ...]] = set()
_flex_failure = KernelFailure("flex attention", "attention with windows, chunks, soft-capping or sinks")


def register_model(model: nn.Module) -> bool:
    """Let ``model``'s attention take the GPU plan when its modeling module runs attention through
    ``ALL_ATTENTION_FUNCTIONS``; models with their own attention code (ALiBi added to the mask, ...) keep the
    dense mask. Returns whether it was registered."""
    uses_registry = any(
        hasattr(sys.modules.get(type(m).__module__), "ALL_ATTENTION_FUNCTIONS")
        for m in model.modules()
        if type(m).__module__.startswith("transformers.models.")
    )
    if not uses_registry:
        return False
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            _configs[id(config)] = weakref.ref(config)
    return True


def unregister_model(model: nn.Module) -> None:
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None:
            _configs.pop(id(config), None)


def _registered(config: Any) -> bool:
    ref = _configs.get(id(config))
    return ref is not None and ref() is config


@dataclass(eq=False)
class PackedMask:
    """Stands in for a layer type's [1, 1, T, T] mask on a GPU; the wrapped attention function reads it.

    Attributes:
        bounds: the batch's boundaries. mask_function: the model's mask function over per-document positions,
            AND same document (a transformers mask function). kind: ``causal``, ``window`` or ``general``.
        window: for ``window``, w: a query sees the keys of its document at distance < w.
        materialize: () -> the exact dense mask the original mask builder makes (the ``dense`` plan).
    """

    bounds: Any
    mask_function: Callable[..., torch.Tensor]
    kind: str
    window: int | None
    materialize: Callable[[], Any]
    _block_mask: Any = field(default=None, repr=False)

    def block_mask(self) -> Any:
        """The flex-attention BlockMask of this mask (built once, shared by every layer that uses the mask)."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            total = self.bounds.total_tokens
            # in a traced layer it is part of that layer's graph (create_block_mask's own compile cannot nest there)
            compiled = not torch.compiler.is_compiling()
            self._block_mask = create_block_mask(
                self.mask_function, None, None, total, total, device=self.bounds.device, _compile=compiled
            )
        return self._block_mask


def mask_kind(base: Callable[..., torch.Tensor], local_size: int | None, max_seqlen: int, device: Any):
    """(kind, window) of the model's mask function ``base`` over the in-document positions [0, max_seqlen).

    Evaluated on [0, n)^2 with n = the window plus a margin (or max_seqlen when smaller).
    """
    window = local_size if local_size is not None and local_size < max_seqlen else None
    n = min(max_seqlen, (window or 0) + 256, _MAX_PROBE)
    pos = torch.arange(n, device=device)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    got = base(zero[:, None, None, None], zero[None, :, None, None], pos[None, None, :, None], pos[None, None, None, :])
    got = got.expand(1, 1, n, n)[0, 0]
    causal = pos[None, :] <= pos[:, None]
    if torch.equal(got, causal):
        return "causal", None
    if window is not None and torch.equal(got, causal & (pos[:, None] - pos[None, :] < window)):
        return "window", window
    return "general", None


def _traced_mask_kind(base: Callable[..., torch.Tensor]) -> tuple[str, None]:
    """(kind, window) of a mask built inside a ``torch.compile`` graph (a model compiled whole builds its masks in
    its graph): probing the mask function there would read tensor values (a graph break) and specialise the graph
    on the batch's longest document (a recompilation per batch). transformers' causal mask function itself is
    ``causal``; any other mask is ``general``, which takes the plan of a window (flex, else dense) also when the
    window is longer than every document of a batch (the varlen plan that eager attention takes then)."""
    from transformers.masking_utils import causal_mask_function

    return ("causal", None) if base is causal_mask_function else ("general", None)


def packed_mask(impl: str, bounds: Any, call: dict[str, Any], mask_function: Callable[..., Any], materialize):
    """A :class:`PackedMask` for this mask builder call, or None to build the dense mask.

    ``call``: the mask builder's keyword arguments; ``mask_function``: the model's function over per-document
    positions AND same document; ``materialize``: () -> the dense mask.
    """
    if bounds.device.type not in PLAN_DEVICES or impl not in _HOOKED or not _registered(call.get("config")):
        if bounds.device.type == "cuda" and impl == "eager" and ("eager", "dense") not in _logged:
            _logged.add(("eager", "dense"))
            logger.warning(
                "deltapack: eager attention on a GPU keeps an exact dense [T, T] mask per layer type; use "
                "attn_implementation='sdpa' or 'flex_attention' for varlen kernels"
            )
        return None
    base = call["base_mask_function"]
    if torch.compiler.is_compiling():
        kind, window = _traced_mask_kind(base)
    else:
        kind, window = mask_kind(base, call.get("local_size"), bounds.max_seqlen, bounds.device)
    return PackedMask(bounds, mask_function, kind, window, materialize)


def _flex_available() -> bool:
    if os.environ.get("DELTAPACK_NO_FLEX"):
        return False
    try:
        from transformers.integrations.flex_attention import flex_attention_forward  # noqa: F401
    except Exception:  # noqa: BLE001 - no flex in this torch / transformers
        return False
    return True


def verify_flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[bool, str]:
    """Whether flex attention can compile this layer's attention (reads shapes, dtypes and devices only).

    query: [1, H, T, D]; key: [1, Hkv, T, D]; value: [1, Hkv, T, Dv]. Checks what torch's flex attention checks up
    front and its inductor lowering needs: a device in :data:`FLEX_DEVICES`, fp16 / bf16 / fp32 alike for q, k, v,
    4-d inputs, equal q / k head dims, D and Dv at least :data:`FLEX_MIN_HEAD_DIM`, H a multiple of Hkv; and that no
    flex call failed earlier in this process.
    """
    if _flex_failure:
        return False, f"an earlier flex call failed in this process: {_flex_failure.reason}"
    if query.device.type not in FLEX_DEVICES:
        return False, f"query is on {query.device.type}; the flex plan runs on {', '.join(FLEX_DEVICES)}"
    dtypes = {query.dtype, key.dtype, value.dtype}
    if len(dtypes) != 1 or query.dtype not in FLEX_DTYPES:
        return False, f"q, k, v are {query.dtype}, {key.dtype}, {value.dtype}; flex takes one of fp16, bf16, fp32"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False, f"q, k, v have {query.dim()}, {key.dim()}, {value.dim()} dims; flex takes 4-d inputs"
    dq, dk, dv = query.shape[-1], key.shape[-1], value.shape[-1]
    if dq != dk:
        return False, f"query head dim {dq} != key head dim {dk}; flex needs them equal"
    if min(dq, dv) < FLEX_MIN_HEAD_DIM:
        return False, f"head dims {dq} (q, k) and {dv} (v); flex's Triton kernels need at least {FLEX_MIN_HEAD_DIM}"
    if query.shape[1] % key.shape[1] != 0:
        return False, f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} key-value heads"
    return True, ""


def choose_plan(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: PackedMask, kw: dict
) -> tuple[str, str]:
    """(plan, why not flex) of one layer's attention: varlen, flex or dense (see the module docstring); the reason is
    empty unless flex was the layer's plan and :func:`verify_flex` refused it."""
    from deltapack.ops.attention import resolve_attention_backend

    if module.training and float(kw.get("dropout") or 0.0) > 0:
        return "dense", ""
    # a position bias added to the scores (inkling's relative logits) runs on flex's score modifier or dense
    modifiers = any(kw.get(name) is not None for name in ("softcap", "s_aux", "position_bias"))
    if mask.kind == "causal" and not modifiers:
        probe = query.new_empty(0, 1, max(query.shape[-1], value.shape[-1]))
        if resolve_attention_backend(None, probe) != "reference":
            return "varlen", ""
    if not _flex_available():
        return "dense", ""
    ok, reason = verify_flex(query, key, value)
    return ("flex", "") if ok else ("dense", reason)


def run_packed_attention(
    original: Callable[..., Any],
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: PackedMask,
    **kw: Any,
) -> tuple[torch.Tensor, None]:
    """One layer's attention over the packed stream, on the kernel :func:`choose_plan` picks.

    Args:
        original: the registry's attention function (for the dense plan). query: [1, H, T, D].
        key, value: [1, Hkv, T, D] (value may have its own head dim). mask: the layer type's :class:`PackedMask`.
        kw: the attention function's keyword arguments (scaling, dropout, sliding_window, softcap, s_aux, ...).

    Returns:
        ([1, T, H, Dv] in the dtype of query, None), as transformers' attention functions return.
    """
    plan, refused = choose_plan(module, query, key, value, mask, kw)
    name = type(module).__name__
    kw.pop("attention_mask", None)
    if plan == "flex":
        from transformers.integrations import flex_attention

        flex_kw = {k: v for k, v in kw.items() if k != "sliding_window"}  # the block mask holds the window
        try:
            out = flex_attention.flex_attention_forward(module, query, key, value, mask.block_mask(), **flex_kw)
        except Exception as exc:  # noqa: BLE001 - a flex that fails here (inductor, Triton) is refused from now on
            _flex_failure.record(exc)
            plan, refused = "dense", f"flex failed ({type(exc).__name__})"
        else:
            _log_plan(name, plan, mask.kind, refused)  # logged once it ran, so the log names the plan that ran
            return out
    _log_plan(name, plan, mask.kind, refused)
    if plan == "varlen":
        return _varlen(query, key, value, mask, kw.get("scaling")), None
    return original(module, query, key, value, mask.materialize(), **kw)


def _log_plan(name: str, plan: str, kind: str, refused: str) -> None:
    """One log line per (layer class, plan): info, or a warning naming why flex was refused for the dense plan."""
    if torch.compiler.is_compiling():
        _log_plan_when_traced(name, plan, kind, refused)
    else:
        _log_plan_once(name, plan, kind, refused)


@torch.compiler.assume_constant_result
def _log_plan_when_traced(name: str, plan: str, kind: str, refused: str) -> bool:
    """:func:`_log_plan` in a layer that dynamo traces: it runs in Python while the graph is traced, once per
    graph (a logger call in the graph would break it, and tracing the check of what was logged would guard the
    graph on it); its answer, a constant, is not used."""
    _log_plan_once(name, plan, kind, refused)
    return True


def _log_plan_once(name: str, plan: str, kind: str, refused: str) -> None:
    if (name, plan) in _logged:
        return
    _logged.add((name, plan))
    if refused:
        logger.warning(
            "deltapack: %s runs packed attention on the %s plan (%s mask, exact dense [T, T] mask): %s",
            name, plan, kind, refused,
        )  # fmt: skip
    else:
        logger.info("deltapack: %s runs packed attention on the %s plan (%s mask)", name, plan, kind)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PackedMask, scale: float | None) -> torch.Tensor:
    from deltapack.ops.attention import varlen_attention

    dv, dq = v.shape[-1], q.shape[-1]
    scale = scale if scale is not None else dq**-0.5
    # multi-head latent attention has its own value head size: zero columns change no dot product and no output
    if dv < dq:
        v = torch.nn.functional.pad(v, (0, dq - dv))
    elif dv > dq:
        q, k = (torch.nn.functional.pad(t, (0, dv - dq)) for t in (q, k))
    out_THD = varlen_attention(
        q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), segments=mask.bounds.segments, scale=scale
    )
    return out_THD[..., :dv].unsqueeze(0)
