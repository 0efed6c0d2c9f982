"""Real clients on a representative of every family, not only qwen3_5: transformers' DataCollatorWithFlattening
in every option combination, TRL's SFTTrainer (packing and padding-free, patched before and after the trainer is
built, two steps, its fused LM head and gradient checkpointing, the MoE load-balancing loss on, LoRA through its
peft_config) and generate().

References are computed document by document through the unpatched model; every exactness check also shows that
the unpatched model leaks on the same batch, so it can fail. The one exception: the padding-free batches TRL feeds
llama and gpt2 (position_ids restarting, use_cache=False), which transformers itself keeps apart; there the test
asserts that, and their leak shows in the DataCollatorWithFlattening tests.
"""

from __future__ import annotations

import copy
import functools
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorWithFlattening, TrainerCallback

import deltapack
from deltapack.audit import shrink as shrinking
from deltapack.tiny import tiny_model
from helpers import (
    EXACT,
    FLATTENING,
    LEAK,
    LR,
    PAD,
    grads_of,
    installed,
    norm_rel,
    one_step_args,
    patched,
    per_doc_diff,
    random_docs,
)

datasets = pytest.importorskip("datasets")

# one model type per family (tiny configs); the comment names the family and what else the model brings
REPRESENTATIVES = (
    "mamba2",  # SSD, attention-free
    "granitemoehybrid",  # SSD + attention + MoE (router aux loss)
    "jamba",  # selective scan + attention + MoE (router aux loss)
    "kimi_linear",  # Kimi delta attention + MLA
    "olmo_hybrid",  # gated DeltaNet variant
    "lfm2",  # gated short conv
    "minimax",  # lightning attention + MoE (router aux loss)
    "recurrent_gemma",  # RG-LRU + local attention
    "rwkv",  # RWKV-4
    "xlstm",  # mLSTM
    "inkling_text",  # residual fp32 short convs + log-scaled attention
    "zaya",  # convolutional q/k projection, delayed values + MoE
    "llama",  # attention only, rotary
    "gpt2",  # attention only, learned absolute positions
    "gpt_oss",  # attention only: sinks, a sliding window of 3, MoE (router aux loss)
)
# attention-only types have no tiny config of their own: the audit's shrunk config, with these overrides
ATTENTION_ONLY = {
    "llama": {},
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),  # trainers run in train mode
    "gpt_oss": {"sliding_window": 3},
}


DOCS = random_docs([5, 1, 9, 4], seed=21)
GRAD_RTOL = 1e-4


@functools.cache
def model_of(arch: str) -> torch.nn.Module:
    """The tiny fp32 model of ``arch``; each test leaves it as it found it (unpatched, eval mode, no grads)."""
    if arch not in ATTENTION_ONLY:
        return tiny_model(arch)
    config, _ = shrinking.shrink_config(AutoConfig.for_model(arch), arch)
    for key, value in ATTENTION_ONLY[arch].items():
        setattr(config, key, value)
    for implementation in ("sdpa", "eager"):  # gpt_oss has no sdpa
        torch.manual_seed(0)
        try:
            return AutoModelForCausalLM.from_config(config, attn_implementation=implementation).float().eval()
        except ValueError:
            continue
    raise AssertionError(f"{arch} builds with neither sdpa nor eager attention")


def client_diff(model, batch: dict, alone: list[torch.Tensor]) -> float:
    """The model called as the client calls it (``model(**batch)``), or inf where it refuses the batch."""
    try:
        with torch.no_grad():
            return per_doc_diff(model(**batch).logits, alone)
    except (ValueError, RuntimeError, NotImplementedError):
        return float("inf")


@pytest.mark.parametrize("arch", REPRESENTATIVES)
def test_data_collator_with_flattening_every_option(arch):
    """Every option combination of DataCollatorWithFlattening that marks documents: each document's logits equal
    the document alone through the same collator (its positions included); unpatched, the same batch leaks."""
    model = model_of(arch)
    alone = {}
    with torch.no_grad():
        for start in (0, 1):
            one = DataCollatorWithFlattening(position_ids_start=start)
            alone[start] = [model(**_without_labels(one([{"input_ids": d}]))).logits[0] for d in DOCS]
    for options in FLATTENING:
        batch = _without_labels(DataCollatorWithFlattening(**options)([{"input_ids": d} for d in DOCS]))
        reference = alone[options["position_ids_start"]]
        assert client_diff(model, batch, reference) > LEAK, options
        with patched(model):
            assert client_diff(model, batch, reference) <= EXACT, options


def test_rg_lru_documents_numbered_from_one():
    """RG-LRU resets where the position is 0: a document numbered from 1 is not reset alone (its first input keeps
    the sqrt(1 - a^2) multiplier), and packed it gets the same, while its state still starts at zero."""
    model = model_of("recurrent_gemma")
    collator = DataCollatorWithFlattening(position_ids_start=1)
    batch = _without_labels(collator([{"input_ids": d} for d in DOCS]))
    with torch.no_grad():
        alone = [model(**_without_labels(collator([{"input_ids": d}]))).logits[0] for d in DOCS]
    with patched(model):
        assert client_diff(model, batch, alone) <= EXACT


def _without_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def prompt_masked(doc: list[int]) -> list[int]:
    """Labels of a prompt-completion document: -100 on its first half (the prompt)."""
    return [-100] * (len(doc) // 2) + doc[len(doc) // 2 :]


@pytest.mark.parametrize("arch", REPRESENTATIVES)
@pytest.mark.parametrize("labels", ["separator_-100", "separator_7", "prompt_masked"])
def test_flattening_loss_and_gradients(arch, labels):
    """The model's own loss on a flattened batch with labels (a separator label, or labels given per document with
    the prompt masked), MoE models with their router auxiliary loss on, and its gradients: the per-document loss
    (each document alone, targets inside the document only, the load-balancing loss over exactly the real tokens);
    the separator label never becomes a target once patched."""
    model = copy.deepcopy(model_of(arch))  # a backward leaves some models holding non-leaf state tensors
    separator = 7 if labels == "separator_7" else -100
    targets = [prompt_masked(d) if labels == "prompt_masked" else d for d in DOCS]
    features = [{"input_ids": d} | ({"labels": t} if labels == "prompt_masked" else {}) for d, t in zip(DOCS, targets)]
    collator = DataCollatorWithFlattening(
        return_position_ids=False, return_flash_attn_kwargs=True, return_seq_idx=True, separator_id=separator
    )
    coef = aux_loss_coef(model)
    extra = {"use_cache": False} | ({"output_router_logits": True} if coef else {})  # as a trainer calls it
    batch = {**collator(features), **extra}
    alone = [model(torch.tensor([d]), **extra) for d in DOCS]
    target = [torch.tensor(t[1:], dtype=torch.long) for t in targets]
    nll = sum(F.cross_entropy(o.logits[0, :-1], t, reduction="sum") for o, t in zip(alone, target))
    ref_loss = nll / sum(int((t != -100).sum()) for t in target)
    if coef:
        ref_loss = ref_loss + coef * balance_loss(model, [o.router_logits for o in alone])
    ref_grads = grads_of(model, ref_loss)
    try:
        unpatched_grads = grads_of(model, model(**batch).loss)
    except (ValueError, RuntimeError, NotImplementedError):  # refused (transformers without the CUDA kernels)
        unpatched_grads = None
    assert unpatched_grads is None or norm_rel(unpatched_grads, ref_grads) > 1e3 * GRAD_RTOL  # the test can fail
    with patched(model):
        loss = model(**batch).loss
        grads = grads_of(model, loss)
    model.zero_grad(set_to_none=True)
    assert abs(loss.item() - ref_loss.item()) <= EXACT
    assert norm_rel(grads, ref_grads) <= GRAD_RTOL


def balance_loss(model, routers: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """The model's own load-balancing loss over the router logits of several documents together (each document's
    per-layer router logits [tokens, experts], concatenated over documents)."""
    per_layer = tuple(torch.cat([r[i] for r in routers]) for i in range(len(routers[0])))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's transformers model
    balance = sys.modules[type(base).__module__].load_balancing_loss_func
    return balance(per_layer, model.num_experts, model.num_experts_per_tok, None)


# ------------------------------------------------------------------------------------------------ TRL's SFTTrainer
LENGTHS = (1, 3, 7, 12, 19, 25, 33, 2, 16, 9)  # a single token, shorter than a conv window, several long ones
TRAIN_DOCS = random_docs(LENGTHS, seed=5)


def per_document_step(model) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """What an SFTTrainer step computes, each document alone through ``model`` (unpatched, with TRL's fused LM
    head): the loss (the mean next-token loss over every target of every document, plus the router's load-balancing
    loss times its coefficient where the model has one), that auxiliary loss (None without one), and each
    document's next-token log-probabilities. (TRL's fused head, not the model's own loss: TRL 1.16 leaves out
    xlstm's output_logit_soft_cap, so the two differ there, with or without deltapack.)"""
    log_probs = [
        model(torch.tensor([d]), labels=torch.tensor([d]), fused_lm_head=True).log_probs[0] for d in TRAIN_DOCS
    ]
    loss = -sum(lp.sum() for lp in log_probs) / sum(len(d) - 1 for d in TRAIN_DOCS)
    aux = None
    if aux_loss_coef(model):  # load-balancing loss over exactly the real tokens, as the model's own function has it
        outs = [model(torch.tensor([d]), use_cache=False, output_router_logits=True) for d in TRAIN_DOCS]
        aux = balance_loss(model, [o.router_logits for o in outs])
        loss = loss + aux_loss_coef(model) * aux
    return loss, aux, log_probs


def with_fused_head(model):
    from trl.trainer.utils import add_fused_lm_head

    model = with_num_experts(copy.deepcopy(model))
    add_fused_lm_head(model)
    return model


def with_num_experts(model):
    """``model``, its config given ``num_experts`` where it names it ``num_local_experts`` only: TRL 1.16's fused LM
    head reads num_experts for the router's auxiliary loss (AttributeError on granitemoehybrid's and deepseek_v4's
    configs, with or without deltapack)."""
    config = model.config.get_text_config()
    if hasattr(config, "num_local_experts") and not hasattr(config, "num_experts"):
        config.num_experts = config.num_local_experts
    return model


@functools.cache
def reference_step(arch: str) -> tuple[float, float | None, torch.Tensor, dict[tuple[int, ...], torch.Tensor]]:
    """The first step's :func:`per_document_step` from the initial model: loss, auxiliary loss, the gradients, and
    each document's log-probabilities by its tokens."""
    model = with_fused_head(model_of(arch))
    loss, aux, log_probs = per_document_step(model)
    per_doc = {tuple(d): lp.detach() for d, lp in zip(TRAIN_DOCS, log_probs)}
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = torch.cat(  # zeros where no gradient reaches a parameter (deepseek_v4's indexer: its top-k selects)
        [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in model.parameters()]
    )
    return loss.item(), None if aux is None else aux.item(), grads, per_doc


def log_prob_diff(model, inputs: dict, alone: dict[tuple[int, ...], torch.Tensor]) -> float:
    """Max |diff| of the next-token log-probabilities the fused LM head gives each document of the trainer's
    padding-free batch (documents start where position_ids restart at 0) vs the document alone; inf if refused."""
    try:
        with torch.no_grad():
            out = model(**inputs, fused_lm_head=True).log_probs[0]
    except (ValueError, RuntimeError, NotImplementedError):  # refused (transformers without the CUDA kernels)
        return float("inf")
    ids, starts = inputs["input_ids"][0], (inputs["position_ids"][0] == 0).nonzero().flatten().tolist()
    worst = 0.0
    for start, end in zip(starts, [*starts[1:], ids.numel()]):
        doc = tuple(ids[start:end].tolist())
        if len(doc) > 1:
            worst = max(worst, (out[start : end - 1] - alone[doc]).abs().max().item())
    return worst


def aux_loss_coef(model) -> float:
    """The coefficient of the router's auxiliary loss (0.0: off), as SFTTrainer reads it, and off where the installed
    transformers returns no router logits for the model (granitemoehybrid in 5.17 records none)."""
    config = model.config.get_text_config()
    coef = (
        float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if hasattr(config, "output_router_logits") else 0.0
    )
    return coef if coef and _returns_router_logits(model) else 0.0


def _returns_router_logits(model) -> bool:
    if type(model) not in _ROUTER_LOGITS:
        with torch.no_grad():
            out = model(torch.tensor([[3, 4]]), use_cache=False, output_router_logits=True)
        _ROUTER_LOGITS[type(model)] = getattr(out, "router_logits", None) is not None
    return _ROUTER_LOGITS[type(model)]


_ROUTER_LOGITS: dict[type, bool] = {}


def sft_trainer(model, tmp_path, mode: str, peft_config=None):
    """SFTTrainer for one SGD step over every training document. ``mode``: "packing" (TRL packs the documents into
    rows of 40, its padding-free collator flattens them), "padding_free" (one document per example, flattened), or
    "packed_collator" (rows packed by deltapack, PackedCollator with an indexed attention_mask). ``peft_config``:
    TRL wraps the model in PEFT itself."""
    from trl import SFTConfig, SFTTrainer

    from deltapack.data import PackedCollator, pack_dataset

    with_num_experts(model)
    from deltapack.data.demo import char_tokenizer

    train, collator = datasets.Dataset.from_dict({"input_ids": TRAIN_DOCS}), None
    if mode == "packing":
        extra = dict(packing=True, max_length=40)
    elif mode == "padding_free":
        extra = dict(padding_free=True, max_length=None)
    else:
        train, collator = pack_dataset(train, 40), PackedCollator(PAD, indexed_mask=True)
        extra = dict(packing=False, padding_free=False, max_length=None)
    extra["router_aux_loss_coef"] = aux_loss_coef(model)  # the model's own, or 0.0 where it returns no router logits
    args = one_step_args(SFTConfig, tmp_path, len(TRAIN_DOCS), **extra)  # every document in the first step
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=collator,
        processing_class=char_tokenizer(),
        peft_config=peft_config,
    )
    trainer.seen = []  # (inputs, loss) of every compute_loss call
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        trainer.seen.append(({k: v for k, v in inputs.items()}, loss.detach().clone()))
        return loss

    trainer.compute_loss = recording
    trainer.add_callback(FirstStep())
    return trainer


class FirstStep(TrainerCallback):
    """Keeps a copy of the model's parameters after the first optimizer step (``state.first_step``)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            state.first_step = {n: p.detach().clone() for n, p in model.named_parameters()}


# deepseek_v4 (sliding window + CSA/HCA compressors + MoE with hash routing, router aux loss) trains here too; it is
# no representative above, since it refuses documents numbered from 1 (position_ids_start=1) by design
TRAINED = (*REPRESENTATIVES, *installed(("deepseek_v4",)))
# transformers itself separates documents by the position_ids of a padding-free batch called with use_cache=False
SEPARATED_BY_TRANSFORMERS = ("llama", "gpt2")


@pytest.fixture
def quick_trainer(monkeypatch):
    """accelerate ends every train() with a full gc.collect() (most of a tiny run's time in a test session's heap) to
    clear device caches; the CPU has none."""
    import accelerate.utils.memory

    monkeypatch.setattr(accelerate.utils.memory, "clear_device_cache", lambda garbage_collection=False: None)


def trainer_runs() -> list[tuple[str, str, str]]:
    """Two runs per representative, packing and padding-free, one patched before the trainer is built and one
    after; which order goes with which mode alternates, so every combination runs."""
    orders = ("patch_then_trainer", "trainer_then_patch")
    return [
        (arch, mode, orders[(i + j) % 2])
        for i, arch in enumerate(TRAINED)
        for j, mode in enumerate(("packing", "padding_free"))
    ]


@pytest.mark.parametrize("arch,mode,order", trainer_runs())
def test_sft_trainer(arch, mode, order, tmp_path, quick_trainer):
    """Two SGD steps of SFTTrainer (its fused LM head, gradient checkpointing, the router's auxiliary loss where the
    model has one): each step's loss, and the first step's update, equal the per-document reference; the unpatched
    model leaks on the batch the trainer fed it."""
    ref_loss, ref_aux, ref_grads, alone = reference_step(arch)
    initial = model_of(arch)
    model = copy.deepcopy(initial)
    if order == "patch_then_trainer":
        trainer = sft_trainer(deltapack.patch(model), tmp_path, mode)
    else:
        trainer = sft_trainer(model, tmp_path, mode)
        deltapack.patch(trainer.model)
    assert trainer.aux_loss_enabled == (ref_aux is not None)
    trainer.args.max_steps = 2
    trainer.train()
    (inputs, loss), (_, second_loss) = trainer.seen
    assert abs(loss.item() - ref_loss) <= EXACT * max(1.0, abs(ref_loss))
    if ref_aux is not None:
        logged = next(row["aux_loss"] for row in trainer.state.log_history if "aux_loss" in row)
        assert abs(logged - ref_aux) <= 1e-6 * ref_aux
    after = trainer.state.first_step
    update = torch.cat([(after[n] - p.detach()).reshape(-1) for n, p in initial.named_parameters() if n in after])
    assert norm_rel(update, -LR * ref_grads) <= GRAD_RTOL
    stepped = with_fused_head(initial)
    with torch.no_grad():
        for name, param in stepped.named_parameters():
            param.copy_(after[name])
    with torch.no_grad():
        ref_second = per_document_step(stepped)[0].item()
    assert abs(second_loss.item() - ref_second) <= EXACT * max(1.0, abs(ref_second))
    # the same batch through the unpatched model, as the trainer calls it
    unpatched = log_prob_diff(with_fused_head(initial), inputs, alone)
    if arch in SEPARATED_BY_TRANSFORMERS:
        assert unpatched <= EXACT
    else:
        assert unpatched > LEAK


# the MoE models with an aux loss
@pytest.mark.parametrize("arch", ["granitemoehybrid", "jamba", "minimax", "gpt_oss", *installed(("deepseek_v4",))])
def test_fused_head_with_an_indexed_mask(arch, tmp_path, quick_trainer):
    """The MoE representatives with the router's auxiliary loss on, rows packed by deltapack with an indexed
    attention_mask: TRL's fused LM head would weight the auxiliary loss by document index, so the model patched
    before the trainer is built refuses with the documented error; patched after (the entry forward then runs
    outside the fused head) the step equals the per-document reference."""
    ref_loss, ref_aux, _, _ = reference_step(arch)
    if ref_aux is None:
        pytest.skip(f"transformers {transformers.__version__} returns no router logits for {arch}")
    trainer = sft_trainer(deltapack.patch(copy.deepcopy(model_of(arch))), tmp_path, "packed_collator")
    with pytest.raises(ValueError, match=r"indexed_mask=False"):
        trainer.train()
    trainer = sft_trainer(copy.deepcopy(model_of(arch)), tmp_path, "packed_collator")
    deltapack.patch(trainer.model)
    trainer.train()
    ((_, loss),) = trainer.seen
    assert abs(loss.item() - ref_loss) <= EXACT * max(1.0, abs(ref_loss))
    logged = next(row["aux_loss"] for row in trainer.state.log_history if "aux_loss" in row)
    assert abs(logged - ref_aux) <= 1e-6 * ref_aux


# linear layers left without an adapter: jamba's router (see test_sft_trainer_with_lora)
NO_ADAPTER = {"jamba": ["router"]}


@pytest.mark.parametrize(
    "arch,order",
    [
        ("mamba2", "patch_then_trainer"),
        ("lfm2", "trainer_then_patch"),
        ("rwkv", "trainer_then_patch"),
        ("jamba", "patch_then_trainer"),  # with the router's auxiliary loss
    ],
)
def test_sft_trainer_with_lora(arch, order, tmp_path, quick_trainer):
    """SFTTrainer with a peft_config (TRL wraps the model in LoRA itself; padding-free): two steps, each loss and
    the first update of the adapters equal the per-document computation on the same LoRA model; the unpatched
    model leaks on the batch the trainer fed it.

    jamba's router gets no adapter. transformers 5.24 holds it as a weight of its own router class, which
    "all-linear" does not wrap; 5.17 holds it as an nn.Linear and records router_logits from every nn.Linear whose
    name holds ".router.", hooked at the model's first forward. Wrapped by LoRA, that is the base layer alone (the
    logits without the adapter) where the model ran before PEFT wrapped it (the trainer's model, run once by
    aux_loss_coef), and also lora_A's [tokens, r] output and lora_B's where it did not: with r = num_experts the
    load-balancing loss takes them all as router logits, and the two models' auxiliary losses have different
    gradients (the adapters' first update 1.5e-3 relative from the reference's)."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    targets = ["in_proj"] if arch == "mamba2" else "all-linear"  # PEFT refuses Mamba's out_proj
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, exclude_modules=NO_ADAPTER.get(arch), lora_dropout=0.0)
    initial = model_of(arch)
    model = copy.deepcopy(initial)
    if order == "patch_then_trainer":
        trainer = sft_trainer(deltapack.patch(model), tmp_path, "padding_free", peft_config=lora)
    else:
        trainer = sft_trainer(model, tmp_path, "padding_free", peft_config=lora)
        deltapack.patch(trainer.model)
    assert deltapack.is_patched(trainer.model)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.args.max_steps = 2
    trainer.train()
    (inputs, loss), (_, second_loss) = trainer.seen
    # the same batch through the unpatched model (the adapters start as a no-op): it leaks
    assert log_prob_diff(with_fused_head(initial), inputs, reference_step(arch)[3]) > LEAK

    def reference(params: dict[str, torch.Tensor]):
        ref = get_peft_model(copy.deepcopy(initial), lora)
        add_fused_lm_head(ref.get_base_model())
        with torch.no_grad():
            for name, param in ref.named_parameters():
                param.copy_(params[name])
        return ref

    ref = reference(start)
    ref_loss = per_document_step(ref)[0]
    ref_loss.backward()
    trainable = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    ref_grads = torch.cat(  # no gradient: an expert no token was routed to
        [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in trainable.values()]
    )
    assert abs(loss.item() - ref_loss.item()) <= EXACT * max(1.0, abs(ref_loss.item()))
    after = trainer.state.first_step
    update = torch.cat([(after[n] - start[n]).reshape(-1) for n in trainable])
    assert norm_rel(update, -LR * ref_grads) <= GRAD_RTOL
    with torch.no_grad():
        ref_second = per_document_step(reference(after))[0].item()
    assert abs(second_loss.item() - ref_second) <= EXACT * max(1.0, abs(ref_second))


# ------------------------------------------------------------------------------------------------------ generate()
def prompts() -> dict[str, torch.Tensor]:
    """Two prompts, the first left-padded by 3 (a 0/1 attention_mask, as a tokenizer pads for generation)."""
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


@pytest.mark.parametrize("arch", REPRESENTATIVES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_is_bit_identical(arch, use_cache):
    """generate() on plain prompts (one padded, one not; greedy, with and without the cache): the patched model's
    tokens and scores are bit for bit the unpatched model's."""
    model = model_of(arch)
    kwargs = dict(max_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=0)
    kwargs.update(output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        before = model.generate(**prompts(), **kwargs)
        single = model.generate(prompts()["input_ids"][1:], **kwargs)
        with patched(model):
            after = model.generate(**prompts(), **kwargs)
            single_after = model.generate(prompts()["input_ids"][1:], **kwargs)
    assert "generate" not in model.__dict__  # unpatch gave the class's generate back
    for a, b in ((before, after), (single, single_after)):
        assert torch.equal(a.sequences, b.sequences)
        assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores, strict=True))
