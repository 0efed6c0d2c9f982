"""The chunked loss on CUDA in bf16: FLA's cross-entropy kernels pass the check that admits them, and the fused
chunked loss equals the full-logits loss (transformers' ForCausalLMLoss) in the loss and in every gradient within
bf16 rounding, for the e2e model's vocabulary and the 9B config's (where FLA splits the vocabulary)."""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import rel_err, requires_cuda

from deltapack.chunked_loss import checked, chunked_lm_loss, chunked_lm_loss_ref, logit_grad_fla

pytestmark = [pytest.mark.gpu, requires_cuda]

TOL = {"loss": 1e-3, "grad": 2e-2}  # relative L2, bf16 logits and gradients on both sides


@pytest.mark.parametrize("vocab", [32000, 248320])
def test_fused_chunked_loss_equals_full_logits_on_cuda(vocab: int):
    pytest.importorskip("fla")
    gen = torch.Generator(device="cuda").manual_seed(0)
    head = torch.nn.Linear(512, vocab, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(head.weight, std=0.05, generator=gen)
    hidden = torch.randn(1, 6000, 512, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (1, 6000), device="cuda", generator=gen)
    labels[0, ::5] = -100
    assert checked(logit_grad_fla, head.weight) is logit_grad_fla
    params = (hidden, head.weight)
    ref = chunked_lm_loss_ref(head, hidden, labels)
    ref_grads = torch.autograd.grad(ref, params)
    got = chunked_lm_loss(head, hidden, labels, chunk=2048)
    got_grads = torch.autograd.grad(got, params)
    assert rel_err(got, ref) <= TOL["loss"]
    for g, r in zip(got_grads, ref_grads):
        assert rel_err(g, r) <= TOL["grad"]
