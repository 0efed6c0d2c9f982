"""Each packed layer forward of the KDA, short-conv and GDN-variant families against the unpatched transformers
layer run on each document alone: outputs and gradients (input and parameters), with the unpatched layer run on
the whole stream shown to leak on the same input."""

from __future__ import annotations

import functools
import importlib
import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, __version__

from deltapack import Boundaries
from deltapack.models.families import gated_deltanet, kda, short_conv
from deltapack.models.gated_deltanet import packed_gdn_forward
from deltapack.tiny import set_long_memory

CASES = {  # arch: (tiny config, packed forward, long-memory setter)
    **{a: (c, kda.packed_kda_forward, kda.set_long_memory) for a, c in kda.TINY.items()},
    **{a: (c, short_conv.packed_short_conv_forward, None) for a, c in short_conv.TINY.items()},
    **{a: (c, packed_gdn_forward, set_long_memory) for a, c in gated_deltanet.TINY.items()},
}
# model types transformers does not register as causal LMs (multimodal only): their layer alone, from a text config
LAYER_ONLY = {
    "glm5_next": (
        "transformers.models.glm5_next.configuration_glm5_next.Glm5NextTextConfig",
        dict(hidden_size=64, layer_types=["linear_attention"], linear_num_heads=2, linear_head_dim=16),
        kda.packed_kda_forward,
        kda.set_long_memory,
    ),
}
CASES.update({a: (None, forward, setter) for a, (_, _, forward, setter) in LAYER_ONLY.items()})
LAYERS = kda.KDA_LAYERS + short_conv.SHORT_CONV_LAYERS + gated_deltanet.GATED_DELTANET.layers[0].classes
LENGTHS = [5, 1, 9, 4, 1, 12]


def installed(arch: str) -> bool:
    """Whether the installed transformers has this model type (older releases lack some: CI also runs 5.17)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return arch in CONFIG_MAPPING_NAMES and importlib.util.find_spec(f"transformers.models.{arch}") is not None


PARAMS = [
    pytest.param(a, marks=pytest.mark.skipif(not installed(a), reason=f"transformers {__version__} has no {a}"))
    for a in CASES
]


@functools.cache
def tiny(arch):
    fields = dict(CASES[arch][0])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    if CASES[arch][2] is not None:
        CASES[arch][2](model)
    return model.float().eval()


def first_layer(arch):
    if arch in LAYER_ONLY:
        return layer_alone(arch)
    names = {path.rsplit(".", 1)[1] for path in LAYERS}
    return next(m for m in tiny(arch).modules() if type(m).__name__ in names)


@functools.cache
def layer_alone(arch):
    config_path, fields, _, setter = LAYER_ONLY[arch]
    module, name = config_path.rsplit(".", 1)
    fields = {**{k: v for k, v in fields.items() if k != "model_type"}, "num_hidden_layers": 1}
    config = getattr(importlib.import_module(module), name)(**fields)
    path = next(p for p in LAYERS if f".{arch}." in p)
    module, name = path.rsplit(".", 1)
    torch.manual_seed(0)
    layer = getattr(importlib.import_module(module), name)(config, 0)
    with torch.no_grad():  # parameters left uninitialised by the constructor (torch.empty)
        for p in layer.parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape) + 0.5)
    setter(layer)
    return layer.float().eval()


def segments(lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return Boundaries.from_cu_seqlens(cu, (1, sum(lengths)))


def param_grads(layer, out, weights):
    layer.zero_grad(set_to_none=True)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("arch", PARAMS)
def test_packed_layer_equals_the_unpatched_layer_per_document(arch):
    layer = first_layer(arch)
    forward = CASES[arch][1]
    bounds = segments(LENGTHS)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, sum(LENGTHS), layer.hidden_size if hasattr(layer, "hidden_size") else 64, generator=gen)
    x.requires_grad_()
    weights = torch.randn(x.shape, generator=gen)

    packed = forward(layer, x, bounds)
    assert packed.shape == x.shape
    (dx_packed,) = torch.autograd.grad((packed * weights).sum(), x, retain_graph=True)
    dparams_packed = param_grads(layer, packed, weights)

    host = bounds.cu_seqlens_host
    alone, dx_alone, dparams_alone = [], [], {}
    for a, b in zip(host[:-1], host[1:]):
        piece = x.detach()[:, a:b].clone().requires_grad_()
        out = layer(piece)
        (dx,) = torch.autograd.grad((out * weights[:, a:b]).sum(), piece, retain_graph=True)
        for name, g in param_grads(layer, out, weights[:, a:b]).items():
            dparams_alone[name] = dparams_alone.get(name, 0) + g
        alone.append(out.detach())
        dx_alone.append(dx)
    alone_TD, dx_alone_TD = torch.cat(alone, dim=1), torch.cat(dx_alone, dim=1)

    scale = alone_TD.abs().max()  # tiny random init gives small outputs: compare relative to them as well
    assert (packed.detach() - alone_TD).abs().max() <= 1e-5 * min(1.0, scale)
    assert ((dx_packed - dx_alone_TD).norm() / dx_alone_TD.norm()) <= 1e-4
    assert dparams_packed.keys() == dparams_alone.keys()
    for name, g in dparams_alone.items():
        assert ((dparams_packed[name] - g).norm() / g.norm().clamp_min(1e-30)) <= 1e-4, name
    # the unpatched layer over the same stream mixes documents: the test can fail
    with torch.no_grad():
        assert (layer(x) - alone_TD).abs().max() > 1e-3 * scale


@pytest.mark.parametrize("arch", PARAMS)
def test_packed_layer_rejects_a_stream_of_the_wrong_length(arch):
    layer = first_layer(arch)
    with pytest.raises(ValueError, match="unpadded stream"):
        CASES[arch][1](layer, torch.zeros(1, 7, 64), segments([3, 3]))
