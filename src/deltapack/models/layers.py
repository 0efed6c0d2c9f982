"""The registry of packed layers: which transformers layers deltapack runs its own way on a packed stream.

A *family* is data: the model types it makes patchable and, for each kind of layer that needs it, the
transformers classes and one packed forward. Adding a family is one module in :mod:`deltapack.models.families`
that calls :func:`register_family`; every module there is imported when the registry is first read.

A packed forward has the signature ``forward(layer, hidden_states, bounds) -> output``:

- ``layer``: the transformers module (its parameters are used as they are);
- ``hidden_states``: [1, T, D] the unpadded stream that ``bounds`` describes;
- ``bounds``: the batch's :class:`~deltapack.boundaries.Boundaries`;
- the output has the structure the transformers layer's own forward returns (a tensor, or the same tuple), each
  document's rows equal to what the layer gives for that document alone.

The boundaries reach a layer through the *packing scope* (:mod:`deltapack.models.scope`), set by the patched
model for the whole packed call, so a layer needs no keyword argument threaded down to it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltapack import ops
from deltapack.boundaries import Boundaries

__all__ = [
    "Family",
    "PackedLayer",
    "check_packed_stream",
    "family_of",
    "packed_conv",
    "packed_layer_of",
    "register_family",
    "register_layers",
    "supported_model_types",
]


@dataclass(frozen=True)
class PackedLayer:
    """One kind of transformers layer and its packed forward.

    Attributes:
        classes: qualified class names, ``"transformers.models.mamba2.modeling_mamba2.Mamba2Mixer"``.
        forward: ``forward(layer, hidden_states [1, T, D], bounds) -> output`` (see the module docstring).
        cache_kwargs: keyword arguments through which the layer receives a cache; a packed call that is given one
            raises (packed documents cannot share a cache).
        call_args: the forward also receives the call's other arguments, as the layer was called:
            ``forward(layer, hidden_states, bounds, *args, **kwargs)`` (for a layer that needs more than the stream).
    """

    classes: tuple[str, ...]
    forward: Callable[..., Any]
    cache_kwargs: tuple[str, ...] = ("cache", "cache_params", "past_key_values", "layer_past", "state")
    call_args: bool = False


@dataclass(frozen=True)
class Family:
    """A family of models that :func:`deltapack.patch` accepts.

    Attributes:
        name: the op family (``"ssd"``, ``"gated_deltanet"``, ``"attention"``, ...), for docs and logs.
        model_types: the transformers ``model_type`` values this family makes patchable.
        layers: the layers that run a packed forward of their own (none for attention-only families, whose
            attention is kept within documents by the attention hooks).
        pads_exactly: whether transformers' own forward gives each row of a plainly padded batch (one document per
            row, 0/1 mask) exactly what the row gives alone. When it does, such batches take the original forward
            untouched; when it does not (a recurrence that reads the padding), deltapack unpads them like packed
            rows, except for calls that ask for a cache (generation keeps transformers' path).
    """

    name: str
    model_types: tuple[str, ...]
    layers: tuple[PackedLayer, ...] = field(default=())
    pads_exactly: bool = True


_FAMILIES: dict[str, Family] = {}
_BY_MODEL_TYPE: dict[str, Family] = {}
_BY_CLASS: dict[str, PackedLayer] = {}
_loaded = False


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry; returns it. A model type or layer class claimed twice raises."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"deltapack: the family {family.name!r} is registered twice")
    for model_type in family.model_types:
        other = _BY_MODEL_TYPE.get(model_type)
        if other is not None and other is not family:
            raise ValueError(f"deltapack: model_type {model_type!r} is claimed by {other.name!r} and {family.name!r}")
    for layer in family.layers:
        for name in layer.classes:
            other = _BY_CLASS.get(name)
            if other is not None and other is not layer:
                raise ValueError(f"deltapack: the layer class {name} is registered twice")
    _FAMILIES[family.name] = family
    for model_type in family.model_types:
        _BY_MODEL_TYPE[model_type] = family
    for layer in family.layers:
        for name in layer.classes:
            _BY_CLASS[name] = layer
    return family


def register_layers(
    name: str,
    model_types: tuple[str, ...],
    layers: dict[str | tuple[str, ...], Callable[..., Any]],
    *,
    pads_exactly: bool = True,
    cache_kwargs: tuple[str, ...] | None = None,
) -> Family:
    """:func:`register_family` in one call for the common case: ``layers`` maps a layer class name (or a tuple of
    names sharing a forward) to its packed forward; ``cache_kwargs``, when given, for every one of them (else
    :class:`PackedLayer`'s default). Returns the family."""
    cache = {} if cache_kwargs is None else {"cache_kwargs": cache_kwargs}
    packed = tuple(
        PackedLayer(classes=(classes,) if isinstance(classes, str) else classes, forward=forward, **cache)
        for classes, forward in layers.items()
    )
    return register_family(Family(name=name, model_types=model_types, layers=packed, pads_exactly=pads_exactly))


def check_packed_stream(layer: nn.Module, hidden_states: torch.Tensor, bounds: Boundaries) -> None:
    """Raise ValueError unless ``hidden_states`` is the unpadded stream [1, T, hidden] that ``bounds`` describes
    (what every packed forward is given; anything else means the model was not patched)."""
    if hidden_states.shape[:2] != (1, bounds.total_tokens):
        raise ValueError(
            f"deltapack: {type(layer).__name__} got hidden states of shape {tuple(hidden_states.shape)}; expected "
            f"the unpadded stream [1, {bounds.total_tokens}, hidden] (was the model patched with deltapack.patch?)"
        )


def packed_conv(conv: nn.Module, x_1TC: torch.Tensor, activation: str | None, bounds: Boundaries) -> torch.Tensor:
    """A layer's depthwise causal ``nn.Conv1d`` (weight [C, 1, W], bias [C] or None) over the packed stream
    x [1, T, C], cut at every document start, then ``activation`` (None or "silu"): [1, T, C] in the dtype of x."""
    return ops.causal_conv1d(x_1TC, conv.weight.squeeze(1), conv.bias, activation, segments=bounds.segments)


def _load() -> None:
    """Import every module of :mod:`deltapack.models.families` once (each registers its family)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from deltapack.models import families

    for info in pkgutil.iter_modules(families.__path__):
        importlib.import_module(f"{families.__name__}.{info.name}")


def family_of(model_type: str) -> Family | None:
    """The family that makes ``model_type`` patchable (``*_text`` types fall back to their base type)."""
    _load()
    return _BY_MODEL_TYPE.get(model_type) or _BY_MODEL_TYPE.get(model_type.removesuffix("_text"))


def packed_layer_of(module: nn.Module) -> PackedLayer | None:
    """The registered packed layer for ``module``'s class or a base class of it (FSDP2 subclasses the classes it
    shards), or None."""
    _load()
    for cls in type(module).__mro__:
        layer = _BY_CLASS.get(f"{cls.__module__}.{cls.__qualname__}")
        if layer is not None:
            return layer
    return None


def supported_model_types() -> tuple[str, ...]:
    """Every model_type :func:`deltapack.patch` accepts, sorted."""
    _load()
    return tuple(sorted(_BY_MODEL_TYPE))
