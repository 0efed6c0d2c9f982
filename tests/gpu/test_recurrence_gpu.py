"""The recurrence ops and layers on CUDA: each backend ([fast, reference]) against the exact fp32 reference on
random varlen inputs; the packed layers of minimax, recurrent_gemma, rwkv and xlstm with no host sync; the patched
tiny models exact per document."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import TOL, assert_close, random_lengths, rel_err, requires_cuda, segments_of

import deltapack
from deltapack import Boundaries
from deltapack.diagnostics import count_host_syncs
from deltapack.models.layers import packed_layer_of
from deltapack.ops import fla
from deltapack.ops.lightning import lightning_attention, lightning_attention_ref
from deltapack.ops.mlstm import mlstm, mlstm_ref
from deltapack.ops.rg_lru import rg_lru_scan, rg_lru_scan_ref
from deltapack.ops.wkv import wkv, wkv_ref
from deltapack.tiny import tiny_model

pytestmark = [pytest.mark.gpu, requires_cuda]
needs_fla = pytest.mark.skipif(not fla.AVAILABLE, reason="needs FLA (pip install deltapack[gpu])")
BACKENDS = [pytest.param("fla", marks=needs_fla), "reference"]


def rand(*shape, gen, scale=1.0):
    return torch.randn(*shape, device="cuda", generator=gen) * scale


def check(out, ref, inputs, ref_inputs, names, dtype=torch.bfloat16):
    assert out.dtype == dtype
    assert_close(out, ref, TOL[dtype])
    up = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    got = torch.autograd.grad(out, inputs, up.to(out.dtype))
    want = torch.autograd.grad(ref, ref_inputs, up)
    for name, g, w in zip(names, got, want):
        assert_close(g, w, TOL[dtype], name)


def upcast(inputs):
    return [t.detach().float().requires_grad_() for t in inputs]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightning_attention_matches_reference(backend):
    lengths = random_lengths(3000, torch.Generator().manual_seed(1))
    segments, gen = segments_of(lengths), torch.Generator(device="cuda").manual_seed(0)
    total = sum(lengths)
    inputs = [(rand(1, total, 4, 64, gen=gen) * 0.2).to(torch.bfloat16).requires_grad_() for _ in range(3)]
    slope = torch.tensor([0.3, 0.05, 0.01, 0.001], device="cuda")
    out = lightning_attention(*inputs, slope, segments=segments, backend=backend)
    ref_inputs = upcast(inputs)
    ref = lightning_attention_ref(*ref_inputs, slope, segments=segments)
    check(out, ref, inputs, ref_inputs, ("dq", "dk", "dv"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rg_lru_scan_matches_reference(backend):
    lengths = random_lengths(3000, torch.Generator().manual_seed(2))
    segments, gen = segments_of(lengths), torch.Generator(device="cuda").manual_seed(0)
    total = sum(lengths)
    x = rand(1, total, 256, gen=gen).to(torch.bfloat16).requires_grad_()
    log_a = (-F.softplus(rand(1, total, 256, gen=gen)) * 0.05).to(torch.bfloat16).requires_grad_()
    out = rg_lru_scan(x, log_a, segments=segments, backend=backend)
    ref_inputs = upcast([x, log_a])
    ref = rg_lru_scan_ref(*ref_inputs, segments=segments)
    check(out, ref, [x, log_a], ref_inputs, ("dx", "dlog_a"))


def test_wkv_and_mlstm_on_cuda_match_the_fp32_reference():
    """Reference-only ops: bf16 inputs on CUDA (computed in fp32) against fp32 inputs."""
    lengths = random_lengths(2000, torch.Generator().manual_seed(3))
    segments, gen = segments_of(lengths), torch.Generator(device="cuda").manual_seed(0)
    total = sum(lengths)
    decay, first = rand(128, gen=gen).requires_grad_(), rand(128, gen=gen).requires_grad_()
    k, v = (rand(1, total, 128, gen=gen).to(torch.bfloat16).requires_grad_() for _ in range(2))
    ref_kv = upcast([k, v])
    check(
        wkv(decay, first, k, v, segments=segments),
        wkv_ref(decay, first, *ref_kv, segments=segments),
        [k, v],
        ref_kv,
        ("dk", "dv"),
    )
    q, kk, vv = (rand(1, total, 4, 32, gen=gen).to(torch.bfloat16).requires_grad_() for _ in range(3))
    i, f = rand(1, total, 4, gen=gen).requires_grad_(), (rand(1, total, 4, gen=gen) + 3).requires_grad_()
    ref_m = upcast([q, kk, vv])
    check(
        mlstm(q, kk, vv, i, f, segments=segments),
        mlstm_ref(*ref_m, i, f, segments=segments),
        [q, kk, vv],
        ref_m,
        ("dq", "dk", "dv"),
    )


LAYERS = {  # arch -> class names of its packed layers
    "minimax": ("MiniMaxLightningAttention",),
    "recurrent_gemma": ("RecurrentGemmaRecurrentBlock",),
    "rwkv": ("RwkvSelfAttention", "RwkvFeedForward"),
    "xlstm": ("xLSTMLayer",),
}


def model_on_cuda(arch, dtype):
    attn = "sdpa" if arch in ("minimax", "recurrent_gemma") else "eager"
    return tiny_model(arch, attn_implementation=attn).to("cuda", dtype)


@pytest.mark.parametrize("arch", list(LAYERS))
def test_packed_layers_make_no_host_sync(arch):
    model = model_on_cuda(arch, torch.bfloat16)
    lengths = [70, 5, 1, 130, 64, 33]
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for cls in LAYERS[arch]:
        layer = next(m for m in model.modules() if type(m).__name__ == cls)
        forward = packed_layer_of(layer).forward
        x = torch.randn(1, cu[-1], model.config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        forward(layer, x, Boundaries.from_cu_seqlens(cu, (1, cu[-1])).to("cuda"))[0].sum().backward()  # warm up
        bounds = Boundaries.from_cu_seqlens(cu, (1, cu[-1])).to("cuda")
        step = functools.partial(lambda f, *a: f(*a)[0].sum().backward(), forward, layer, x, bounds)
        assert count_host_syncs(step) == 0, cls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", list(LAYERS))
def test_patched_model_on_cuda_is_exact_per_document(arch, dtype, monkeypatch):
    """fp32: packed logits = each document alone (max |diff| <= 1e-5). bf16: each document's packed logits are at most
    twice as far (relative L2, + 1e-3) from the fp32 model's logits alone as the bf16 model's own logits alone are."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the unpatched conv (recurrent_gemma) in fp32
    model32 = model_on_cuda(arch, torch.float32)
    model = model32 if dtype == torch.float32 else model_on_cuda(arch, dtype)
    gen = torch.Generator().manual_seed(4)
    rows = [[70, 5, 1, 130], [64, 33]]
    docs = [[torch.randint(0, 128, (n,), generator=gen) for n in r] for r in rows]
    ids = torch.nn.utils.rnn.pad_sequence([torch.cat(r) for r in docs], batch_first=True).cuda()
    doc_ids = torch.nn.utils.rnn.pad_sequence(
        [torch.cat([torch.full((len(d),), n + 1) for n, d in enumerate(r)]) for r in docs], batch_first=True
    ).cuda()

    def alone(m):
        # transformers' native mLSTM kernels mix fp32 states with bf16 inputs (a dtype error) unless under autocast
        with torch.autocast("cuda", dtype=m.dtype, enabled=arch == "xlstm" and m.dtype != torch.float32):
            return [[m(d[None].cuda(), use_cache=False).logits[0].float() for d in r] for r in docs]

    with torch.no_grad():
        ref, own = alone(model32), alone(model)
        deltapack.patch(model)
        try:
            logits = model(ids, attention_mask=doc_ids).logits.float()
        finally:
            deltapack.unpatch(model)
    for row in range(len(rows)):
        col = 0
        for want, baseline in zip(ref[row], own[row]):
            got = logits[row, col : col + want.shape[0]]
            if dtype == torch.float32:
                assert (got - want).abs().max().item() <= 1e-5, (row, col)
            else:
                bound = 2 * rel_err(baseline, want) + 1e-3
                assert rel_err(got, want) <= bound, (row, col, rel_err(got, want), bound)
            col += want.shape[0]


@needs_fla
def test_lightning_attention_chunked_backend_matches_reference():
    """The chunked backend, asked for by name (last in this file: its first call compiles TileLang kernels)."""
    test_lightning_attention_matches_reference("fla_chunk")
