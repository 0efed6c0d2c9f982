"""patch / unpatch: attach deltapack to one transformers model instance.

Four forwards are wrapped, on this instance only (other instances of the class are untouched):

- the model given to ``patch`` (the entry): builds the batch's :class:`Boundaries` once, unpads the batch to one
  stream [1, total], gives each document its own positions, masks the label that would predict a document's first
  token from the previous document, turns the cache off, runs the model, and puts logits and hidden states back
  in the [B, T] layout;
- the decoder stack (the text model): hands the full-attention layers a mask (or varlen kwargs) built from the
  boundaries, so transformers never sees the indexed mask;
- every Gated DeltaNet layer: runs :func:`packed_gdn_forward` on the stream;
- every full-attention layer: on CUDA, runs :func:`packed_attention_forward` (varlen attention) when the decoder
  stack chose the varlen path for the batch; otherwise its own forward with the exact mask.

The boundaries travel down as the ``boundaries`` keyword, which transformers passes through its layers untouched
(also under gradient checkpointing, which keeps keyword arguments for the recomputation).

Inputs that describe no packing and no padding (no mask or an all-ones mask, positions that do not restart) take
the original forward, unchanged: outputs are bit-identical to the unpatched model, ``generate()`` included.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch import nn

from deltapack.boundaries import Boundaries
from deltapack.models.attention import (
    ATTENTION_MODULES,
    WRAPPED_ATTR,
    attention_inputs,
    is_full_attention,
    packed_attention_forward,
    varlen_backend_of,
)
from deltapack.models.gated_deltanet import packed_gdn_forward
from deltapack.models.registry import Architecture, architecture_of

__all__ = ["patch", "unpatch", "is_patched"]

ModelT = TypeVar("ModelT", bound=nn.Module)

# keyword arguments through which transformers users describe packed documents; deltapack owns them once patched
PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "max_length_q", "max_length_k", "seq_idx")
_STATE = "_deltapack_state"
_ENTRY_TEXT_MODELS = "_deltapack_text_models"  # on an entry model: the decoder stacks it calls
# the decoder stacks whose inputs the entry model has just found unpacked (so they skip the same host check)
_CHECKED_UNPACKED: ContextVar[tuple[nn.Module, ...]] = ContextVar("deltapack_checked_unpacked", default=())
# the cache keyword of the model forwards and of the GDN layers (transformers 5.24 renames both to ``cache``)
CACHE_KWARGS = ("past_key_values", "cache")
GDN_CACHE_KWARGS = ("cache_params", "cache")


def _target(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_patched(model: nn.Module) -> bool:
    return getattr(_target(model), _STATE, None) is not None


def patch(model: ModelT) -> ModelT:
    """Make packed batches exact on ``model`` (a qwen3_5, qwen3_5_moe or qwen3_next model); returns it.

    Idempotent; :func:`unpatch` restores the original forwards. A PEFT-wrapped model is patched through its base
    model. Raises ValueError, naming the supported architectures, for any other model.
    """
    target = _target(model)
    if is_patched(target):
        return model
    arch = architecture_of(target)
    wrapped: list[tuple[nn.Module, str]] = []
    text_cls, gdn_cls = arch.cls(arch.text_model), arch.cls(arch.gdn)
    for module in target.modules():
        if isinstance(module, gdn_cls):
            wrapped.append(_wrap(module, "_deltapack_gdn_inner", _gdn_forward))
        elif isinstance(module, text_cls):
            wrapped.append(_wrap(module, "_deltapack_text_inner", _text_model_forward))
        elif is_full_attention(module):
            wrapped.append(_wrap(module, WRAPPED_ATTR, _attention_forward))
    text_models = tuple(m for m, attr in wrapped if attr == "_deltapack_text_inner")
    for text_model in text_models:
        text_model.__dict__[ATTENTION_MODULES] = tuple(m for m in text_model.modules() if is_full_attention(m))
    if not isinstance(target, text_cls):  # a bare decoder stack is its own entry
        wrapped.append(_wrap(target, "_deltapack_entry_inner", _entry_forward))
        target.__dict__[_ENTRY_TEXT_MODELS] = text_models
    object.__setattr__(target, _STATE, _PatchState(arch, wrapped))
    return model


def unpatch(model: ModelT) -> ModelT:
    """Undo :func:`patch` (a no-op on a model that is not patched); returns the model."""
    target = _target(model)
    state: _PatchState | None = getattr(target, _STATE, None)
    if state is None:
        return model
    target.__dict__.pop(_ENTRY_TEXT_MODELS, None)
    for module, attr in reversed(state.wrapped):
        module.__dict__.pop(ATTENTION_MODULES, None)
        original = module.__dict__.pop(attr)
        if getattr(original, "__self__", None) is module and original.__func__ is type(module).forward:
            del module.forward
        else:
            module.forward = original
    object.__delattr__(target, _STATE)
    return model


class _PatchState:
    def __init__(self, arch: Architecture, wrapped: list[tuple[nn.Module, str]]):
        self.arch = arch
        self.wrapped = wrapped


def _wrap(module: nn.Module, attr: str, forward: Callable[..., Any]) -> tuple[nn.Module, str]:
    """Replace ``module.forward`` on this instance by ``forward`` bound to it, keeping the original at ``attr``.

    The bound function is a copy of ``forward`` that carries the original signature (the Trainer reads it to pick
    the batch columns it keeps). Nothing is captured in a closure, so a deepcopy of the model rebinds everything to
    the copy.
    """
    original = module.forward
    module.__dict__[attr] = original
    fn = types.FunctionType(forward.__code__, forward.__globals__, forward.__name__, forward.__defaults__)
    fn.__doc__ = getattr(original, "__doc__", None)
    try:
        params = list(inspect.signature(original).parameters.values())
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        fn.__signature__ = inspect.Signature([self_param, *params])
    except (TypeError, ValueError):
        pass  # no introspectable signature: keep (*args, **kwargs)
    module.forward = types.MethodType(fn, module)
    return module, attr


def _as_kwargs(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """All arguments of a call to ``fn`` by name."""
    if not args:
        return dict(kwargs)
    names = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > len(names):
        raise TypeError(f"{getattr(fn, '__name__', fn)} takes {len(names)} positional arguments, got {len(args)}")
    call = dict(zip(names, args))
    clash = set(call) & set(kwargs)
    if clash:
        raise TypeError(f"got multiple values for {sorted(clash)}")
    call.update(kwargs)
    return call


# ---------------------------------------------------------------------------------------------- the entry model
def _entry_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    inner = self.__dict__["_deltapack_entry_inner"]
    return _route(inner, inner, args, kwargs, checked=self.__dict__.get(_ENTRY_TEXT_MODELS, ()))


def _route(
    packed: Callable[..., Any],
    inner: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    checked: tuple[nn.Module, ...] = (),
) -> Any:
    """Run a call through ``inner`` unchanged when it describes no packing, else unpadded through ``packed``.

    ``checked``: the decoder stacks inside ``inner`` that may skip the same check when the call goes through
    unchanged (they receive the same inputs; the check reads the mask on the host).
    """
    unchanged = functools.partial(_unchanged, inner, args, kwargs, checked)
    call = _as_kwargs(inner, args, kwargs)
    bounds = call.pop("boundaries", None)
    explicit = bounds is not None or any(call.get(k) is not None for k in PACKING_KWARGS)
    mask = call.get("attention_mask")
    if (isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() == 4)) and not explicit:
        return unchanged()  # the caller built the attention masks itself
    if any(call.get(name) is not None for name in CACHE_KWARGS):
        # cached decoding: transformers handles padding there; packed documents cannot share one cache
        if explicit or (isinstance(mask, torch.Tensor) and mask.numel() and int(mask.max()) > 1):
            raise ValueError(
                "deltapack: packed documents were given together with past_key_values; expected packed batches "
                "without a cache (training / scoring) or plain batches for cached generation"
            )
        return unchanged()
    batch_shape = _batch_shape(call)
    if bounds is None:
        bounds = _boundaries_from_call(call, batch_shape)
        if bounds is None:
            return unchanged()
        if call.get("use_cache") is True and not explicit and _padding_only(bounds):
            return unchanged()  # a padded prefill that asks for a cache: the original path
    elif bounds.batch_shape != batch_shape:
        raise ValueError(
            f"deltapack: boundaries were built for a batch of shape {bounds.batch_shape}; expected {batch_shape}, "
            "the shape of input_ids"
        )
    device = _input_device(call)
    if bounds.device != device:
        raise ValueError(
            f"deltapack: boundaries are on {bounds.device} and the inputs on {device}; expected both on one device "
            "(Boundaries.to(device))"
        )
    return _packed_call(packed, call, bounds)


def _unchanged(
    inner: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], checked: tuple[nn.Module, ...]
) -> Any:
    token = _CHECKED_UNPACKED.set(checked)
    try:
        return inner(*args, **kwargs)
    finally:
        _CHECKED_UNPACKED.reset(token)


def _input_device(call: dict[str, Any]) -> torch.device:
    ids = call.get("input_ids")
    return (ids if ids is not None else call["inputs_embeds"]).device


def _batch_shape(call: dict[str, Any]) -> tuple[int, int]:
    ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    source = ids if ids is not None else embeds
    if source is None:
        raise ValueError("deltapack: the model was called without input_ids or inputs_embeds")
    if source.dim() < 2:
        raise ValueError(f"deltapack: input_ids of shape {tuple(source.shape)}; expected [B, T]")
    return (int(source.shape[0]), int(source.shape[1]))


def _boundaries_from_call(call: dict[str, Any], batch_shape: tuple[int, int]) -> Boundaries | None:
    cu_q = call.get("cu_seq_lens_q")
    cu = cu_q if cu_q is not None else call.get("cu_seqlens")
    cu_k = call.get("cu_seq_lens_k")
    if cu is not None and cu_k is not None and not torch.equal(torch.as_tensor(cu_k).cpu(), torch.as_tensor(cu).cpu()):
        raise ValueError(
            "deltapack: cu_seq_lens_k differs from cu_seq_lens_q; expected the same document offsets for queries "
            "and keys (causal self-attention over packed documents)"
        )
    if cu is None and call.get("seq_idx") is not None:
        raise ValueError(
            "deltapack: seq_idx was given without cu_seq_lens_q; expected document offsets (cu_seq_lens_q), "
            "an indexed attention_mask or restarting position_ids"
        )
    bounds = Boundaries.from_inputs(
        batch_shape,
        attention_mask=call.get("attention_mask"),
        position_ids=call.get("position_ids"),
        cu_seqlens=cu,
        device=_input_device(call),
    )
    seq_idx = call.get("seq_idx")
    if bounds is not None and seq_idx is not None:
        given = bounds.unpad(torch.as_tensor(seq_idx).reshape(batch_shape).to(bounds.device).unsqueeze(-1))[0, :, 0]
        given = given.cpu()
        change = torch.ones_like(given, dtype=torch.bool)
        change[1:] = given[1:] != given[:-1]
        starts = torch.zeros_like(change)
        starts[list(bounds.cu_seqlens_host[:-1])] = True
        if not torch.equal(change, starts):
            raise ValueError(
                "deltapack: seq_idx disagrees with cu_seq_lens_q; expected seq_idx to change exactly where a "
                "document starts"
            )
    return bounds


def _padding_only(bounds: Boundaries) -> bool:
    """True when the boundaries describe one document in every non-empty row (plain padding, no packing)."""
    rows = bounds.batch_shape[0]
    if bounds.indices is None:
        return bounds.num_docs == rows
    row_of_token = bounds.indices // bounds.batch_shape[1]
    return bounds.num_docs == int(torch.unique(row_of_token.cpu()).numel())


def _packed_call(inner: Callable[..., Any], call: dict[str, Any], bounds: Boundaries) -> Any:
    for name in ("pixel_values", "pixel_values_videos"):
        if call.get(name) is not None:
            raise ValueError(f"deltapack: {name} was given with packed inputs; expected text-only inputs")
    keep = call.get("logits_to_keep", 0)
    if not (isinstance(keep, int) and keep == 0):
        raise ValueError("deltapack: logits_to_keep with packed inputs; expected the default 0 (all logits)")
    new = {k: v for k, v in call.items() if k not in PACKING_KWARGS}
    for name in ("input_ids", "inputs_embeds", "mm_token_type_ids", "token_type_ids"):
        if new.get(name) is not None:
            new[name] = bounds.unpad(new[name])
    new["attention_mask"] = None
    new["position_ids"] = bounds.position_ids
    new["use_cache"] = False
    for name in CACHE_KWARGS:
        new.pop(name, None)
    if new.get("labels") is not None:
        new["labels"] = bounds.unpad(new["labels"])
        new["shift_labels"] = bounds.shift_labels(new["labels"])
    elif new.get("shift_labels") is not None:
        raise ValueError("deltapack: shift_labels without labels; expected labels [B, T] (deltapack shifts them)")
    new["boundaries"] = bounds
    out = inner(**new)
    return _repad_outputs(out, bounds)


def _repad_outputs(out: Any, bounds: Boundaries) -> Any:
    def repad(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[:2] == (1, bounds.total_tokens):
            return bounds.repad(t)
        return t

    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            out[name] = repad(value)
    hidden = getattr(out, "hidden_states", None)
    if hidden is not None:
        out["hidden_states"] = tuple(repad(h) for h in hidden)
    return out


# ---------------------------------------------------------------------------------------------- inner modules
def _text_model_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The decoder stack: with boundaries, the full-attention mask or varlen plan; without, the entry logic itself,
    so a caller that runs the decoder stack directly (TRL's fused LM head does) still gets packing right."""
    inner = self.__dict__["_deltapack_text_inner"]
    if kwargs.get("boundaries") is None:
        if any(self is m for m in _CHECKED_UNPACKED.get()):  # the entry model found no packing in these inputs
            return inner(*args, **kwargs)
        return _route(lambda **call: _text_model_packed(self, inner, call), inner, args, kwargs)
    return _text_model_packed(self, inner, _as_kwargs(inner, args, kwargs))


def _text_model_packed(self: nn.Module, inner: Callable[..., Any], call: dict[str, Any]) -> Any:
    bounds: Boundaries = call["boundaries"]
    embeds = call.get("inputs_embeds")
    dtype = embeds.dtype if embeds is not None else self.get_input_embeddings().weight.dtype
    mask, extra = attention_inputs(bounds, self.config._attn_implementation, dtype, text_model=self)
    call["attention_mask"] = {"full_attention": mask, "linear_attention": None}
    call.update(extra)
    return inner(**call)


def _gdn_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    inner = self.__dict__["_deltapack_gdn_inner"]
    bounds: Boundaries | None = kwargs.get("boundaries")
    if bounds is None:
        return inner(*args, **kwargs)
    if any(kwargs.get(name) is not None for name in GDN_CACHE_KWARGS):
        raise ValueError("deltapack: a GDN layer got both packed boundaries and a cache; expected no cache")
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return packed_gdn_forward(self, hidden_states, bounds)


def _attention_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    inner = self.__dict__[WRAPPED_ATTR]
    bounds: Boundaries | None = kwargs.get("boundaries")
    if bounds is None or varlen_backend_of(bounds) is None:
        return inner(*args, **kwargs)  # unpacked, or packed through the exact mask
    call = _as_kwargs(inner, args, kwargs)
    return packed_attention_forward(self, call["hidden_states"], call["position_embeddings"], bounds)
