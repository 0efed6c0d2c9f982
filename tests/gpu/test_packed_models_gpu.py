"""The patched tiny models on CUDA: packed documents equal each document alone (outputs and gradients), through
the fast path (FLA for the GDN layers, varlen attention in bf16), and no host sync once the boundaries exist."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import LEAK, ROWS, alone, make_batch, per_doc_diff, rel_err, requires_cuda

import deltapack
from deltapack import Boundaries
from deltapack.diagnostics import count_host_syncs
from deltapack.models.attention import varlen_backend_of
from deltapack.ops import fla
from deltapack.tiny import tiny_model

pytestmark = [pytest.mark.gpu, requires_cuda]

ARCHS = ("qwen3_5", "qwen3_5_moe", "qwen3_next")
# packed vs alone, per document: max |diff| of logits in fp32 (as on the CPU), relative L2 in bf16
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def model_on_cuda(arch: str, dtype: torch.dtype):
    return tiny_model(arch).to("cuda", dtype)


def doc_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss inside one document: logits [L, V], ids [L]."""
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_alone_on_gpu(arch, dtype):
    model = model_on_cuda(arch, dtype)
    ids, doc_ids, places = make_batch(model.config.vocab_size)
    with torch.no_grad():
        leaky = model(input_ids=ids, attention_mask=doc_ids).logits
        deltapack.patch(model)
        packed = model(input_ids=ids, attention_mask=doc_ids).logits
        alone_logits = [alone(model, ids[r, c : c + n]) for r, c, n in places]
    tol = TOL[dtype]
    diff, leak = per_doc_diff(packed, places, alone_logits, dtype), per_doc_diff(leaky, places, alone_logits, dtype)
    assert diff <= tol, f"packed vs alone: {diff:.3g} > {tol}"
    assert leak > max(tol, LEAK), f"the unpatched model should leak, got {leak:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_gradient_equals_sum_alone_on_gpu(arch, dtype):
    model = deltapack.patch(model_on_cuda(arch, dtype))
    ids, doc_ids, places = make_batch(model.config.vocab_size, seed=1)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_of(loss):
        got = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).float().flatten() for g, p in zip(got, params)])

    logits = model(input_ids=ids, attention_mask=doc_ids).logits
    packed = grad_of(sum(doc_loss(logits[r, c : c + n], ids[r, c : c + n]) for r, c, n in places))
    summed = sum(grad_of(doc_loss(alone(model, ids[r, c : c + n]), ids[r, c : c + n])) for r, c, n in places)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    err = rel_err(packed, summed)
    assert err <= tol, f"packed gradient vs summed alone: {err:.3g} > {tol}"
    deltapack.unpatch(model)
    logits = model(input_ids=ids, attention_mask=doc_ids).logits
    leaky = grad_of(sum(doc_loss(logits[r, c : c + n], ids[r, c : c + n]) for r, c, n in places))
    leak = rel_err(leaky, summed)
    assert leak > max(tol, LEAK), f"the unpatched gradient should leak, got {leak:.3g}"


def test_bf16_packed_batch_takes_the_varlen_path():
    model = deltapack.patch(model_on_cuda("qwen3_5", torch.bfloat16))
    ids, doc_ids, _ = make_batch(model.config.vocab_size)
    bounds = Boundaries.from_document_ids(doc_ids.cpu()).to("cuda")
    with torch.no_grad():
        model(input_ids=ids, boundaries=bounds)
    assert varlen_backend_of(bounds) in ("torch_varlen", "flash_attn")
    assert bounds.segments.has_plan(fla.build_plan)  # the FLA index tensors, built once for the batch


@pytest.mark.parametrize("arch", ARCHS)
def test_no_host_sync_in_packed_forward_backward(arch):
    """No host sync in a packed forward+backward with prebuilt boundaries (torch's sync debug mode)."""
    model = deltapack.patch(model_on_cuda(arch, torch.bfloat16)).train()
    ids, doc_ids, _ = make_batch(model.config.vocab_size, seed=2)

    def step(bounds):
        out = model(input_ids=ids, labels=ids, boundaries=bounds)
        out.loss.backward()
        return out.loss

    step(Boundaries.from_document_ids(doc_ids.cpu()).to("cuda"))  # compiles and autotunes the kernels
    bounds = Boundaries.from_document_ids(doc_ids.cpu()).to("cuda")
    losses = []
    assert count_host_syncs(lambda: losses.append(step(bounds))) == 0
    assert torch.isfinite(losses[0]).item()


@pytest.mark.parametrize("arch", ARCHS)
def test_collator_batch_on_gpu(arch):
    """What PackedCollator hands a trainer (indexed mask, restarting position_ids, labels, padding), moved to CUDA
    as is: boundaries built inside the forward, exact vs alone in fp32, and the unpatched model leaks."""
    from deltapack.data import PackedCollator

    model = model_on_cuda(arch, torch.float32)
    ids, _, places = make_batch(model.config.vocab_size, seed=3)
    rows = [{"input_ids": ids[r, : sum(row)].tolist(), "seq_lengths": row} for r, row in enumerate(ROWS)]
    batch = {k: v.cuda() for k, v in PackedCollator(pad_token_id=0)(rows).items()}
    with torch.no_grad():
        leaky = model(**batch, use_cache=False).logits
        deltapack.patch(model)
        out = model(**batch)
        alone_logits = [alone(model, ids[r, c : c + n]) for r, c, n in places]
    assert torch.isfinite(out.loss).item()
    assert per_doc_diff(out.logits, places, alone_logits, torch.float32) <= TOL[torch.float32]
    assert per_doc_diff(leaky, places, alone_logits, torch.float32) > LEAK
