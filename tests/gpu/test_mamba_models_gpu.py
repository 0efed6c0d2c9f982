"""The patched tiny Mamba models on CUDA: packed documents equal each document alone through the same kernels
(FLA's simple GLA for SSD, the Triton selective scan for Mamba1), the unpatched model leaks, and a packed
forward+backward with prebuilt boundaries makes no host sync."""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import assert_no_host_sync_in_packed_step, assert_packed_equals_alone_on_cuda, requires_cuda

import deltapack
from deltapack.tiny import tiny_model

pytestmark = [pytest.mark.gpu, requires_cuda]

ARCHS = (
    "mamba2",
    "nemotron_h",
    "bamba",
    "falcon_h1",
    "granitemoehybrid",
    "zamba2",
    "mamba",
    "falcon_mamba",
    "jamba",
    "zamba",
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_alone_on_cuda(arch, dtype):
    model = tiny_model(arch).to("cuda", dtype)
    assert_packed_equals_alone_on_cuda(model, dtype)


@pytest.mark.parametrize("arch", ["mamba2", "falcon_mamba", "jamba"])
def test_no_host_sync_in_packed_forward_backward(arch):
    assert_no_host_sync_in_packed_step(deltapack.patch(tiny_model(arch).to("cuda", torch.bfloat16)).train())
