"""ZAYA after ``deltapack.patch``: its CCA projection (q/k through two stacked causal convs, half of each value head
from the previous token) gives each packed document what it gives the document alone, forward and gradient, with
the unpatched projection leaking on the same input; the whole model is exact in every input format; the unpacked
path, generate() included, is bit-identical."""

from __future__ import annotations

import pytest
import torch

from deltapack import Boundaries
from deltapack.audit.core import ATOL, GRAD_RTOL
from deltapack.tiny import tiny_model
from helpers import assert_exact_in_every_format, assert_unpacked_bit_identical, checkpointed_grads, norm_rel

pytest.importorskip("transformers.models.zaya.modeling_zaya")
from deltapack.models.families.zaya import packed_cca_projection  # noqa: E402

LENGTHS = [5, 1, 9, 2, 1, 7]


def _projection(cca_time0: int, cca_time1: int, attention_bias: bool) -> torch.nn.Module:
    model = tiny_model("zaya", cca_time0=cca_time0, cca_time1=cca_time1, attention_bias=attention_bias)
    proj = model.model.layers[0].self_attn.qkv_proj
    with torch.no_grad():  # biases away from zero, so a tap that reads the wrong fill shows
        for name, p in proj.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return proj


def _bounds(lengths: list[int]) -> Boundaries:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return Boundaries.from_cu_seqlens(cu, (1, sum(lengths)))


def _grads(proj: torch.nn.Module, x: torch.Tensor, outs: tuple, weights: tuple) -> list[torch.Tensor]:
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    return list(torch.autograd.grad(loss, [x, *proj.parameters()]))


@pytest.mark.parametrize("widths,bias", [((3, 2), False), ((2, 2), True), ((2, 4), True)])
def test_cca_projection_packed_equals_each_document_alone(widths: tuple[int, int], bias: bool):
    proj = _projection(*widths, bias)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, sum(LENGTHS), proj.hidden_size, generator=gen, requires_grad=True)
    packed = packed_cca_projection(proj, x, _bounds(LENGTHS))
    weights = tuple(torch.randn(o.shape, generator=gen) for o in packed)
    packed_grads = _grads(proj, x, packed, weights)

    alone, alone_grads = [], None
    for a, b in zip(_bounds(LENGTHS).cu_seqlens_host[:-1], _bounds(LENGTHS).cu_seqlens_host[1:]):
        piece = x.detach()[:, a:b].clone().requires_grad_()
        outs = proj(piece, None)
        grads = _grads(proj, piece, outs, tuple(w[:, a:b] for w in weights))
        alone.append([o.detach() for o in outs])
        if alone_grads is None:
            alone_grads = [torch.zeros_like(x), *grads[1:]]
        else:
            alone_grads[1:] = [g0 + g for g0, g in zip(alone_grads[1:], grads[1:])]
        alone_grads[0][:, a:b] = grads[0]
    alone = [torch.cat(parts, dim=1) for parts in zip(*alone)]

    for got, want in zip(packed, alone):
        assert got.shape == want.shape
        assert (got.detach() - want).abs().max() <= ATOL
    for got, want in zip(packed_grads, alone_grads):
        assert float((got - want).norm() / want.norm()) <= GRAD_RTOL
    with torch.no_grad():  # the projection's own forward over the stream reads across documents: the test can fail
        leaked = proj(x.detach(), None)
    assert max(float((got - want).abs().max()) for got, want in zip(leaked, alone)) > 1e-2


def test_cca_projection_rejects_a_stream_of_the_wrong_length():
    proj = _projection(3, 2, False)
    with pytest.raises(ValueError, match="unpadded stream"):
        packed_cca_projection(proj, torch.randn(1, sum(LENGTHS) + 1, proj.hidden_size), _bounds(LENGTHS))


def test_zaya_packed_equals_alone_in_every_format():
    model = tiny_model("zaya")
    assert_exact_in_every_format(model, "zaya")


def test_zaya_unpacked_path_bit_identical_with_generate():
    model = tiny_model("zaya")
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(3))
    assert_unpacked_bit_identical(model, ids)


def test_zaya_gradient_checkpointing_keeps_documents_apart():
    """Training mode with transformers' gradient checkpointing: the CCA projection replayed in the backward pass
    still sees the batch's documents; gradients equal the sum of each document's gradients alone."""
    model = tiny_model("zaya")
    gen = torch.Generator().manual_seed(5)
    rows = [[torch.randint(3, 100, (n,), generator=gen).tolist() for n in (6, 1, 9)], [[5, 6, 7, 8]]]
    alone, packed, leaked = checkpointed_grads(model, rows)
    assert norm_rel(packed, alone) <= GRAD_RTOL
    assert norm_rel(leaked, alone) > 100 * GRAD_RTOL
