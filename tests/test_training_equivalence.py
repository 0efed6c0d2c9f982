"""One optimizer step on packed rows equals the same step on the documents in padded, unpacked batches.

Packed: ``pack_documents`` + ``PackedCollator`` into a patched model. Reference: every document alone in its own
row of a right-padded batch (0/1 mask, -100 labels at padding) through the unpatched model. fp32 on the CPU; the
token-mean loss and every parameter update must agree to 1e-5 (relative). The unpatched model on the packed rows
must not agree, so a patch that did nothing would fail.
"""

from __future__ import annotations

import copy
import logging

import pytest
from torch import nn

import deltapack
from deltapack.data import PackedCollator, pack_documents
from deltapack.tiny import tiny_model
from helpers import PAD, documents, padded_unpacked, rel, sgd_step, update_rel

logging.getLogger("transformers").setLevel(logging.ERROR)


def base_model(arch: str) -> nn.Module:
    model = tiny_model(arch)
    if arch == "qwen3_5_moe":
        model.config.output_router_logits = True  # the loss then includes the router's load-balancing loss
        model.config.router_aux_loss_coef = 0.1
        model.router_aux_loss_coef = 0.1
    return model


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_one_step_on_packed_rows_equals_padded_unpacked(arch: str) -> None:
    docs = documents()
    reference = base_model(arch)
    packed = pack_documents(docs, max_tokens=40)
    assert packed.stats.rows < len(docs)  # documents really share rows
    packed_batch = PackedCollator(pad_token_id=PAD)(packed.rows)

    loss_ref, params_ref, step_ref = sgd_step(copy.deepcopy(reference), padded_unpacked(docs))
    loss_packed, params_packed, step_packed = sgd_step(deltapack.patch(copy.deepcopy(reference)), packed_batch)
    loss_leak, params_leak, step_leak = sgd_step(copy.deepcopy(reference), packed_batch)

    assert rel(loss_packed, loss_ref) <= 1e-5, (loss_packed, loss_ref)
    worst_param = max(rel(params_packed[n], params_ref[n]) for n in params_ref)
    assert worst_param <= 1e-5, worst_param
    # stronger than the parameters: the update itself agrees, over all parameters together
    assert update_rel(step_packed, step_ref) <= 1e-5, update_rel(step_packed, step_ref)
    # the unpatched model on the same packed rows: documents leak into each other. The loss of a random-init model
    # is close to log(vocab) whatever it reads, so it moves little; the update shows the leak plainly
    assert rel(loss_leak, loss_ref) > 1e-5, (loss_leak, loss_ref)
    assert max(rel(params_leak[n], params_ref[n]) for n in params_ref) > 1e-5
    assert update_rel(step_leak, step_ref) > 0.1, update_rel(step_leak, step_ref)
