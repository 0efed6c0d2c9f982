"""patch / unpatch: attach deltapack to one transformers model instance.

These forwards are wrapped, on this instance only (other instances of the class are untouched):

- the model given to ``patch`` (the entry): builds the batch's :class:`Boundaries` once, unpads the batch to one
  stream [1, total], gives each document its own positions, masks the label that would predict a document's first
  token from the previous document, turns the cache off, runs the model inside the packing scope
  (:mod:`deltapack.models.scope`), and puts logits and hidden states back in the [B, T] layout;
- the decoder stack (``get_decoder()``; the text model of the GDN architectures): the same entry logic when it is
  called directly (TRL's fused LM head does); for the GDN architectures it also hands the full-attention layers a
  mask (or varlen kwargs) built from the boundaries, so transformers never sees the indexed mask;
- every decoder layer: its body runs inside the packing scope, also when gradient checkpointing replays it;
- every layer a family registers (:mod:`deltapack.models.layers`; the GDN layers, the Mamba mixers, ...): runs
  the family's packed forward on the stream;
- every full-attention layer of the GDN architectures: on CUDA, runs :func:`packed_attention_forward` (varlen
  attention) when the decoder stack chose the varlen path for the batch; otherwise its own forward with the mask.

The GDN architectures also receive the boundaries as the ``boundaries`` keyword, which transformers passes through
their layers untouched; the other families' layers read the packing scope.

Inputs that describe no packing (no mask or an all-ones mask, positions that go up by 1 along every row, or a 0/1
mask that only pads, one document per row) take the original forward, unchanged: outputs are bit-identical to the
unpatched model, ``generate()``, ``logits_to_keep`` and the cache included.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from deltapack.boundaries import Boundaries
from deltapack.chunked_loss import DEFAULT_CHUNK_TOKENS, chunked_lm_loss, why_not_chunked
from deltapack.models import attention_hooks
from deltapack.models.attention import (
    ATTENTION_MODULES,
    WRAPPED_ATTR,
    attention_inputs,
    is_full_attention,
    packed_attention_forward,
    varlen_backend_of,
)
from deltapack.models.families.attention import why_unsupported
from deltapack.models.layers import family_of, packed_layer_of, supported_model_types
from deltapack.models.registry import ARCHITECTURES, Architecture, architecture_of
from deltapack.models.scope import active_boundaries, packing_scope
from deltapack.models.unwrap import base_model

__all__ = ["patch", "unpatch", "is_patched"]

ModelT = TypeVar("ModelT", bound=nn.Module)

# keyword arguments through which transformers users describe packed documents; deltapack owns them once patched
PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "max_length_q", "max_length_k", "seq_idx")
_STATE = "_deltapack_state"
_WRAPPER_MARK = "_deltapack_wraps"  # on deltapack's forward functions: the attribute that keeps the original
# on a module unpatched under a later wrapper: {attr: original} for the forwards of ours that now only pass through
_PASS_THROUGH = "_deltapack_pass_through"
_ENTRY_TEXT_MODELS = "_deltapack_text_models"  # on an entry model: the decoder stacks it calls
_GENERATE_INNER = "_deltapack_generate_inner"  # on an entry model: what generate() was before patching
# the cache keyword of the model forwards (transformers 5.24 renames it to ``cache``)
CACHE_KWARGS = ("past_key_values", "cache", "cache_params", "state")  # state: rwkv's
# where patch() keeps the original forward of a decoder stack, a registered packed layer, a decoder layer
_TEXT_INNER = "_deltapack_text_inner"
_LAYER_INNER = "_deltapack_layer_inner"
_SCOPE_INNER = "_deltapack_scope_inner"
# on a decoder stack: its decoder layers; on a decoder layer: True while deltapack checkpoints it (see below)
_STACK_LAYERS = "_deltapack_stack_layers"
_CHECKPOINT_HERE = "_deltapack_checkpoint_here"
# on an entry model / decoder stack: True when the boundaries also travel down as the ``boundaries`` keyword (the
# GDN architectures, whose layers forward keyword arguments); the other families read the packing scope only
_THREAD_BOUNDARIES = "_deltapack_thread_boundaries"
# on an entry model / decoder stack: False when the family's own forward is not exact on padded rows, so deltapack
# unpads plainly padded batches too (see Family.pads_exactly)
_PADS_EXACTLY = "_deltapack_pads_exactly"
# on a registered packed layer: whether its last forward with gradients was a packed one (see the backward guard)
_LAST_PACKED = "_deltapack_last_packed"
# on an entry model patched with chunked_loss: the tokens per chunk of the LM head + cross-entropy
_CHUNKED_LOSS = "_deltapack_chunked_loss"


class _CallState(threading.local):
    """What a call of the patched model tells the calls it makes (thread-local rather than ContextVars, so that
    torch.compile traces it; see :mod:`deltapack.models.scope`).

    Attributes:
        stacks: the decoder stacks whose inputs the entry model has just found unpacked (so they skip the same host
            check).
        generating: True inside generate() of a patched model: its calls keep transformers' path (a model whose
            forward takes no logits_to_keep, xlstm's, shows no other sign of generating when called with
            use_cache=False).
    """

    def __init__(self) -> None:
        self.stacks: tuple[nn.Module, ...] = ()
        self.generating = False


_CALL = _CallState()
_target = base_model  # the transformers model inside a PEFT wrapper (or the model itself)


def is_patched(model: nn.Module) -> bool:
    return getattr(_target(model), _STATE, None) is not None


def patch(model: ModelT, chunked_loss: bool | int = False) -> ModelT:
    """Make packed batches exact on ``model``; returns it.

    ``model`` is a causal LM of a supported model type (:func:`deltapack.models.layers.supported_model_types`):
    its ``*ForCausalLM`` class or its decoder stack. Idempotent; :func:`unpatch` restores the original forwards.
    A PEFT-wrapped model is patched through its base model. Raises ValueError, naming what is supported, for any
    other model.

    ``chunked_loss``: True (4096 tokens per chunk) or a number of tokens per chunk: a packed call with ``labels``
    computes the LM head and the cross-entropy in chunks (:mod:`deltapack.chunked_loss`), so the [tokens, vocab]
    logits never exist in full; its output's ``logits`` is None. Pass ``return_logits=True`` to the call to get
    the logits (the model's own path then runs). Only where the model's loss is plain causal-LM cross-entropy
    (:func:`deltapack.chunked_loss.why_not_chunked`: transformers' ``ForCausalLMLoss``, no logit scaling or
    soft-capping, no router auxiliary loss); otherwise, and for unpacked calls, the model's own forward runs.
    """
    target = _target(model)
    if is_patched(target):
        return model
    if not isinstance(chunked_loss, bool) and int(chunked_loss) < 1:
        raise ValueError(f"deltapack: chunked_loss={chunked_loss!r}; expected True, False or tokens per chunk >= 1")
    arch, stacks = _decoder_stacks(target)
    pads_exactly = family_of(str(target.config.model_type)).pads_exactly
    layers = tuple(m for stack in stacks for m in stack.modules() if isinstance(m, GradientCheckpointingLayer))
    wrapped: list[tuple[nn.Module, str]] = []
    for module in target.modules():
        if any(module is s for s in stacks):
            wrapped.append(_wrap(module, _TEXT_INNER, _text_model_forward))
            module.__dict__[_STACK_LAYERS] = tuple(m for m in layers if any(m is x for x in module.modules()))
            module.__dict__[_THREAD_BOUNDARIES] = arch is not None
            module.__dict__[_PADS_EXACTLY] = pads_exactly
        elif packed_layer_of(module) is not None:
            wrapped.append(_wrap(module, _LAYER_INNER, _packed_layer_forward))
        elif arch is not None and is_full_attention(module):
            wrapped.append(_wrap(module, WRAPPED_ATTR, _attention_forward))
        elif any(module is layer for layer in layers):
            wrapped.append(_wrap(module, _SCOPE_INNER, _decoder_layer_forward))
    for text_model in stacks:
        text_model.__dict__[ATTENTION_MODULES] = tuple(m for m in text_model.modules() if is_full_attention(m))
    if not any(target is s for s in stacks):  # a bare decoder stack is its own entry
        wrapped.append(_wrap(target, "_deltapack_entry_inner", _entry_forward))
        target.__dict__[_ENTRY_TEXT_MODELS] = stacks
        target.__dict__[_THREAD_BOUNDARIES] = arch is not None
        target.__dict__[_PADS_EXACTLY] = pads_exactly
        if callable(getattr(target, "generate", None)):
            target.__dict__[_GENERATE_INNER] = target.generate
            target.__dict__["generate"] = types.MethodType(_generate, target)
        if chunked_loss is not False:
            target.__dict__[_CHUNKED_LOSS] = DEFAULT_CHUNK_TOKENS if chunked_loss is True else int(chunked_loss)
    attention_hooks.attach(target)
    object.__setattr__(target, _STATE, _PatchState(arch, wrapped))
    return model


def _decoder_stacks(target: nn.Module) -> tuple[Architecture | None, tuple[nn.Module, ...]]:
    """The registered GDN architecture of ``target`` (None for the other families) and its decoder stacks.

    Raises ValueError, naming the supported model types, when ``target`` is not a causal LM deltapack supports.
    """
    config = getattr(target, "config", None)
    model_type = str(getattr(config, "model_type", None))
    reason = why_unsupported(config)
    if reason is not None:
        raise ValueError(f"deltapack cannot pack model_type {model_type!r} ({type(target).__name__}): {reason}")
    if family_of(model_type) is None:
        raise ValueError(
            f"deltapack does not support model_type {model_type!r} ({type(target).__name__}); supported model "
            f"types: {', '.join(supported_model_types())}"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"deltapack: {type(target).__name__} is an encoder-decoder; expected a decoder-only causal LM")
    if model_type in ARCHITECTURES or model_type.removesuffix("_text") in ARCHITECTURES:
        arch = architecture_of(target)
        text_cls = arch.cls(arch.text_model)
        return arch, tuple(m for m in target.modules() if isinstance(m, text_cls))
    get_decoder = getattr(target, "get_decoder", None)
    stack = get_decoder() if callable(get_decoder) else target
    if not isinstance(stack, nn.Module):
        raise ValueError(f"deltapack: found no decoder stack in {type(target).__name__}; expected get_decoder()")
    return None, (stack,)


def unpatch(model: ModelT) -> ModelT:
    """Undo :func:`patch` (a no-op on a model that is not patched); returns the model.

    Each forward deltapack replaced gets back what was there when it patched. A forward that someone replaced after
    patching (TRL's SFTTrainer installs its fused LM head around deltapack's) is left in place, and deltapack's
    forward it calls passes straight through to the original from then on.
    """
    target = _target(model)
    state: _PatchState | None = getattr(target, _STATE, None)
    if state is None:
        return model
    target.__dict__.pop(_ENTRY_TEXT_MODELS, None)
    target.__dict__.pop(_CHUNKED_LOSS, None)
    generate = target.__dict__.pop(_GENERATE_INNER, None)
    if generate is not None:
        if getattr(generate, "__self__", None) is target and generate.__func__ is getattr(
            type(target), "generate", None
        ):
            target.__dict__.pop("generate", None)
        else:
            target.__dict__["generate"] = generate
    attention_hooks.detach(target)
    for module, attr in reversed(state.wrapped):
        module.__dict__.pop(ATTENTION_MODULES, None)
        module.__dict__.pop(_THREAD_BOUNDARIES, None)
        module.__dict__.pop(_PADS_EXACTLY, None)
        module.__dict__.pop(_STACK_LAYERS, None)
        module.__dict__.pop(_LAST_PACKED, None)
        current = module.__dict__.get("forward")
        if getattr(getattr(current, "__func__", None), _WRAPPER_MARK, None) != attr:
            # the later forward still calls ours: from now on ours calls the original directly
            module.__dict__.setdefault(_PASS_THROUGH, {})[attr] = module.__dict__.pop(attr)
            continue
        original = module.__dict__.pop(attr)
        if getattr(original, "__self__", None) is module and original.__func__ is type(module).forward:
            del module.forward
        else:
            module.forward = original
    object.__delattr__(target, _STATE)
    return model


class _PatchState:
    def __init__(self, arch: Architecture | None, wrapped: list[tuple[nn.Module, str]]):
        self.arch = arch
        self.wrapped = wrapped


def _wrap(module: nn.Module, attr: str, forward: Callable[..., Any]) -> tuple[nn.Module, str]:
    """Replace ``module.forward`` on this instance by ``forward`` bound to it, keeping the original at ``attr``.

    The bound function is a copy of ``forward`` that carries the original signature (the Trainer reads it to pick
    the batch columns it keeps). Nothing is captured in a closure, so a deepcopy of the model rebinds everything to
    the copy.
    """
    revived = module.__dict__.get(_PASS_THROUGH, {}).pop(attr, None)
    if revived is not None:  # unpatched under a later wrapper, which still calls our forward: make that one live
        module.__dict__[attr] = revived
        return module, attr
    original = module.forward
    module.__dict__[attr] = original
    fn = types.FunctionType(forward.__code__, forward.__globals__, forward.__name__, forward.__defaults__)
    fn.__doc__ = getattr(original, "__doc__", None)
    setattr(fn, _WRAPPER_MARK, attr)
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
    through = self.__dict__.get(_PASS_THROUGH, {}).get("_deltapack_entry_inner")
    if through is not None:  # unpatched while a later wrapper still calls this forward
        return through(*args, **kwargs)
    inner = self.__dict__["_deltapack_entry_inner"]
    checked = self.__dict__.get(_ENTRY_TEXT_MODELS, ())
    chunk = self.__dict__.get(_CHUNKED_LOSS, 0)
    if chunk and kwargs.pop("return_logits", False):
        chunk = 0  # the caller asks for the logits: the model's own path
    thread = self.__dict__.get(_THREAD_BOUNDARIES, True)
    return _route(inner, inner, args, kwargs, checked=checked, thread=thread, chunk=chunk)


def _generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """generate() of a patched entry model: the original, with every call it makes marked as generating."""
    previous, _CALL.generating = _CALL.generating, True
    try:
        return self.__dict__[_GENERATE_INNER](*args, **kwargs)
    finally:
        _CALL.generating = previous


def _route(
    packed: Callable[..., Any],
    inner: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    checked: tuple[nn.Module, ...] = (),
    thread: bool = True,
    router_rows: bool = False,
    chunk: int = 0,
) -> Any:
    """Run a call through ``inner`` unchanged when it describes no packing, else unpadded through ``packed``.

    A batch that only pads (one document per row) is not packed input: it takes ``inner`` unchanged, cache and
    ``logits_to_keep`` included, as on the unpatched model.

    ``checked``: the decoder stacks inside ``inner`` that may skip the same check when the call goes through
    unchanged (they receive the same inputs; the check reads the mask on the host). ``thread``: also hand the
    boundaries down as the ``boundaries`` keyword (see :func:`_packed_call`).
    ``router_rows``: the decoder stack called directly (as TRL's fused LM head does): its caller weights router
    logits by its own [B, T] ``attention_mask``, so they come back one row per position of the batch.
    ``chunk``: tokens per chunk of the chunked loss of a packed call with labels (0: the model's own loss).
    """
    unchanged = functools.partial(_unchanged, inner, args, kwargs, checked)
    call = _as_kwargs(inner, args, kwargs)
    bounds = call.pop("boundaries", None)
    explicit = bounds is not None or any(call.get(k) is not None for k in PACKING_KWARGS)
    mask = call.get("attention_mask")
    if (isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() == 4)) and not explicit:
        return unchanged()  # the caller built the attention masks itself
    cached = any(call.get(name) is not None for name in CACHE_KWARGS)
    indexed, found, padding_only = _read_batch(call, explicit, bounds is None and not cached)
    if cached:
        # cached decoding (generate()): transformers handles padding there; packed documents cannot share one cache
        if explicit or indexed:
            given = [k for k in PACKING_KWARGS if call.get(k) is not None] + ["boundaries"] * (bounds is not None)
            what = "an indexed attention_mask (document ids)" if indexed else " and ".join(given)
            raise ValueError(
                f"deltapack: generate() or a cached call got packed documents ({what}); expected one prompt per row "
                "with a 0/1 attention_mask: generate from each document on its own (rows padded with a 0/1 mask), "
                "or score packed rows in one forward call with use_cache=False"
            )
        return unchanged()
    batch_shape = _batch_shape(call)
    if bounds is None:
        bounds = found
        pads_exactly = getattr(getattr(inner, "__self__", None), "__dict__", {}).get(_PADS_EXACTLY, True)
        # a generation step asks for a cache or for the last logits only (logits_to_keep)
        keep = call.get("logits_to_keep")
        generating = _CALL.generating or call.get("use_cache") is True or (isinstance(keep, int) and keep != 0)
        if bounds is None or (padding_only and (pads_exactly or generating)):
            return unchanged()  # no packing: the original path, exact for plain padding (and the cache kept)
        if router_rows and indexed and _wants_router_logits(inner, call):
            raise ValueError(
                "deltapack: the decoder stack was called directly (as TRL's fused LM head calls it) with an indexed "
                "attention_mask and output_router_logits: the caller's load-balancing loss weights every token by "
                "its attention_mask value, the document index; expected a 0/1 attention_mask with position_ids "
                "restarting for each document (PackedCollator(indexed_mask=False)), or deltapack.patch(trainer.model) "
                "after building the trainer"
            )
    elif bounds.batch_shape != batch_shape:
        raise ValueError(
            f"deltapack: boundaries were built for a batch of shape {bounds.batch_shape}; expected {batch_shape}, "
            "the shape of input_ids"
        )
    if call.get("use_cache") is True:  # asked for explicitly (the default, None, is turned off quietly)
        raise ValueError(
            "deltapack: use_cache=True with packed documents; expected use_cache=False or unset: packed documents "
            "cannot share one cache, and deltapack does not drop a cache the caller asked for"
        )
    device = _input_device(call)
    if bounds.device != device:
        raise ValueError(
            f"deltapack: boundaries are on {bounds.device} and the inputs on {device}; expected both on one device "
            "(Boundaries.to(device))"
        )
    return _packed_call(packed, call, bounds, thread, router_rows, chunk)


@torch._dynamo.disable
def _read_batch(call: dict[str, Any], explicit: bool, find: bool) -> tuple[bool, Boundaries | None, bool]:
    """What :func:`_route` reads on the host, in one place outside any torch.compile graph (the documents of a batch
    are data, not something a graph can specialise on): whether the mask is indexed and, when ``find``, the batch's
    boundaries (None: no packing) and whether they only pad."""
    mask = call.get("attention_mask")
    indexed = isinstance(mask, torch.Tensor) and mask.numel() > 0 and int(mask.max()) > 1
    if not find:
        return indexed, None, False
    bounds = _boundaries_from_call(call, _batch_shape(call))
    padding_only = not explicit and _padding_only(bounds) if bounds is not None else False
    return indexed, bounds, padding_only


def _wants_router_logits(inner: Callable[..., Any], call: dict[str, Any]) -> bool:
    asked = call.get("output_router_logits")
    if asked is not None:
        return bool(asked)
    config = getattr(getattr(inner, "__self__", None), "config", None)
    return bool(getattr(config, "output_router_logits", False))


def _unchanged(
    inner: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], checked: tuple[nn.Module, ...]
) -> Any:
    previous, _CALL.stacks = _CALL.stacks, checked
    try:
        return inner(*args, **kwargs)
    finally:
        _CALL.stacks = previous


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
    seq_idx = call.get("seq_idx")
    mask = call.get("attention_mask")
    if cu is None and seq_idx is not None:  # seq_idx alone (DataCollatorWithFlattening) describes the documents too
        if isinstance(mask, torch.Tensor) and mask.numel() and int(mask.max()) > 1:
            raise ValueError(
                "deltapack: both seq_idx and an indexed attention_mask were given; expected one description of the "
                "documents (seq_idx, cu_seq_lens_q or the indexed attention_mask)"
            )
        cu = _offsets_from_seq_idx(seq_idx, batch_shape, mask)
    try:
        bounds = Boundaries.from_inputs(
            batch_shape,
            attention_mask=call.get("attention_mask"),
            position_ids=call.get("position_ids"),
            cu_seqlens=cu,
            device=_input_device(call),
        )
    except ValueError as err:  # name the argument the caller passed
        given = next((k for k in ("cu_seq_lens_q", "cu_seqlens", "seq_idx") if call.get(k) is not None), None)
        if given is None or given == "cu_seqlens":
            raise
        raise ValueError(str(err).replace("cu_seqlens", given)) from None
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


def _offsets_from_seq_idx(seq_idx: Any, batch_shape: tuple[int, int], mask: Any) -> list[int]:
    """Document offsets in the unpadded stream from ``seq_idx`` [B, T] (or [1, B * T]): a document starts at the first
    real token of each row and wherever seq_idx changes; padding (0 in a 0/1 ``attention_mask``) is skipped."""
    idx = torch.as_tensor(seq_idx).detach().cpu()
    if idx.numel() != batch_shape[0] * batch_shape[1]:
        raise ValueError(
            f"deltapack: seq_idx has shape {tuple(idx.shape)}; expected [B, T] = {batch_shape} like input_ids"
        )
    idx = idx.reshape(batch_shape).long()
    real = torch.ones(batch_shape, dtype=torch.bool)
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(batch_shape):
        real = mask.detach().cpu() != 0
    prev_real = torch.nn.functional.pad(real[:, :-1], (1, 0), value=False)
    prev = torch.nn.functional.pad(idx[:, :-1], (1, 0))
    starts = (real & (~prev_real | (idx != prev)))[real]
    return [*starts.nonzero().reshape(-1).tolist(), int(real.sum())]


def _padding_only(bounds: Boundaries) -> bool:
    """True when the boundaries describe one document in every non-empty row (plain padding, no packing)."""
    rows = bounds.batch_shape[0]
    if bounds.indices is None:
        return bounds.num_docs == rows
    row_of_token = bounds.indices // bounds.batch_shape[1]
    return bounds.num_docs == int(torch.unique(row_of_token.cpu()).numel())


def _packed_call(
    inner: Callable[..., Any],
    call: dict[str, Any],
    bounds: Boundaries,
    thread: bool = True,
    router_rows: bool = False,
    chunk: int = 0,
) -> Any:
    """Run ``inner`` on the unpadded stream inside the packing scope; outputs back in the [B, T] layout.

    ``thread``: the GDN architectures also receive the boundaries as the ``boundaries`` keyword and their labels
    with ``shift_labels``. The other families' forwards may accept neither: they get only the arguments their
    signature names, and labels already shifted per document in the form every causal-LM loss shifts back (the
    target of token t sits at t + 1), so the model's own loss, whatever its code, reads the right targets.
    ``router_rows``: router logits back one row per position of the [B, T] batch (see :func:`_route`).
    ``chunk``: with labels, the loss in chunks of this many tokens where :func:`why_not_chunked` allows (0: never).
    """
    for name in ("pixel_values", "pixel_values_videos"):
        if call.get(name) is not None:
            raise ValueError(f"deltapack: {name} was given with packed inputs; expected text-only inputs")
    keep = call.get("logits_to_keep", 0)
    keep_all = isinstance(keep, int) and keep == 0
    if not keep_all and call.get("labels") is not None:
        raise ValueError(
            "deltapack: logits_to_keep and labels were given with packed inputs; expected labels with all logits "
            "(logits_to_keep=0), or logits_to_keep without labels"
        )
    new = {k: v for k, v in call.items() if k not in PACKING_KWARGS}
    if not keep_all:
        new["logits_to_keep"] = 0  # every position of the stream; the kept [B, T] columns are taken afterwards
    for name in ("input_ids", "inputs_embeds", "mm_token_type_ids", "token_type_ids", "labels"):
        value = new.get(name)
        if value is not None and tuple(value.shape[:2]) != bounds.batch_shape:
            raise ValueError(
                f"deltapack: {name} has shape {tuple(value.shape)}; expected [B, T, ...] = {bounds.batch_shape}, the "
                "batch the packing inputs describe"
            )
    if new.get("labels") is not None and new.get("shift_labels") is not None:
        raise ValueError(
            "deltapack: labels and shift_labels were both given with packed inputs; expected labels [B, T] only "
            "(deltapack shifts them inside each document)"
        )
    for name in ("input_ids", "inputs_embeds", "mm_token_type_ids", "token_type_ids"):
        if new.get(name) is not None:
            new[name] = bounds.unpad(new[name])
    named = _parameter_names(inner)
    positions = _stream_positions(call.get("position_ids"), bounds)
    for name, value in (("attention_mask", None), ("position_ids", positions), ("use_cache", False)):
        if thread or name in named or name in new:  # ``inner`` may hide its signature (a lambda, **kwargs)
            new[name] = value
    for name in CACHE_KWARGS:
        new.pop(name, None)
    if new.get("labels") is not None:
        labels = bounds.unpad(new["labels"])
        if not thread and bounds.segments.is_shard and bounds.segments.shard.crosses_ranks:
            # the target of a rank's last token can sit on the next rank, past the end of the labels handed over
            raise ValueError(
                "deltapack: labels with a context-parallel shard whose documents cross ranks, for a model whose own "
                "loss shifts them; expected no labels: take the loss with deltapack.distributed.token_mean_loss("
                "logits, shard.shift_labels(labels), shard)"
            )
        shifted = bounds.shift_labels(labels)
        if thread:
            new["labels"], new["shift_labels"] = labels, shifted
        else:
            new["labels"] = torch.nn.functional.pad(shifted[:, :-1], (1, 0), value=-100)
    elif new.get("shift_labels") is not None:
        raise ValueError("deltapack: shift_labels without labels; expected labels [B, T] (deltapack shifts them)")
    if thread:
        new["boundaries"] = bounds
    model = getattr(inner, "__self__", None)
    if chunk and new.get("labels") is not None and model is not None:
        stacks = model.__dict__.get(_ENTRY_TEXT_MODELS, ())
        stack = stacks[0] if len(stacks) == 1 else None
        if why_not_chunked(model, stack, new) is None:
            with packing_scope(bounds):
                out = _chunked_loss_call(model, stack, new, shifted, chunk)
            return _repad_outputs(out, bounds, router_rows)
    with packing_scope(bounds):
        out = inner(**new)
    out = _repad_outputs(out, bounds, router_rows)
    if not keep_all and getattr(out, "logits", None) is not None:
        out["logits"] = out.logits[:, -keep:] if isinstance(keep, int) else out.logits[:, keep]
    return out


def _stream_positions(given: Any, bounds: Boundaries) -> torch.Tensor:
    """The positions the model gets on the stream, [1, total] int64: the caller's ``position_ids`` [B, T] where it
    gave them (they restart where each document starts; a collator may start every document at 1, as
    ``DataCollatorWithFlattening(position_ids_start=1)`` does, and the document alone would see those positions),
    else each token's position inside its document."""
    if isinstance(given, torch.Tensor) and given.dim() == 2 and tuple(given.shape) == bounds.batch_shape:
        return bounds.unpad(given.to(device=bounds.position_ids.device, dtype=bounds.position_ids.dtype))
    return bounds.position_ids


def _chunked_loss_call(
    model: nn.Module, stack: nn.Module, new: dict[str, Any], shift_labels_1T: torch.Tensor, chunk: int
) -> CausalLMOutputWithPast:
    """The decoder stack on the stream, then the LM head and ``ForCausalLMLoss`` in chunks of ``chunk`` tokens.

    shift_labels_1T: [1, total] int64, the target of token t at t (-100 at each document's last token).
    Returns the loss, no logits, and the stack's hidden states / attentions as the model's own forward would.
    """
    loss_only = ("labels", "shift_labels", "logits_to_keep", "num_items_in_batch")
    out = stack(**{k: v for k, v in new.items() if k not in loss_only})
    loss = chunked_lm_loss(
        model.lm_head, out.last_hidden_state, shift_labels_1T, new.get("num_items_in_batch"), chunk=chunk
    )
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )


def _parameter_names(fn: Callable[..., Any]) -> frozenset[str]:
    """The parameter names of ``fn`` (keyword-capable ones; empty when it has no introspectable signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _repad_outputs(out: Any, bounds: Boundaries, router_rows: bool = False) -> Any:
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
    router = getattr(out, "router_logits", None)
    if router_rows and router is not None and bounds.indices is not None:
        # [total, E] per MoE layer -> [B * T, E], zeros at padding, as transformers lays them out for its mask
        out["router_logits"] = tuple(
            bounds.repad(r[None]).flatten(0, 1) if r.shape[0] == bounds.total_tokens else r for r in router
        )
    return out


# ---------------------------------------------------------------------------------------------- inner modules
def _text_model_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The decoder stack: with boundaries, the full-attention mask or varlen plan; without, the entry logic itself,
    so a caller that runs the decoder stack directly (TRL's fused LM head does) still gets packing right."""
    through = self.__dict__.get(_PASS_THROUGH, {}).get(_TEXT_INNER)
    if through is not None:  # unpatched while a later wrapper still calls this forward
        return through(*args, **kwargs)
    inner = self.__dict__[_TEXT_INNER]
    thread = self.__dict__.get(_THREAD_BOUNDARIES, True)
    bounds = kwargs.get("boundaries") or active_boundaries()
    if bounds is None:
        if any(self is m for m in _CALL.stacks):  # the entry model found no packing in these inputs
            return inner(*args, **kwargs)
        packed = lambda **call: _text_model_packed(self, inner, call)  # noqa: E731
        return _route(packed, inner, args, kwargs, thread=thread, router_rows=True)
    call = _as_kwargs(inner, args, kwargs)
    if thread:
        call["boundaries"] = bounds
    else:
        call.pop("boundaries", None)
    if "use_cache" in _parameter_names(inner):  # an entry without use_cache in its signature (granitemoehybrid)
        call["use_cache"] = False  # would leave the stack to create a cache from config.use_cache
    with packing_scope(bounds):
        return _text_model_packed(self, inner, call)


def _text_model_packed(self: nn.Module, inner: Callable[..., Any], call: dict[str, Any]) -> Any:
    """The decoder stack on the stream, inside the packing scope. The GDN architectures get the full-attention
    mask or varlen plan built here; the other families build their masks themselves from the per-document
    positions and no mask (the attention hooks keep documents apart)."""
    if not self.__dict__.get(_THREAD_BOUNDARIES, True):
        with _checkpointing_by_deltapack(self.__dict__.get(_STACK_LAYERS, ())):
            return inner(**call)
    bounds: Boundaries = call["boundaries"]
    embeds = call.get("inputs_embeds")
    dtype = embeds.dtype if embeds is not None else self.get_input_embeddings().weight.dtype
    mask, extra = attention_inputs(bounds, self.config._attn_implementation, dtype, text_model=self)
    call["attention_mask"] = {"full_attention": mask, "linear_attention": None}
    call.update(extra)
    with _checkpointing_by_deltapack(self.__dict__.get(_STACK_LAYERS, ())):
        return inner(**call)


@contextlib.contextmanager
def _checkpointing_by_deltapack(layers: tuple[nn.Module, ...]) -> Iterator[None]:
    """For a packed call: the decoder layers that transformers would checkpoint are checkpointed by deltapack's
    layer forward instead, so that the replay in the backward pass runs inside the packing scope. (transformers
    checkpoints either around ``forward`` or around ``__call__``, depending on its version; around ``__call__``
    the replay would run outside anything deltapack wraps.)"""
    taken = [
        m for m in layers if getattr(m, "gradient_checkpointing", False) and m.training and torch.is_grad_enabled()
    ]
    for m in taken:
        m.gradient_checkpointing = False
        m.__dict__[_CHECKPOINT_HERE] = True
    try:
        yield
    finally:
        for m in taken:
            m.gradient_checkpointing = True
            m.__dict__.pop(_CHECKPOINT_HERE, None)


def _attention_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    inner = self.__dict__[WRAPPED_ATTR]
    bounds: Boundaries | None = kwargs.get("boundaries") or active_boundaries()
    if bounds is None or varlen_backend_of(bounds) is None:
        return inner(*args, **kwargs)  # unpacked, or packed through the exact mask
    call = _as_kwargs(inner, args, kwargs)
    return packed_attention_forward(self, call["hidden_states"], call["position_embeddings"], bounds)


def _decoder_layer_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A decoder layer: its body runs inside the packing scope of the call, and so does its recomputation when
    activation checkpointing replays it in the backward pass (outside the call's scope)."""
    inner = self.__dict__[_SCOPE_INNER]
    bounds = kwargs.get("boundaries") or active_boundaries()
    if bounds is None:
        return inner(*args, **kwargs)
    if self.__dict__.get(_CHECKPOINT_HERE) and self.training and torch.is_grad_enabled():
        body = functools.partial(inspect.unwrap(type(self).forward), self)  # the layer's own forward, unwrapped
        return self._gradient_checkpointing_func(functools.partial(_run_in_scope, bounds, body, **kwargs), *args)
    with packing_scope(bounds):
        return inner(*args, **kwargs)


def _run_in_scope(bounds: Boundaries, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if torch.compiler.is_compiling() and active_boundaries() is bounds:
        # traced inside torch.compile's checkpoint (which allows no outside mutation): the compiled backward replays
        # the graph, not this Python, so the scope the forward runs in is all it needs
        return function(*args, **kwargs)
    with packing_scope(bounds):
        return function(*args, **kwargs)


def _packed_layer_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A registered layer: inside a packing scope, its family's packed forward on the stream; else its own."""
    inner = self.__dict__[_LAYER_INNER]
    bounds: Boundaries | None = kwargs.get("boundaries") or active_boundaries()
    spec = packed_layer_of(self)
    if bounds is None:
        if torch.compiler.is_compiling():  # dynamo cannot trace the check below; compiled, the replay is the graph's
            return inner(*args, **kwargs)
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1 and self.__dict__.get(_LAST_PACKED):
            # a replay in the backward pass (activation checkpointing) outside the packing scope: running the
            # layer's own forward would treat the packed stream as one document
            raise RuntimeError(
                f"deltapack: {type(self).__name__} is being recomputed in the backward pass without the batch's "
                "boundaries; expected activation checkpointing through transformers' gradient_checkpointing_enable() "
                "(or checkpointing of whole decoder layers), which deltapack keeps exact"
            )
        if torch.is_grad_enabled():
            self.__dict__[_LAST_PACKED] = False
        return inner(*args, **kwargs)
    for name in spec.cache_kwargs:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"deltapack: {type(self).__name__} got packed documents and a cache ({name}); expected no cache "
                "with packed inputs"
            )
    if args:
        hidden_states, args = args[0], args[1:]
    else:
        name = "hidden_states" if "hidden_states" in kwargs else next(iter(inspect.signature(inner).parameters))
        kwargs = dict(kwargs)
        hidden_states = kwargs.pop(name)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # compiled: the replay is the graph's
        self.__dict__[_LAST_PACKED] = True
    if spec.call_args:
        return spec.forward(self, hidden_states, bounds, *args, **kwargs)
    return spec.forward(self, hidden_states, bounds)
