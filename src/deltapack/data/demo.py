"""A small embedded SFT dataset and a character tokenizer, for ``deltapack train`` and the tests (no downloads).

Each example is a prompt (a few sentences of filler, then a question about a sum) and a completion (the answer).
Lengths vary from about 30 to 600 characters (lognormal filler), so packing has something to do. The tokenizer maps
each printable ASCII character (and newline) to one id; it has 100 ids, so it fits the tiny models' 128-token vocab.
"""

from __future__ import annotations

import random
from typing import Any

from deltapack.boundaries import IGNORE_INDEX

__all__ = ["SPECIAL_TOKENS", "char_tokenizer", "demo_examples", "tokenize_examples"]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
_WORDS = (
    "the packed rows keep every document apart while the model reads them in one pass and the state of each "
    "recurrent layer starts again at zero where a new document begins so nothing leaks across a boundary"
).split()


def char_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` with one id per character: 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, then newline and
    printable ASCII (100 ids in all)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def demo_examples(n: int = 512, seed: int = 0) -> list[dict[str, str]]:
    """``n`` prompt/completion pairs (deterministic for a seed)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        words = min(int(rng.lognormvariate(2.5, 0.9)), 100)
        filler = " ".join(rng.choice(_WORDS) for _ in range(words))
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        examples.append({"prompt": f"{filler}.\nQ: {a} + {b} = ?\nA: ", "completion": f"{a + b}"})
    return examples


def tokenize_examples(examples: list[dict[str, str]], tokenizer: Any) -> list[dict[str, list[int]]]:
    """Token ids per example: ``text`` -> input_ids (all trained); ``prompt``/``completion`` -> input_ids and labels
    with -100 on the prompt. An end-of-sequence id is appended when the tokenizer has one."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    docs = []
    for i, ex in enumerate(examples):
        if "text" in ex:
            ids = tokenizer(ex["text"], add_special_tokens=False)["input_ids"] + eos
            docs.append({"input_ids": ids, "labels": list(ids)})
        elif "prompt" in ex and "completion" in ex:
            prompt = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"] + eos
            docs.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion})
        else:
            raise ValueError(f"deltapack: example {i} has keys {sorted(ex)}; expected 'text' or 'prompt'/'completion'")
    return docs
