"""What several test modules share: tiny models cached per configuration, the exactness bounds, documents and
reference training steps. Test modules import from here, never from each other."""

from __future__ import annotations

import contextlib
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import strategies as st
from packaging.version import Version
from torch import nn

import deltapack
from deltapack.audit.shrink import shrink_config
from deltapack.tiny import tiny_model
from packing import build, max_doc_diff

ARCHS = ("qwen3_5", "qwen3_5_moe", "qwen3_next")
# transformers 5.23 and later refuse cu_seq_lens kwargs on the CPU for the GDN layers (no CUDA kernels); older ones
# run them and leak. CI also runs the oldest supported transformers (.ci/run).
REFUSES_CU_SEQ_LENS_ON_CPU = Version(transformers.__version__) >= Version("5.23")


@functools.lru_cache(maxsize=64)
def cached_model(
    arch: str = "qwen3_5", attn: str = "sdpa", conv_width: int = 4, value_head_ratio: int = 2, seed: int = 0
) -> nn.Module:
    """A tiny fp32 model; each test must leave it as it found it (unpatched, eval mode, no grads)."""
    return tiny_model(
        arch,
        seed=seed,
        attn_implementation=attn,
        linear_conv_kernel_dim=conv_width,
        linear_num_value_heads=2 * value_head_ratio,
    )


EXACT = 1e-5  # max |logit diff| in fp32 on the CPU (the contract)

LEAK = 1e-3  # what the unpatched model must at least show on the same input


@contextlib.contextmanager
def patched(model):
    deltapack.patch(model)
    try:
        yield model
    finally:
        deltapack.unpatch(model)


def alone_logits(model, docs):
    with torch.no_grad():
        return [model(torch.tensor([d])).logits[0] for d in docs]


def random_docs(lengths, vocab=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


PAD = 0

LR = 0.05


# lengths: a single token, shorter than the conv window, several long ones; packed into rows of 40
LENGTHS = (1, 3, 7, 12, 19, 25, 33, 2, 16, 9)


def documents(lengths: tuple[int, ...] = LENGTHS, vocab: int = 128, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


def padded_unpacked(docs: list[list[int]]) -> dict[str, torch.Tensor]:
    """One document per row, padded on the right: input_ids, 0/1 attention_mask, labels (-100 at padding)."""
    width = max(len(d) for d in docs)
    ids = torch.full((len(docs), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(docs), width), dtype=torch.long)
    for r, doc in enumerate(docs):
        ids[r, : len(doc)] = torch.tensor(doc)
        mask[r, : len(doc)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def sgd_step(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's loss on ``batch``, the parameters after one SGD step, and the update the step made."""
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return loss.item(), after, {n: after[n] - before[n] for n in after}


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def update_rel(step: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """||step - ref|| / ||ref|| over all parameters together (float64)."""
    diff = sum(((step[n].double() - ref[n].double()) ** 2).sum() for n in ref)
    norm = sum((ref[n].double() ** 2).sum() for n in ref)
    return (diff / norm).sqrt().item()


def one_step_args(cls, tmp_path, rows: int, **extra):
    """Arguments for exactly one plain SGD step over all rows at once, in fp32 on the CPU."""
    return cls(
        output_dir=str(tmp_path),
        per_device_train_batch_size=rows,
        max_steps=1,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        **extra,
    )


# transformers renamed gradient checkpointing to activation checkpointing; CI also runs the oldest supported
# transformers (see .ci/run), so the tests use whichever name the installed version has
def enable_checkpointing(model: nn.Module, **kwargs) -> None:
    """Activation (gradient) checkpointing on, under either transformers name; ``kwargs`` for torch's checkpoint."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing_arg() -> str:
    """The TrainingArguments field that turns checkpointing on, in the installed transformers."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def checkpointed_grads(
    model: nn.Module, rows: list[list[list[int]]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train mode with transformers' gradient checkpointing: the gradients of the summed squared logits of every
    document of ``rows`` (token ids, one list of documents per row) run alone, packed (indexed mask) through the
    patched model, and packed through the unpatched one: (alone, packed, leaked)."""
    docs = [d for row in rows for d in row]

    def grads(loss_fn) -> torch.Tensor:
        model.zero_grad()
        loss_fn().backward()
        out = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad()
        return out

    model.train()
    model.gradient_checkpointing_enable()
    try:
        alone = grads(lambda: sum(model(torch.tensor([d]), use_cache=False).logits.square().sum() for d in docs))
        batch = build(rows, "indexed_mask")
        deltapack.patch(model)
        try:
            logits = lambda: model(**batch.kwargs, use_cache=False).logits  # noqa: E731
            packed = grads(lambda: sum(logits()[r, c : c + n].square().sum() for r, c, n in batch.places))
        finally:
            deltapack.unpatch(model)
        leaked = grads(lambda: sum(logits()[r, c : c + n].square().sum() for r, c, n in batch.places))
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    return alone, packed, leaked


def assert_exact_in_every_format(model: nn.Module, arch: str) -> None:
    """The audit of ``model`` (eval mode): patched, every input format exact, forward and gradient; unpatched, at
    least one format leaks (so a no-op patch fails); the model is left unpatched."""
    from deltapack.audit import audit_model
    from deltapack.audit.core import ATOL, GRAD_RTOL

    report = audit_model(model, arch, localise=False)
    assert report.patch_supported, report.patch_error
    patched, unpatched = report.states["patched"], report.states["unpatched"]
    for name, result in patched.formats.items():
        assert result.raised is None, (name, result.raised)
        assert result.worst() <= ATOL, (name, result.worst())
        assert result.grad_rel is not None and result.grad_rel <= GRAD_RTOL, (name, result.grad_rel)
    assert any(unpatched.leaking(f, ATOL, GRAD_RTOL) for f in unpatched.formats)  # the test can fail
    assert not deltapack.is_patched(model)


# every option combination of transformers' DataCollatorWithFlattening that marks documents
FLATTENING = [
    dict(return_position_ids=pos, return_flash_attn_kwargs=flash, return_seq_idx=seq, position_ids_start=start)
    for pos, flash, seq, start in itertools.product([True, False], [True, False], [True, False], [0, 1])
    if pos or flash or seq  # without any of them the batch holds input_ids and labels only: nothing marks documents
    if pos or start == 0  # position_ids_start only changes position_ids
]


def assert_unpacked_bit_identical(model: nn.Module, ids: torch.Tensor, left_padded: bool = True) -> None:
    """``ids`` [2, T] without packing information: the patched model's logits (without a mask and with an all-ones
    mask) and greedy ``generate()`` are bit-identical to the unpatched model's; with ``left_padded`` the generation
    also runs with row 1 left-padded by 3 and compares its scores too."""
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as for generation
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    padded = dict(greedy, attention_mask=mask, output_scores=True, return_dict_in_generate=True)

    def calls():
        out = [model(ids).logits, model(ids, attention_mask=torch.ones_like(ids)).logits, model.generate(ids, **greedy)]
        return out + ([model.generate(ids, **padded)] if left_padded else [])

    with torch.no_grad():
        plain = calls()
        deltapack.patch(model)
        try:
            got = calls()
        finally:
            deltapack.unpatch(model)
    for a, b in zip(plain[:3], got[:3]):
        assert torch.equal(a, b)
    if left_padded:
        assert torch.equal(plain[3].sequences, got[3].sequences)
        assert all(torch.equal(a, b) for a, b in zip(plain[3].scores, got[3].scores))


def assert_packed_logits_equal_alone(
    model: nn.Module, rows, fmt: str, *, seed: int, pad_left: bool, extra_pad: int, alone_fn=alone_logits
) -> None:
    """``assert_packed_docs_exact`` on random documents of the lengths ``rows`` (one list of lengths per row)."""
    flat = iter(random_docs([n for r in rows for n in r], seed=seed))
    docs = [[next(flat) for _ in r] for r in rows]
    assert_packed_docs_exact(model, docs, fmt, pad_left=pad_left, extra_pad=extra_pad, alone_fn=alone_fn)


def assert_packed_docs_exact(
    model: nn.Module, rows, fmt: str, *, pad_left: bool, extra_pad: int, alone_fn=alone_logits
) -> None:
    """The documents ``rows`` (token ids, one list of documents per row) packed in ``fmt``: the unpatched model leaks
    on them or refuses them (so a no-op patch fails), the patched model gives each document's logits alone
    (``alone_fn(model, docs)``)."""
    packed = build(rows, fmt, pad_left=pad_left, extra_pad=extra_pad)
    alone = alone_fn(model, packed.docs)
    assert unpatched_diff(model, packed, alone) > LEAK
    with patched(model), torch.no_grad():
        logits = model(**packed.kwargs).logits
    assert logits.shape[:2] == packed.kwargs["input_ids"].shape
    assert max_doc_diff(logits, packed, alone) <= EXACT


def assert_padding_only_exact(model: nn.Module, docs: list[list[int]], pad_left: bool) -> None:
    """One document per row, padded on the left or right (``padding_mask``): the patched model gives each document's
    logits alone. No leak check: transformers is exact on such batches too."""
    packed = build([[d] for d in docs], "padding_mask", pad_left=pad_left)
    alone = alone_logits(model, packed.docs)
    with patched(model), torch.no_grad():
        assert max_doc_diff(model(**packed.kwargs).logits, packed, alone) <= EXACT


def assert_routing_is_each_document_alone(model: nn.Module, docs: list[list[int]]) -> None:
    """``docs`` (four documents) packed in two rows: unpatched, the router logits of the real tokens leak (so a no-op
    patch fails); patched, every real token is routed as in its document alone, token by token, and padding gets no
    router logits. Skips when the model returns no router logits in the installed transformers."""
    packed = build([docs[:3], docs[3:]], "indexed_mask", extra_pad=1)
    with torch.no_grad():
        alone = [model(torch.tensor([d]), output_router_logits=True) for d in docs]
        if getattr(alone[0], "router_logits", None) is None:
            pytest.skip(f"{model.config.model_type} returns no router logits with this transformers")
        leaky = model(**packed.kwargs, output_router_logits=True, use_cache=False).router_logits
        with patched(model):
            out = model(**packed.kwargs, output_router_logits=True)
    layers = len(alone[0].router_logits)
    expected = [torch.cat([a.router_logits[i].reshape(len(d), -1) for a, d in zip(alone, docs)]) for i in range(layers)]
    width = packed.kwargs["input_ids"].shape[1]
    rows = torch.cat([torch.arange(n) + r * width + c for r, c, n in packed.places])  # real tokens of the [B, T] batch
    assert max((lg[rows] - e).abs().max().item() for lg, e in zip(leaky, expected)) > LEAK  # unpatched: it leaks
    assert len(out.router_logits) == layers > 0
    for logits, want in zip(out.router_logits, expected):
        assert logits.shape[0] == len(rows)  # each real token once, none of the padding
        assert (logits - want).abs().max() <= EXACT


def packed_examples(archs, *, max_length: int = 12, max_docs: int = 4, max_rows: int = 3) -> dict:
    """Strategies for ``@given(**packed_examples(ARCHS))`` before ``assert_packed_logits_equal_alone``: ``rows`` of
    document lengths (at least one row holds two or more documents, where a leak can happen), ``arch``, ``attn``,
    ``fmt``, ``pad_left``, ``extra_pad`` and ``seed``."""
    lengths = st.lists(st.integers(1, max_length), min_size=1, max_size=max_docs)
    return dict(
        rows=st.lists(lengths, min_size=1, max_size=max_rows).filter(lambda rows: any(len(r) > 1 for r in rows)),
        arch=st.sampled_from(archs),
        attn=st.sampled_from(["sdpa", "eager"]),
        fmt=st.sampled_from(["position_ids", "indexed_mask", "cu_seqlens"]),
        pad_left=st.booleans(),
        extra_pad=st.integers(0, 3),
        seed=st.integers(0, 2**16),
    )


def per_doc_diff(logits: torch.Tensor, alone: list[torch.Tensor]) -> float:
    """Max |diff| of each document's logits in a flattened [1, total] batch vs the document alone."""
    lengths = [a.shape[0] for a in alone]
    per_doc = torch.split(logits[0, : sum(lengths)], lengths)
    return max((p - a).abs().max().item() for p, a in zip(per_doc, alone))


def unpatched_diff(model, packed, alone):
    """max diff of the unpatched model on the packed batch ``packed``, or inf when it refuses the input or gives NaN
    logits (older transformers, eager attention, left padding): either way not what the documents alone give."""
    try:
        with torch.no_grad():
            diff = max_doc_diff(model(**packed.kwargs, use_cache=False).logits, packed, alone)
    except (ValueError, RuntimeError, ImportError, NotImplementedError):
        return float("inf")
    return diff if diff == diff else float("inf")


def doc_loss_sum(logits, doc):
    """Summed next-token loss of one document: token i predicts token i + 1, inside the document only."""
    target = torch.tensor(doc[1:], dtype=torch.long)
    return F.cross_entropy(logits[: len(doc) - 1], target, reduction="sum")


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def norm_rel(a, b):
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def packed_loss(model, packed):
    """Summed next-token loss of every document of the packed batch ``packed``, each read at its own place."""
    logits = model(**packed.kwargs, use_cache=False).logits
    return sum(doc_loss_sum(logits[r, c : c + n], d) for (r, c, n), d in zip(packed.places, packed.docs))


def assert_packed_grads_equal_alone(model, packed, **alone_kwargs) -> None:
    """The gradient of ``packed_loss``: unpatched it leaks (relative > LEAK, so a no-op patch fails), patched it is
    the gradient of the documents run alone (``model(ids, **alone_kwargs)``) within 1e-4 relative; the model's
    gradients are cleared afterwards."""
    try:
        alone = sum(doc_loss_sum(model(torch.tensor([d]), **alone_kwargs).logits[0], d) for d in packed.docs)
        reference = grads_of(model, alone)
        assert norm_rel(grads_of(model, packed_loss(model, packed)), reference) > LEAK  # unpatched: it leaks
        with patched(model):
            assert norm_rel(grads_of(model, packed_loss(model, packed)), reference) <= 1e-4
    finally:
        model.zero_grad(set_to_none=True)


def installed(archs: tuple[str, ...]) -> tuple[str, ...]:
    """The tiny archs the installed transformers can build (its model type exists and takes the tiny config); CI also
    runs the oldest supported transformers, which lacks newer model types."""
    return tuple(a for a in archs if _builds(a))


@functools.cache
def _builds(arch: str) -> bool:
    from transformers import CONFIG_MAPPING

    from deltapack.tiny import tiny_config

    if model_type_of(arch) not in CONFIG_MAPPING:
        return False
    try:
        tiny_config(arch)
    except Exception:  # the installed transformers' config refuses the tiny one (a newer layer type, say)
        return False
    return True


def model_type_of(arch: str) -> str:
    from deltapack.tiny import TINY, available

    available()  # the families register their tiny configs on import
    return TINY.get(arch, {}).get("model_type", arch)


def tiny_attention_model(arch: str, **overrides: object) -> torch.nn.Module:
    """A tiny random-init fp32 model of ``arch`` (the audit's shrunk config), patched; no sliding window unless
    ``overrides`` sets one."""
    config, _ = shrink_config(transformers.AutoConfig.for_model(arch), arch)
    for key, value in {"sliding_window": None, **overrides}.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    except ValueError:  # no sdpa for this architecture (bloom, gpt_oss)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # q/k larger than at init (nearly uniform attention), so keys read wrongly show
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(8)
    return deltapack.patch(model)
