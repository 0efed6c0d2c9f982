"""Packed training through the real Hugging Face Trainer, TRL's SFTTrainer and PEFT LoRA, on tiny CPU models.

Every test takes one step on packed rows and compares it with the same step on the documents one per row in a
padded batch through the unpatched model (see test_training_equivalence), so each one fails if packing leaks.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import deltapack
from deltapack.data import PackedCollator, pack_dataset, pack_documents
from deltapack.data.demo import char_tokenizer
from deltapack.tiny import tiny_model
from helpers import PAD, checkpointing_arg, documents, one_step_args, padded_unpacked, rel, sgd_step, update_rel

datasets = pytest.importorskip("datasets")
logging.getLogger("transformers").setLevel(logging.ERROR)

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def reference() -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The initial model, and its parameters and update after one SGD step on padded unpacked documents."""
    model = tiny_model("qwen3_5")
    _, params, step = sgd_step(copy.deepcopy(model), padded_unpacked(documents()))
    return model, params, step


def packed_dataset() -> datasets.Dataset:
    return pack_dataset(datasets.Dataset.from_dict({"input_ids": documents()}), MAX_TOKENS)


def check_step(model: nn.Module, reference) -> None:
    initial, params_ref, step_ref = reference
    start = dict(initial.named_parameters())
    after = {n.removeprefix("base_model.model."): p.detach() for n, p in model.named_parameters()}
    step = {n: after[n] - start[n].detach() for n in step_ref}
    assert max(rel(after[n], params_ref[n]) for n in params_ref) <= 1e-5
    assert update_rel(step, step_ref) <= 1e-5, update_rel(step, step_ref)


def test_hf_trainer_with_packed_collator_and_gradient_checkpointing(reference, tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    train = packed_dataset()
    assert len(train) < len(documents())
    model = deltapack.patch(copy.deepcopy(reference[0]))
    collator = PackedCollator(pad_token_id=PAD)
    # by default the Trainer drops dataset columns the forward does not name, seq_lengths among them: a clear error
    checkpointing = {checkpointing_arg(): True}
    args = one_step_args(TrainingArguments, tmp_path, len(train), **checkpointing)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        Trainer(model=model, args=args, train_dataset=train, data_collator=collator).train()
    args = one_step_args(TrainingArguments, tmp_path, len(train), remove_unused_columns=False, **checkpointing)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    trainer.train()
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    check_step(model, reference)


def sft_trainer(model: nn.Module, tmp_path, **collator_options):
    from trl import SFTConfig, SFTTrainer

    train = packed_dataset()
    args = one_step_args(SFTConfig, tmp_path, len(train), max_length=None, packing=False, padding_free=False)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=PackedCollator(pad_token_id=PAD, **collator_options),
        processing_class=char_tokenizer(),
    )


def test_trl_sft_trainer_with_prepacked_dataset_and_packed_collator(reference, tmp_path) -> None:
    # SFTTrainer replaces model.forward with its fused LM head; patching afterwards wraps that forward
    trainer = sft_trainer(copy.deepcopy(reference[0]), tmp_path, indexed_mask=False)
    deltapack.patch(trainer.model)
    trainer.train()
    check_step(trainer.model, reference)
    # with a 0/1 mask (documents read from position_ids), SFTTrainer's token count is the number of real tokens
    assert trainer.state.log_history[0]["num_tokens"] == sum(len(d) for d in documents())


def test_trl_sft_trainer_model_patched_before_the_trainer(reference, tmp_path) -> None:
    """SFTTrainer's fused LM head calls the decoder stack directly, past the entry forward: the patched decoder
    stack unpads packed inputs itself, so patching before the trainer is exact too."""
    trainer = sft_trainer(deltapack.patch(copy.deepcopy(reference[0])), tmp_path)
    trainer.train()
    check_step(trainer.model, reference)


def lora_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.train()
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("order", ["patch_then_wrap", "wrap_then_patch"])
def test_peft_lora_gradients_on_packed_rows(order: str) -> None:
    from peft import LoraConfig, get_peft_model

    docs = documents()
    packed = PackedCollator(pad_token_id=PAD)(pack_documents(docs, MAX_TOKENS).rows)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "in_proj_qkv", "out_proj"], init_lora_weights=False)

    def lora_model(patch_base: bool) -> nn.Module:
        base = tiny_model("qwen3_5")
        if patch_base:
            deltapack.patch(base)
        torch.manual_seed(1)
        return get_peft_model(base, config)

    grads_ref = lora_grads(lora_model(False), padded_unpacked(docs))
    if order == "patch_then_wrap":
        model = lora_model(True)
    else:
        model = deltapack.patch(lora_model(False))
    assert deltapack.is_patched(model)
    grads = lora_grads(model, packed)
    grads_leak = lora_grads(lora_model(False), packed)

    assert len(grads) == len(grads_ref) > 0
    assert update_rel(grads, grads_ref) <= 1e-5, update_rel(grads, grads_ref)
    assert update_rel(grads_leak, grads_ref) > 0.1
