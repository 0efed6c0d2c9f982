"""The patched tiny KDA, GDN-variant and short-conv models on CUDA: packed documents equal each document alone
through the same kernels (FLA's chunk_kda, chunk_gated_delta_rule and varlen conv), the unpatched model leaks, and a
packed forward+backward with prebuilt boundaries makes no host sync."""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import LEAK, alone, make_batch, per_doc_diff, requires_cuda

import deltapack
from deltapack import Boundaries
from deltapack.diagnostics import count_host_syncs
from deltapack.ops import kda as kda_module
from deltapack.tiny import tiny_model

pytestmark = [pytest.mark.gpu, requires_cuda]

ARCHS = ("kimi_linear", "bailing_hybrid", "olmo_hybrid", "lara_mini", "qwen4_exp", "lfm2", "lfm2_moe", "lfm3")
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}  # max |diff| in fp32 (TF32 matmuls in FLA), relative L2 in bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_alone_on_cuda(arch, dtype):
    model = tiny_model(arch).to("cuda", dtype)
    ids, doc_ids, places = make_batch(model.config.vocab_size)
    with torch.no_grad():
        leaky = model(input_ids=ids, attention_mask=doc_ids, use_cache=False).logits
        deltapack.patch(model)
        out = model(input_ids=ids, attention_mask=doc_ids).logits
        alone_logits = [alone(model, ids[r, c : c + n]) for r, c, n in places]
    assert per_doc_diff(out, places, alone_logits, dtype) <= TOL[dtype]
    assert per_doc_diff(leaky, places, alone_logits, dtype) > LEAK
    assert not kda_module._fla_failure, kda_module._fla_failure  # no kernel failure hidden by the fallback


# kimi_linear: FLA's chunk_kda builds its chunk index from the host offsets (a copy to the GPU, a sync) unless it is
# handed the batch's device index (deltapack.ops.fla_index)
@pytest.mark.parametrize("arch", ["kimi_linear", "olmo_hybrid", "lfm2"])
def test_no_host_sync_in_packed_forward_backward(arch):
    model = deltapack.patch(tiny_model(arch).to("cuda", torch.bfloat16)).train()
    ids, doc_ids, _ = make_batch(model.config.vocab_size, seed=2)

    def step(bounds):
        out = model(input_ids=ids, labels=ids, boundaries=bounds)
        out.loss.backward()
        return out.loss

    step(Boundaries.from_document_ids(doc_ids.cpu()).to("cuda"))  # compiles the kernels, checks them once
    bounds = Boundaries.from_document_ids(doc_ids.cpu()).to("cuda")
    losses = []
    assert count_host_syncs(lambda: losses.append(step(bounds))) == 0
    assert torch.isfinite(losses[0]).item()
