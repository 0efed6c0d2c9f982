"""TRL's SFTTrainer on a MoE model patched before the trainer is built, and deltapack.unpatch afterwards.

SFTTrainer turns the router's load-balancing loss on and computes it in its fused LM head, which runs the decoder
stack directly and weights the router logits by the batch's own [B, T] attention_mask. Reference for that loss:
every document alone through the unpatched model, router logits concatenated, transformers' load_balancing_loss_func
over exactly the real tokens.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import load_balancing_loss_func

import deltapack
from deltapack.data import PackedCollator, pack_dataset
from deltapack.data.demo import char_tokenizer
from deltapack.tiny import tiny_model
from helpers import PAD, documents, one_step_args

datasets = pytest.importorskip("datasets")
logging.getLogger("transformers").setLevel(logging.ERROR)

ARCHS = ["qwen3_5_moe", "qwen3_next"]
MAX_TOKENS = 40


def expected_aux_loss(model, docs) -> float:
    cfg = model.config
    with torch.no_grad():
        alone = [model(torch.tensor([d]), output_router_logits=True).router_logits for d in docs]
    per_layer = tuple(torch.cat([a[layer] for a in alone]) for layer in range(len(alone[0])))
    return load_balancing_loss_func(per_layer, cfg.num_experts, cfg.num_experts_per_tok, None).item()


def sft(model, tmp_path, train, collator):
    from trl import SFTConfig, SFTTrainer

    args = one_step_args(SFTConfig, tmp_path, len(train), max_length=None, packing=False, padding_free=False)
    return SFTTrainer(
        model=model, args=args, train_dataset=train, data_collator=collator, processing_class=char_tokenizer()
    )


def logged_aux_loss(trainer) -> float:
    return next(row["aux_loss"] for row in trainer.state.log_history if "aux_loss" in row)


def packed_rows() -> datasets.Dataset:
    train = pack_dataset(datasets.Dataset.from_dict({"input_ids": documents()}), MAX_TOKENS)
    assert len({len(r) for r in train["input_ids"]}) > 1  # rows of different lengths: the batch has padding
    return train


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_before_sft_trainer_moe_with_padding(arch, tmp_path) -> None:
    """The README recipe (pack_dataset + PackedCollator(indexed_mask=False)) and plain padded SFT batches: the
    trainer runs, and its load-balancing loss counts each real token once."""
    model = tiny_model(arch)
    expected = expected_aux_loss(model, documents())
    trainer = sft(
        deltapack.patch(copy.deepcopy(model)), tmp_path, packed_rows(), PackedCollator(PAD, indexed_mask=False)
    )
    assert trainer.aux_loss_enabled
    trainer.train()
    assert abs(logged_aux_loss(trainer) - expected) <= 1e-6 * expected

    # no packing at all: one document per row, right-padded by TRL's own collator
    plain = datasets.Dataset.from_dict({"input_ids": documents()})
    trainer = sft(deltapack.patch(copy.deepcopy(model)), tmp_path, plain, None)
    trainer.train()
    assert abs(logged_aux_loss(trainer) - expected) <= 1e-6 * expected


def test_indexed_mask_under_the_fused_head_is_refused_not_weighted(tmp_path) -> None:
    """Rows without padding and an indexed mask: the fused head would weight the aux loss by document index. Patched
    before the trainer this raises; patched after it (the entry forward then runs outside the fused head) the
    loss is right."""
    model = tiny_model("qwen3_5_moe")
    rows = pack_dataset(datasets.Dataset.from_dict({"input_ids": documents()}), MAX_TOKENS)
    full = rows.filter(lambda r: len(r["input_ids"]) == MAX_TOKENS)  # no padding in the batch
    docs = [d for r in full for d in _split(r)]
    expected = expected_aux_loss(model, docs)

    trainer = sft(deltapack.patch(copy.deepcopy(model)), tmp_path, full, PackedCollator(PAD, indexed_mask=True))
    with pytest.raises(ValueError, match=r"indexed_mask=False"):
        trainer.train()

    trainer = sft(copy.deepcopy(model), tmp_path, full, PackedCollator(PAD, indexed_mask=True))
    deltapack.patch(trainer.model)
    trainer.train()
    assert abs(logged_aux_loss(trainer) - expected) <= 1e-6 * expected


def _split(row) -> list[list[int]]:
    out, start = [], 0
    for n in row["seq_lengths"]:
        out.append(row["input_ids"][start : start + n])
        start += n
    return out


def test_unpatch_keeps_the_fused_head_sft_trainer_installed(tmp_path) -> None:
    model = deltapack.patch(tiny_model("qwen3_5"))
    trainer = sft(model, tmp_path, packed_rows(), PackedCollator(PAD))
    fused = model.forward
    deltapack.unpatch(model)
    assert not deltapack.is_patched(model)
    assert model.forward == fused  # TRL's forward, installed after deltapack's, stays
    trainer.train()  # the fused head runs, now on the unpatched model
    deltapack.patch(model)  # and patching again wraps what is there now
    assert deltapack.is_patched(model)
    trainer.args.max_steps = 2
    trainer.train()
    deltapack.unpatch(model)
    assert model.forward == fused
