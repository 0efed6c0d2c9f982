"""The patched tiny KDA, GDN-variant and short-conv models on CUDA: packed documents equal each document alone
through the same kernels (FLA's chunk_kda, chunk_gated_delta_rule and varlen conv), the unpatched model leaks, and a
packed forward+backward with prebuilt boundaries makes no host sync."""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import assert_no_host_sync_in_packed_step, assert_packed_equals_alone_on_cuda, requires_cuda

import deltapack
from deltapack.ops import kda as kda_module
from deltapack.tiny import tiny_model

pytestmark = [pytest.mark.gpu, requires_cuda]

ARCHS = ("kimi_linear", "bailing_hybrid", "olmo_hybrid", "lara_mini", "qwen4_exp", "lfm2", "lfm2_moe", "lfm3")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_alone_on_cuda(arch, dtype):
    model = tiny_model(arch).to("cuda", dtype)
    assert_packed_equals_alone_on_cuda(model, dtype)
    assert not kda_module._fla_failure, kda_module._fla_failure  # no kernel failure hidden by the fallback


# kimi_linear: FLA's chunk_kda builds its chunk index from the host offsets (a copy to the GPU, a sync) unless it is
# handed the batch's device index (deltapack.ops.fla_index)
@pytest.mark.parametrize("arch", ["kimi_linear", "olmo_hybrid", "lfm2"])
def test_no_host_sync_in_packed_forward_backward(arch):
    assert_no_host_sync_in_packed_step(deltapack.patch(tiny_model(arch).to("cuda", torch.bfloat16)).train())
