"""Client code deltapack did not write, driving a patched model: transformers' DataCollatorWithFlattening in every
option combination, TRL's padding-free collator, and generate() / logits_to_keep on plain padded prompts.

Every exactness check also runs the unpatched model on the same batch and shows that it leaks (or refuses it).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening

from helpers import EXACT, FLATTENING, LEAK, cached_model, patched, per_doc_diff, random_docs

DOCS = random_docs([5, 1, 9, 4], seed=21)


def unpatched_diff(model, batch: dict, alone: list[torch.Tensor]) -> float:
    try:
        with torch.no_grad():
            return per_doc_diff(model(**batch, use_cache=False).logits, alone)
    except (ValueError, RuntimeError):
        return float("inf")


@pytest.mark.parametrize("options", FLATTENING, ids=lambda o: ",".join(k for k, v in o.items() if v))
def test_data_collator_with_flattening(options):
    """Every combination DataCollatorWithFlattening emits that marks documents: exact per document, vs the same
    document alone through the same collator; unpatched, the same batch leaks."""
    model = cached_model("qwen3_5")
    collator = DataCollatorWithFlattening(**options, separator_id=-100)
    batch = collator([{"input_ids": d} for d in DOCS])
    batch.pop("labels")
    # alone: the same document, with the positions the collator gives it (position_ids_start included)
    positions_only = DataCollatorWithFlattening(
        return_position_ids=options["return_position_ids"], position_ids_start=options["position_ids_start"]
    )
    with torch.no_grad():
        alone = []
        for d in DOCS:
            one = positions_only([{"input_ids": d}])
            alone.append(model(one["input_ids"], position_ids=one.get("position_ids")).logits[0])
    assert unpatched_diff(model, batch, alone) > LEAK
    with patched(model), torch.no_grad():
        assert per_doc_diff(model(**batch).logits, alone) <= EXACT


def test_flattening_options_that_disagree_raise():
    model = cached_model("qwen3_5")
    batch = DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True)(
        [{"input_ids": d} for d in DOCS]
    )
    seq_idx = batch["seq_idx"].clone()
    seq_idx[0, 3] = 1  # one token of the first document marked as the second
    positions = batch["position_ids"].clone()
    positions[0, 7] = 0  # a restart inside the third document
    with patched(model), torch.no_grad():
        with pytest.raises(ValueError, match="seq_idx disagrees"):
            model(**{**batch, "seq_idx": seq_idx})
        with pytest.raises(ValueError, match="position_ids disagree"):
            model(**{**batch, "position_ids": positions})
        with pytest.raises(ValueError, match="cu_seq_lens_q ends at 20"):
            cu = torch.tensor([0, 5, 6, 15, 20], dtype=torch.int32)
            batch["cu_seq_lens_k"] = cu
            model(**{k: v for k, v in batch.items() if k not in ("seq_idx", "position_ids")} | {"cu_seq_lens_q": cu})


@pytest.mark.parametrize("pad_to", [None, 8])
def test_trl_padding_free_collator(pad_to):
    """TRL's DataCollatorForLanguageModeling(padding_free=True): position_ids, cu_seq_lens_q/k, seq_idx together."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = cached_model("qwen3_5_moe")
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=pad_to)
    batch = collator([{"input_ids": d} for d in DOCS])
    assert {"position_ids", "cu_seq_lens_q", "seq_idx"} <= set(batch)
    batch.pop("labels")
    with torch.no_grad():
        alone = [model(torch.tensor([d])).logits[0] for d in DOCS]
        assert unpatched_diff(model, batch, alone) > LEAK
        with patched(model):
            logits = model(**batch).logits
    assert per_doc_diff(logits, alone) <= EXACT


def left_padded_prompts() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_padded_batches_take_the_original_forward(arch):
    """One document per row with padding is not packed input: generate(use_cache=False), logits_to_keep and the
    cache a caller asks for behave exactly as on the unpatched model (bit-identical)."""
    model = cached_model(arch)
    prompts = left_padded_prompts()
    with torch.no_grad():
        before = model(**prompts)
        last_before = model(**prompts, logits_to_keep=1, use_cache=False).logits
        gen_before = model.generate(**prompts, max_new_tokens=4, do_sample=False, use_cache=False)
        with patched(model):
            after = model(**prompts)
            last_after = model(**prompts, logits_to_keep=1, use_cache=False).logits
            gen_after = model.generate(**prompts, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(before.logits, after.logits)
    assert after.past_key_values is not None  # the cache the call asked for (use_cache defaults to True) is kept
    assert torch.equal(last_before, last_after)
    assert torch.equal(gen_before, gen_after)


def test_logits_to_keep_on_packed_rows():
    model = cached_model("qwen3_5")
    doc_ids = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3]])
    ids = torch.randint(1, 128, (2, 6))
    with patched(model), torch.no_grad():
        full = model(ids, attention_mask=doc_ids).logits
        assert torch.equal(model(ids, attention_mask=doc_ids, logits_to_keep=2).logits, full[:, -2:])
        picked = torch.tensor([0, 3])
        assert torch.equal(model(ids, attention_mask=doc_ids, logits_to_keep=picked).logits, full[:, picked])


def test_generate_with_an_indexed_mask_says_what_to_do():
    model = cached_model("qwen3_5")
    ids = torch.randint(1, 128, (1, 6))
    with patched(model), torch.no_grad(), pytest.raises(ValueError, match="generate from each document on its own"):
        model.generate(ids, attention_mask=torch.tensor([[1, 1, 2, 2, 2, 2]]), max_new_tokens=2)
