"""Packed vs alone: run the documents alone and packed, and measure per layer, per module and per document.

Three measurements per input format:

- **propagated**: the packed forward as is; the max |diff| of every decoder layer's output and of the logits, per
  document, against the same document run alone. Shows where differences appear (and how they grow).
- **gradient**: the sum over documents of each document's summed next-token loss (targets inside the document
  only), packed vs the sum of the documents' losses run alone; relative L2 diff of all parameter gradients.
- **localised**: the packed forward again, with every watched module's per-token inputs replaced by the clean
  inputs (what the module got when each document ran alone) and its outputs replaced by the clean outputs once
  measured. A module that still differs leaks by itself (its own code: a conv, a recurrence, an attention mask, a
  norm over the sequence), not because something upstream leaked into it.

Legend: B, T = padded batch; L = one document's length; D = hidden size; V = vocabulary.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltapack.audit.formats import InputFormat, Layout

__all__ = ["AloneRun", "FormatResult", "ModelParts", "run_alone", "run_format", "short_reason"]

# keyword arguments that carry the packing itself: never replaced by clean values in the localised pass
_STRUCTURAL = ("mask", "position", "cache", "cu_seq", "seq_idx", "ids", "boundaries", "max_length")
_TOKENWISE_LEAVES = (nn.Linear, nn.Embedding, nn.Dropout, nn.Identity)


def short_reason(exc: BaseException, limit: int = 110) -> str:
    """``ExcType: first line of the message``, cut to ``limit`` characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


@dataclass
class ModelParts:
    """The parts of a causal LM the audit watches.

    Attributes:
        layers: (name, module) of each decoder layer, in order. layer_types: a type name per layer.
        watched: (name, module) of every module measured in the localised pass: the decoder layers (depth 0),
            their children (mixers, MLPs, norms: depth 1) and grandchildren (convs, inner norms: depth 2),
            token-wise leaves (Linear, Embedding, Dropout, activations) left out; names as in ``named_modules()``.
        depth: name -> depth below the layer list.
    """

    layers: list[tuple[str, nn.Module]]
    layer_types: list[str]
    watched: list[tuple[str, nn.Module]]
    depth: dict[str, int]
    probes: list[FunctionProbe] = field(default_factory=list)

    @contextlib.contextmanager
    def probing(self) -> Iterator[None]:
        """Route the probed functions of the modeling modules through their probes while the block runs."""
        for probe in self.probes:
            setattr(probe.home, probe.attr, probe)
        try:
            yield
        finally:
            for probe in self.probes:
                setattr(probe.home, probe.attr, probe.fn)

    @classmethod
    def of(cls, model: nn.Module) -> ModelParts:
        layers_name, layer_list = _decoder_layers(model)
        layers = [(f"{layers_name}.{i}", m) for i, m in enumerate(layer_list)]
        layer_types = _layer_types(model, layer_list)
        watched: list[tuple[str, nn.Module]] = []
        depth: dict[str, int] = {}
        for name, module in model.named_modules():
            if not name.startswith(layers_name + ".") or _in_vision_tower(name):
                continue
            level = name[len(layers_name) + 1 :].count(".")
            if level > 2 or isinstance(module, _TOKENWISE_LEAVES) or (level and _is_plain_activation(module)):
                continue
            watched.append((name, module))
            depth[name] = level
        probes = _function_probes([m for _, m in watched])
        for probe in probes:
            watched.append((probe.label, probe))
            depth[probe.label] = 3
        return cls(layers, layer_types, watched, depth, probes)


# module-level functions of a modeling module that hold a conv or a recurrence (called by the mixers' forward)
_PROBED = re.compile(r"conv1d|delta_rule|selective_scan|scan_fn|ssd|recurrent_gated|chunk_.*rule|wkv|lightning")


class FunctionProbe(nn.Module):
    """A module-level function of a transformers modeling module, made an ``nn.Module`` for the audit's hooks.

    Called once per layer in a forward; the audit keys its calls ``name()#k`` (k = 0, 1, ... in call order).
    """

    def __init__(self, home: types.ModuleType, attr: str, fn: Callable[..., Any]):
        super().__init__()
        self.home, self.attr, self.fn = home, attr, fn
        self.label = f"{attr}()"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def _function_probes(modules: Sequence[nn.Module]) -> list[FunctionProbe]:
    homes = {type(m).__module__ for m in modules if type(m).__module__.startswith("transformers.models.")}
    probes = []
    for home_name in sorted(homes):
        home = sys.modules.get(home_name)
        for attr, fn in sorted(vars(home).items()) if home is not None else ():
            if callable(fn) and not isinstance(fn, type) and _PROBED.search(attr) and not attr.endswith("update"):
                probes.append(FunctionProbe(home, attr, fn))
    return probes


def _in_vision_tower(name: str) -> bool:
    return any(part in name for part in ("visual", "vision", "audio", "image"))


def _is_plain_activation(module: nn.Module) -> bool:
    return (
        not any(True for _ in module.parameters())
        and not any(True for _ in module.children())
        and ("act" in type(module).__name__.lower() or module.__module__.startswith("torch.nn.modules.activation"))
    )


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's layer list: the longest ``nn.ModuleList`` outside any vision tower."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and not _in_vision_tower(name):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"found no decoder layers (an nn.ModuleList) in {type(model).__name__}")
    return best


_NOT_MIXERS = ("norm", "mlp", "feed_forward", "ffn", "moe", "expert", "dropout", "act", "router", "gate")


def _layer_types(model: nn.Module, layers: Sequence[nn.Module]) -> list[str]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == len(layers):
        return [str(t) for t in types]
    out = []
    for layer in layers:
        mixers = [n for n, _ in layer.named_children() if not any(w in n.lower() for w in _NOT_MIXERS)]
        out.append("+".join(mixers) if mixers else type(layer).__name__)
    return out


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    logits = getattr(value, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return None


def _output_tensors(value: Any) -> list[torch.Tensor | None]:
    """The tensors a module returned, by position (a tensor, or the tensor elements of a tuple)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v if isinstance(v, torch.Tensor) else None for v in value]
    return []


def _float_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[Any, torch.Tensor]:
    """The floating-point tensor inputs of a call, keyed by position or name (packing kwargs left out)."""
    found: dict[Any, torch.Tensor] = {}
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            found[i] = a
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not any(s in k for s in _STRUCTURAL):
            found[k] = v
    return found


def _channels_first(module: nn.Module) -> bool:
    """Modules and functions that take [B, C, T]: ``nn.Conv1d`` and the conv1d functions of modeling modules."""
    return isinstance(module, nn.Conv1d) or (isinstance(module, FunctionProbe) and "conv" in module.attr)


def _call_key(name: str, module: nn.Module, counts: dict[str, int]) -> str | None:
    """The key of this call of a watched module: its name on the first call, ``name#k`` for function probes
    (called once per layer); None for later calls of ordinary modules (only the first is measured)."""
    k = counts.get(name, 0)
    counts[name] = k + 1
    if isinstance(module, FunctionProbe):
        return f"{name}#{k}"
    return name if k == 0 else None


@dataclass
class AloneRun:
    """One document run alone: every watched module's per-token inputs and outputs ([L, ...] each), the
    decoder layers' outputs [L, D], the logits [L, V] and the gradient of its summed next-token loss (flat)."""

    inputs: dict[str, dict[Any, torch.Tensor]]
    outputs: dict[str, list[torch.Tensor | None]]
    layers: list[torch.Tensor | None]
    logits: torch.Tensor
    grad: torch.Tensor | None


@contextlib.contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in _params(model)])


def _doc_loss(logits_LV: torch.Tensor, ids_L: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy inside one document (L - 1 targets), in fp32."""
    if len(ids_L) < 2:
        return logits_LV.sum() * 0.0
    return F.cross_entropy(logits_LV[:-1].float(), ids_L[1:], reduction="sum")


def run_alone(model: nn.Module, parts: ModelParts, doc: int, ids_L: torch.Tensor, gradient: bool = True) -> AloneRun:
    """Run one document alone (input_ids [1, L], nothing else) and record what the audit compares against."""
    layout = Layout.alone(doc, len(ids_L))
    inputs: dict[str, dict[Any, torch.Tensor]] = {}
    outputs: dict[str, list[torch.Tensor | None]] = {}
    handles = []
    pre_counts: dict[str, int] = {}
    post_counts: dict[str, int] = {}
    for name, module in parts.watched:
        cf = _channels_first(module)

        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name, cf: bool = cf):
            key = _call_key(name, mod, pre_counts)
            if key is None:
                return None
            inputs[key] = {}
            for arg, t in _float_inputs(mod, args, kwargs).items():
                split = layout.split(t.detach(), cf)
                if split is not None:
                    inputs[key][arg] = split[0].clone()
            return None

        def post(mod: nn.Module, args: Any, kwargs: Any, out: Any, name: str = name, cf: bool = cf):
            key = _call_key(name, mod, post_counts)
            if key is None:
                return None
            outputs[key] = []
            for t in _output_tensors(out):
                split = None if t is None or not t.is_floating_point() else layout.split(t.detach(), cf)
                outputs[key].append(None if split is None else split[0].clone())
            return None

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    layer_out: list[torch.Tensor | None] = [None] * len(parts.layers)
    for i, (_, layer) in enumerate(parts.layers):
        handles.append(layer.register_forward_hook(_layer_recorder(layer_out, i)))
    model.zero_grad(set_to_none=True)
    with _hooks(handles), torch.set_grad_enabled(gradient):
        out = model(input_ids=ids_L[None], use_cache=False)
        logits = out.logits[0]
        grad = None
        if gradient:
            _doc_loss(logits, ids_L).backward()
            grad = _flat_grad(model)
            model.zero_grad(set_to_none=True)
    layers = []
    for t in layer_out:
        split = None if t is None else layout.split(t)
        layers.append(None if split is None else split[0])
    return AloneRun(inputs, outputs, layers, logits.detach(), grad)


def _layer_recorder(store: list[torch.Tensor | None], i: int) -> Any:
    """A forward hook that keeps the first output of decoder layer ``i`` (detached), first call only."""

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        t = _first_tensor(out)
        if store[i] is None and t is not None:
            store[i] = t.detach()

    return hook


@dataclass
class FormatResult:
    """What one input format gives on one model state.

    Attributes:
        raised: None, or the short reason the packed call raised.
        docs: the document indices, in placement order; lengths: their lengths.
        layers: [layer][doc] max |diff| of each decoder layer's output (None: not comparable).
        logits: [doc] max |diff| of the logits.
        grad_rel: relative L2 diff of the parameter gradients (None when not measured).
        own: module name -> [doc] max |diff| of the module's outputs with clean inputs (localised pass).
    """

    raised: str | None = None
    docs: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    layers: list[list[float | None]] = field(default_factory=list)
    logits: list[float] = field(default_factory=list)
    grad_rel: float | None = None
    own: dict[str, list[float]] = field(default_factory=dict)
    localise_error: str | None = None

    def worst(self) -> float:
        values = [v for row in self.layers for v in row if v is not None] + list(self.logits)
        return max(values, default=0.0)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.shape != b.shape:
        return None
    if a.numel() == 0:
        return 0.0
    d = (a.float() - b.float()).abs().max().item()
    return float("inf") if math.isnan(d) else d


def run_format(
    model: nn.Module,
    parts: ModelParts,
    fmt: InputFormat,
    documents: Sequence[torch.Tensor],
    alone: dict[int, AloneRun],
    gradient: bool = True,
    localise: bool = True,
    pad_token_id: int = 0,
    localise_above: float = 1e-5,
) -> FormatResult:
    """Packed vs alone for one input format; ``alone`` holds :func:`run_alone` of every document used.

    The localised pass runs only when some difference exceeds ``localise_above`` (there is a leak to find).
    """
    kwargs, layout = fmt.inputs(documents, pad_token_id)
    result = FormatResult(docs=[p.doc for p in layout.placements], lengths=[p.length for p in layout.placements])
    layer_out: list[torch.Tensor | None] = [None] * len(parts.layers)
    handles = [layer.register_forward_hook(_layer_recorder(layer_out, i)) for i, (_, layer) in enumerate(parts.layers)]
    model.zero_grad(set_to_none=True)
    try:
        with _hooks(handles), torch.set_grad_enabled(gradient):
            out = model(**kwargs)
            logits = out.logits
            split = layout.split(logits)
            if split is None:
                raise ValueError(f"logits of shape {tuple(logits.shape)} match neither the batch nor the stream")
            for s, p in zip(split, layout.placements):
                diff = _max_abs(s, alone[p.doc].logits)
                if diff is None:
                    raise ValueError(f"packed logits {tuple(s.shape)} vs alone {tuple(alone[p.doc].logits.shape)}")
                result.logits.append(diff)
            if gradient:
                loss = sum(_doc_loss(s, documents[p.doc]) for s, p in zip(split, layout.placements))
                loss.backward()
                packed = _flat_grad(model)
                reference = torch.stack([alone[p.doc].grad for p in layout.placements]).sum(0)
                result.grad_rel = _relative(packed, reference)
    except Exception as exc:  # the audit reports a raising model, it does not stop
        model.zero_grad(set_to_none=True)
        result.raised = short_reason(exc)
        return result
    model.zero_grad(set_to_none=True)
    for i, out_i in enumerate(layer_out):
        got = None if out_i is None else layout.split(out_i)
        row: list[float | None] = []
        for j, p in enumerate(layout.placements):
            ref = alone[p.doc].layers[i]
            row.append(None if got is None or ref is None else _max_abs(got[j], ref))
        result.layers.append(row)
    leaks = result.worst() > localise_above or (result.grad_rel is not None and result.grad_rel > localise_above)
    if localise and leaks:
        try:
            result.own = _localise(model, parts, kwargs, layout, alone)
        except Exception as exc:
            result.localise_error = short_reason(exc)
    return result


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = b.norm().item()
    diff = (a - b).norm().item()
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return float("inf") if math.isnan(diff) else diff / denom


def _localise(
    model: nn.Module, parts: ModelParts, kwargs: dict[str, Any], layout: Layout, alone: dict[int, AloneRun]
) -> dict[str, list[float]]:
    """Each watched module's max |diff| per document when its per-token inputs are the clean ones.

    One packed forward per depth: the modules of one depth never nest, so replacing their inputs never hides
    what a parent's own code did before calling a child.
    """
    docs = [p.doc for p in layout.placements]
    own: dict[str, list[float]] = {}
    for level in sorted(set(parts.depth.values())):
        handles = []
        pre_counts: dict[str, int] = {}
        post_counts: dict[str, int] = {}
        for name, module in parts.watched:
            if parts.depth[name] != level:
                continue
            handles.append(
                module.register_forward_pre_hook(_clean_inputs(name, layout, alone, docs, pre_counts), with_kwargs=True)
            )
            handles.append(
                module.register_forward_hook(_own_diff(name, layout, alone, docs, own, post_counts), with_kwargs=True)
            )
        with _hooks(handles), torch.no_grad():
            model(**kwargs)
    return own


def _clean_inputs(
    name: str, layout: Layout, alone: dict[int, AloneRun], docs: list[int], counts: dict[str, int]
) -> Any:
    """A forward pre-hook that swaps a module's per-token float inputs for the documents' clean ones."""

    def pre(mod: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        key = _call_key(name, mod, counts)
        if key is None or any(key not in alone[d].inputs for d in docs):
            return None
        cf = _channels_first(mod)
        clean = [alone[d].inputs[key] for d in docs]
        new_args, new_kw = list(args), dict(kw)
        for arg, t in _float_inputs(mod, args, kw).items():
            refs = [c.get(arg) for c in clean]
            split = layout.split(t, cf)
            if split is None or any(r is None or r.shape != s.shape for r, s in zip(refs, split)):
                continue
            fresh = layout.assemble(t, refs, cf)
            if isinstance(arg, int):
                new_args[arg] = fresh
            else:
                new_kw[arg] = fresh
        return tuple(new_args), new_kw

    return pre


def _own_diff(
    name: str,
    layout: Layout,
    alone: dict[int, AloneRun],
    docs: list[int],
    own: dict[str, list[float]],
    counts: dict[str, int],
) -> Any:
    """A forward hook that records a module's max |diff| per document against its clean outputs."""

    def post(mod: nn.Module, args: Any, kw: Any, out: Any) -> None:
        key = _call_key(name, mod, counts)
        if key is None or key in own or any(key not in alone[d].outputs for d in docs):
            return
        cf = _channels_first(mod)
        clean = [alone[d].outputs[key] for d in docs]
        diffs = [0.0] * len(docs)
        for pos, t in enumerate(_output_tensors(out)):
            refs = [c[pos] if pos < len(c) else None for c in clean]
            split = None if t is None or not t.is_floating_point() else layout.split(t, cf)
            if split is None or any(r is None or r.shape != s.shape for r, s in zip(refs, split)):
                continue
            for j, (s, r) in enumerate(zip(split, refs)):
                diffs[j] = max(diffs[j], _max_abs(s, r) or 0.0)
        own[key] = diffs

    return post
