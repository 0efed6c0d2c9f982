"""Attention-only causal LMs (dense or MoE): no layer of their own, the attention hooks keep documents apart.

Every model type here builds its masks through transformers' mask registry and takes per-document
``position_ids`` (rotary in all its variants, learned absolute positions), or adds a relative ALiBi bias that the
in-document positions of :mod:`deltapack.models.positions` make exact; :mod:`deltapack.models.attention_hooks`
does the rest. The family has no layers: the framework's entry, decoder stack and decoder-layer scope are all it
needs.

Why a list and not a predicate ("every decoder-only causal LM whose layers are attention"): whether a model is exact
under packing depends on things no predicate reads off a config: whether it takes ``position_ids`` or reads a
position table by the sequence length (the decoders of encoder-decoders: bart, marian, ...; handled by
:mod:`deltapack.models.positions`), numbers them from the token ids (roberta), hides a recurrent or convolutional
layer beside its attention, or builds a mask of its own. Each type below passes ``deltapack audit --arch TYPE``
after patching, in every input format, forward and gradient; adding a new transformers type is one name here once
the audit passes (no new file). Types known not to fit are in :data:`REFUSED` with the reason
:func:`deltapack.patch` gives.
"""

from __future__ import annotations

from deltapack.models.layers import Family, register_family

ATTENTION_TYPES = (
    # rotary, full or grouped-query attention
    "apertus", "apertus1p5_text", "arcee", "aria_text", "axk1", "axk2", "bitnet", "codegen", "cohere", "cwm",
    "diffllama", "emu3", "emu3_text_model", "ernie4_5", "ernie4_5_moe", "exaone", "flex_olmo", "fuyu", "gemma",
    "glm", "glm4", "glm4_moe", "glm4_moe_lite", "gpt_neox", "gpt_neox_japanese", "gptj", "granite", "granitemoe",
    "granitemoeshared", "helium", "hrm_text", "hunyuan_v1_dense", "hunyuan_v1_moe", "hy_v3", "hyperclovax",
    "internlm3", "iquestcoder", "jais2", "jetmoe", "llama", "minimax_m2", "minimax_m3_vl_text", "mllama",
    "mllama_text_model", "moshi",
    "nanochat", "nemotron", "olmo", "olmo2", "olmoe", "persimmon", "phi", "seed_oss", "solar_open", "stablelm",
    "youtu", "falcon", "dbrx", "dots1", "cohere_compass_text",
    # multi-head latent attention (own value head size)
    "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa", "longcat_flash", "minicpm3", "sarvam_mla",
    "sarvam_moe",
    # sliding windows (some layers or all), soft-capping, sinks, chunked attention
    "afmoe", "beam", "cohere2", "cohere2_moe", "doge", "dory", "exaone4", "exaone_moe", "flint", "gemma2", "gemma3",
    "gemma3_text", "gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text", "gpt_oss", "granite_swa",
    "granitemoe_swa", "hy_v4", "kolibri1", "laguna", "llama4", "llama4_text", "mellum", "mimo_v2_flash", "ministral",
    "ministral3", "mistral", "mixtral", "modernbert-decoder", "olmo3", "phi3", "phi4_multimodal", "phimoe", "qwen2",
    "qwen2_moe", "qwen3", "qwen3_moe", "smollm3", "starcoder2", "vaultgemma",
    # learned absolute positions read from position_ids
    "biogpt", "ctrl", "git", "got_ocr2", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neo", "moss_transcribe_diarize",
    "opt", "xglm",
    # encoder architectures run as decoders; with is_decoder=False their attention is bidirectional, and the mask
    # hooks keep it bidirectional within each document (exact against the document alone, as the audit checks)
    "bert", "bert-generation", "big_bird", "electra", "ernie", "megatron-bert", "rembert", "roc_bert", "roformer",
    # ALiBi
    "bloom", "mpt",
    # decoders of encoder-decoder families run alone (their position tables read in-document positions)
    "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus", "plbart",
    "trocr", "whisper",
    # encoder architectures run as causal decoders whose positions count non-padding tokens (roberta family)
    "camembert", "data2vec-text", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl",
)  # fmt: skip

REFUSED: dict[str, str] = {
    "prophetnet": "an encoder-decoder's decoder predicting n-grams with its own relative position buckets",
    "xmod": "its adapters are chosen per language for the whole batch (set_default_language), not per document",
    "xlnet": "a permutation language model with relative positions and two attention streams (not a causal mask)",
    "xlm": "a masked language model whose attention is bidirectional unless configured causal, with its own mask",
    "cpmant": "a prefix-LM with its own relative position buckets and segment mask",
    "reformer": "LSH / local chunked attention over axial position embeddings of fixed-length sequences",
    "openai-gpt": "its attention applies a fixed causal buffer over the row and ignores attention masks per document",
}  # fmt: skip

# pads_exactly=False: plainly padded batches are unpadded too (gpt2-style models number positions along the row, so
# left padding shifts them; unpadding also skips the padding's compute); generation keeps transformers' path
ATTENTION = register_family(Family(name="attention", model_types=ATTENTION_TYPES, pads_exactly=False))


def why_unsupported(config: object) -> str | None:
    """Why :func:`deltapack.patch` refuses a model with this config (None when nothing specific is known)."""
    model_type = str(getattr(config, "model_type", None))
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder: its decoder attends to an encoder, and packing needs a decoder-only causal LM"
    if model_type in REFUSED:
        return REFUSED[model_type]
    if model_type == "falcon" and getattr(config, "alibi", False):
        return "falcon with ALiBi (falcon-rw) bakes a row-position bias into its mask; rotary falcon is supported"
    if model_type in ATTENTION_TYPES and not getattr(config, "is_causal", True):
        return "configured with is_causal=False (bidirectional attention): packing needs a causal mask"
    return None
