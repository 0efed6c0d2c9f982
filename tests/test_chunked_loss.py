"""The chunked loss of packed calls (deltapack.patch(model, chunked_loss=...)): the same loss and gradients as the
full logits, the logits never materialised, the model's own path where its loss is not plain cross-entropy, and the
unpacked path untouched."""

from __future__ import annotations

import pytest
import torch

import deltapack
from deltapack.audit.build import build_model
from deltapack.chunked_loss import chunked_lm_loss, chunked_lm_loss_ref, why_not_chunked
from deltapack.tiny import tiny_model
from helpers import LEAK, documents, grads_of, rel
from packing import build

CHUNK = 5
TOL = 1e-5  # relative, fp32


def _model(arch: str) -> torch.nn.Module:
    if arch == "qwen3_5":
        return tiny_model(arch)
    return build_model(arch).model.float().eval()  # llama: its default config, shrunk


def _batch(model):
    docs = documents((7, 12, 3, 9, 11, 6))
    packed = build([docs[:3], docs[3:]], "position_ids")
    kwargs = dict(packed.kwargs)
    labels = kwargs["input_ids"].clone()
    labels[kwargs["attention_mask"] == 0] = -100
    labels[0, 4] = labels[1, 2] = -100  # ignored labels inside documents
    kwargs["labels"] = labels
    return kwargs


def _loss_and_grads(model, kwargs, **patch_kw):
    deltapack.patch(model, **patch_kw)
    try:
        out = model(**kwargs)
        return out, out.loss.detach(), grads_of(model, out.loss)
    finally:
        deltapack.unpatch(model)


@pytest.mark.parametrize("arch", ["qwen3_5", "llama"])
@pytest.mark.parametrize("num_items", [None, 13])
def test_chunked_loss_equals_full_logits_loss(arch, num_items):
    model = _model(arch)
    kwargs = _batch(model)
    if num_items is not None:
        kwargs["num_items_in_batch"] = torch.tensor(num_items)
    _, full, full_grads = _loss_and_grads(model, kwargs)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        out, chunked, chunked_grads = _loss_and_grads(model, kwargs, chunked_loss=CHUNK)
    finally:
        hook.remove()
    assert out.logits is None
    assert seen and all(s[0] <= CHUNK for s in seen)  # forward and the backward's recomputation: chunks only
    assert rel(chunked, full) <= TOL
    assert rel(chunked_grads, full_grads) <= TOL
    # the input is packed: the unpatched model's loss on it (documents leaking into each other) differs
    with torch.no_grad():
        leaked = model(**{k: v for k, v in kwargs.items() if k != "attention_mask"}).loss
    assert abs(leaked - full).item() > LEAK


def test_return_logits_gives_the_models_own_output():
    model = _model("llama")
    kwargs = _batch(model)
    with torch.no_grad():
        deltapack.patch(model)
        own = model(**kwargs)
        deltapack.unpatch(model)
        deltapack.patch(model, chunked_loss=CHUNK)
        asked = model(**kwargs, return_logits=True)
        chunked = model(**kwargs)
        deltapack.unpatch(model)
    assert torch.equal(asked.logits, own.logits) and torch.equal(asked.loss, own.loss)
    assert chunked.logits is None and rel(chunked.loss, own.loss) <= TOL


def test_fallback_when_the_loss_is_not_plain_cross_entropy():
    model = _model("llama")
    kwargs = _batch(model)

    def scaled_loss(logits, labels, vocab_size, **kw):
        return 2.0 * torch.nn.functional.cross_entropy(logits.float().view(-1, vocab_size), labels.view(-1).roll(-1))

    model.loss_function = scaled_loss
    assert "ForCausalLMLoss" in why_not_chunked(model, model.model, {})
    with torch.no_grad():
        deltapack.patch(model)
        own = model(**kwargs)
        deltapack.unpatch(model)
        deltapack.patch(model, chunked_loss=CHUNK)
        out = model(**kwargs)
        deltapack.unpatch(model)
    assert out.logits is not None and torch.equal(out.loss, own.loss)
    del model._loss_function
    assert why_not_chunked(model, model.model, {}) is None
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in why_not_chunked(model, model.model, {})
    del model.config.final_logit_softcapping
    assert "router" in why_not_chunked(model, model.model, {"output_router_logits": True})


def test_unpacked_calls_are_bit_identical():
    model = tiny_model("qwen3_5")
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = model(ids, labels=ids)
        deltapack.patch(model, chunked_loss=CHUNK)
        after = model(ids, labels=ids)
        deltapack.unpatch(model)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.loss, after.loss)


def test_chunked_lm_loss_matches_its_reference_twin():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 31, bias=False)
    hidden = torch.randn(1, 23, 8, requires_grad=True)
    labels = torch.randint(0, 31, (1, 23))
    labels[0, ::4] = -100
    for num_items in (None, 40):
        ref = chunked_lm_loss_ref(head, hidden, labels, num_items)
        ref_grad = torch.autograd.grad(ref, hidden)[0]
        got = chunked_lm_loss(head, hidden, labels, num_items, chunk=6)
        got_grad = torch.autograd.grad(got, hidden)[0]
        assert rel(got, ref) <= TOL and rel(got_grad, ref_grad) <= TOL
    with pytest.raises(ValueError, match="positive"):
        chunked_lm_loss(head, hidden, labels, chunk=0)
    with pytest.raises(ValueError, match="chunked_loss"):
        deltapack.patch(_model("llama"), chunked_loss=0)


def _matmuls(fn) -> int:
    """aten matrix products run by ``fn()``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.matmul):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "checkpointed"])
def test_both_chunk_paths_match_the_reference_in_every_gradient(hooked: bool):
    """A plain nn.Linear head takes the fused path (gradients computed in the forward, nothing recomputed); a head
    with a forward hook (as FSDP's) the checkpointed one. Both equal the full-logits loss in the loss and in the
    gradients of the hidden states, the weight and the bias."""
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 31, bias=True)
    if hooked:
        head.register_forward_pre_hook(lambda module, args: None)
    hidden = torch.randn(2, 13, 8, requires_grad=True)
    labels = torch.randint(0, 31, (2, 13))
    labels[0, ::3] = labels[1, -4:] = -100
    params = (hidden, head.weight, head.bias)
    ref = chunked_lm_loss_ref(head, hidden, labels, 17)
    ref_grads = torch.autograd.grad(ref * 3.0, params)  # an upstream gradient other than 1
    got = chunked_lm_loss(head, hidden, labels, 17, chunk=6)
    got_grads = torch.autograd.grad(got * 3.0, params)
    assert rel(got, ref) <= TOL
    for g, r in zip(got_grads, ref_grads):
        assert rel(g, r) <= TOL
    chunks = 5  # 26 tokens in chunks of 6
    loss = None

    def forward():
        nonlocal loss
        loss = chunked_lm_loss(head, hidden, labels, chunk=6)

    forward_mm = _matmuls(forward)
    backward_mm = _matmuls(lambda: torch.autograd.grad(loss, params))
    if hooked:  # the logits once in the forward; recomputed, then two products per chunk, in the backward
        assert (forward_mm, backward_mm) == (chunks, 3 * chunks)
    else:  # logits and both gradient products per chunk in the forward; the backward only scales
        assert (forward_mm, backward_mm) == (3 * chunks, 0)


def test_fused_chunk_loss_refuses_a_second_backward():
    head = torch.nn.Linear(8, 31, bias=False)
    hidden = torch.randn(1, 9, 8, requires_grad=True)
    loss = chunked_lm_loss(head, hidden, torch.randint(0, 31, (1, 9)), chunk=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_a_chunk_step_is_taken_only_after_it_matched_the_reference(caplog):
    """The check that admits FLA's cross-entropy kernels on a GPU, run here with stand-ins: one that matches the
    reference is taken; one whose loss is off by 1e-3 (relative), one whose gradient is wrong and one
    that raises all give the reference, with a warning naming them."""
    from deltapack.chunked_loss import checked, logit_grad_ref

    weight = torch.randn(50, 8).to(torch.bfloat16)

    def same(logits, labels, ignore_index, grad):
        return logit_grad_ref(logits, labels, ignore_index, grad)

    def loss_off(logits, labels, ignore_index, grad):
        loss, g = logit_grad_ref(logits, labels, ignore_index, grad)
        return loss * (1 + 1e-3), g

    def grad_off(logits, labels, ignore_index, grad):
        loss, g = logit_grad_ref(logits, labels, ignore_index, grad)
        return loss, g.roll(1, dims=1)

    def raises(logits, labels, ignore_index, grad):
        raise RuntimeError("no kernel here")

    assert checked(same, weight) is same
    for wrong in (loss_off, grad_off, raises):
        caplog.clear()
        with caplog.at_level("WARNING", logger="deltapack"):
            assert checked(wrong, weight) is logit_grad_ref
        assert wrong.__name__ in caplog.text
