"""The MoE router's load-balancing loss on a packed batch counts every real token exactly once.

The patched model runs the decoder on the unpadded stream of real tokens, so the router sees each real token once,
no padding, and no weight from the document index. Reference: every document alone through the unpatched model,
its router logits concatenated, and transformers' own load_balancing_loss_func over exactly those tokens.
"""

from __future__ import annotations

import logging

import torch
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import load_balancing_loss_func

import deltapack
from deltapack.data import PackedCollator, pack_documents
from deltapack.tiny import tiny_model

logging.getLogger("transformers").setLevel(logging.ERROR)

LENGTHS = (4, 1, 13, 7, 22, 3, 9, 30)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_router_aux_loss_counts_each_real_token_once() -> None:
    model = tiny_model("qwen3_5_moe")
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, cfg.vocab_size, (n,), generator=gen).tolist() for n in LENGTHS]
    rows = pack_documents(docs, max_tokens=32).rows
    assert max(len(r["seq_lengths"]) for r in rows) >= 3  # document ids up to 3 and more in one row
    batch = PackedCollator(pad_token_id=0)(rows)
    padded_more = PackedCollator(pad_token_id=0, pad_to_multiple_of=64)(rows)
    real_tokens = sum(LENGTHS)
    assert int((batch["attention_mask"] > 0).sum()) == real_tokens < batch["input_ids"].numel()

    with torch.no_grad():
        alone = [model(torch.tensor([d]), output_router_logits=True).router_logits for d in docs]
        per_layer = tuple(torch.cat([a[layer] for a in alone]) for layer in range(len(alone[0])))
        expected = load_balancing_loss_func(per_layer, cfg.num_experts, cfg.num_experts_per_tok, None)
        leaked = model(**batch, output_router_logits=True).aux_loss  # unpatched: indexed mask used as weights

        deltapack.patch(model)
        try:
            out = model(**batch, output_router_logits=True)
            out_more_padding = model(**padded_more, output_router_logits=True)
        finally:
            deltapack.unpatch(model)

    assert all(logits.shape[0] == real_tokens for logits in out.router_logits)  # each real token once
    assert rel(out.aux_loss, expected) <= 1e-6, (out.aux_loss, expected)
    assert rel(out_more_padding.aux_loss, expected) <= 1e-6  # padding never counts
    assert rel(leaked, expected) > 1e-4, (leaked, expected)
