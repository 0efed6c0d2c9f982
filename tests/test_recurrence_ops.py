"""The recurrence ops (lightning attention, RG-LRU scan, RWKV-4 WKV, mLSTM, token shift) against plain sequential
loops run on each document alone (fp64), and against transformers' own functions where they are standalone;
outputs and gradients. Each test also shows the same stream run as one document differs (a leak would show)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu
from transformers.models.xlstm import modeling_xlstm

from deltapack.ops import Segments
from deltapack.ops.fallback import check_fast_backend
from deltapack.ops.lightning import lightning_attention, lightning_attention_ref
from deltapack.ops.mlstm import mlstm, mlstm_ref
from deltapack.ops.rg_lru import rg_lru_scan, rg_lru_scan_ref
from deltapack.ops.token_shift import token_shift
from deltapack.ops.wkv import wkv, wkv_ref

# length 1, shorter than a chunk, chunk-aligned, ragged, longer than two chunks (chunks of 8 in the chunked ops)
LENGTHS = {"one-token": [1], "short": [5, 1, 3], "aligned": [8, 16], "ragged": [7, 9, 1, 18], "long": [21, 2]}
CHUNK = 8


def segments_of(lengths):
    return Segments.from_cu_seqlens([0, *torch.tensor(lengths).cumsum(0).tolist()])


def docs(lengths):
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    return list(zip(bounds[:-1], bounds[1:]))


def check(op, seq_fn, inputs, lengths, slicer, atol=1e-10):
    """op(*inputs, segments) on the packed stream vs seq_fn on each document's slice; outputs and gradients."""
    out = op(*inputs, segments=segments_of(lengths))
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), inputs, allow_unused=True)
    totals = [torch.zeros_like(x) for x in inputs]
    for a, b in docs(lengths):
        piece = [slicer(x, a, b) for x in inputs]
        alone = seq_fn(*piece)
        torch.testing.assert_close(out[:, a:b], alone, rtol=0, atol=atol)
        for total, g in zip(totals, torch.autograd.grad((alone * weights[:, a:b]).sum(), inputs, allow_unused=True)):
            if g is not None:
                total += g
    for g_packed, g_sum in zip(grads, totals):
        if g_packed is not None:
            torch.testing.assert_close(g_packed, g_sum, rtol=1e-8, atol=atol)
    if len(lengths) > 1:  # one long document: differs, so the test can fail
        leaky = op(*inputs, segments=segments_of([sum(lengths)]))
        assert (leaky - out).abs().max() > 1e-3


def stream_slice(x, a, b):
    return x[:, a:b] if x.dim() >= 3 else x


# --------------------------------------------------------------------------------------------- sequential oracles
def lightning_seq(q, k, v, slope):
    """q, k: [1, n, H, K], v: [1, n, H, V]: state S = e^{-slope} S + k v^T; o = q S."""
    state = q.new_zeros(q.shape[2], q.shape[3], v.shape[3])
    outs = []
    for t in range(q.shape[1]):
        state = torch.exp(-slope)[:, None, None] * state + k[0, t, :, :, None] * v[0, t, :, None, :]
        outs.append((q[0, t, :, :, None] * state).sum(-2))
    return torch.stack(outs)[None]


def rg_lru_seq(x, log_a):
    h = torch.zeros_like(x[:, 0])
    outs = []
    for t in range(x.shape[1]):
        h = (torch.exp(log_a[:, t]) * h if t else 0) + x[:, t]
        outs.append(h)
    return torch.stack(outs, 1)


def wkv_seq(time_decay, time_first, k, v):
    """The WKV formula written out without stabilisation (fp64, moderate values)."""
    w = torch.exp(time_decay)
    outs = []
    for t in range(k.shape[1]):
        s = torch.arange(t, dtype=k.dtype)
        past = torch.exp(-(t - 1 - s)[:, None] * w + k[0, :t])
        now = torch.exp(time_first + k[0, t])
        outs.append(((past * v[0, :t]).sum(0) + now * v[0, t]) / (past.sum(0) + now))
    return torch.stack(outs)[None]


def mlstm_seq(q, k, v, i, f, eps=1e-6):
    """transformers' own recurrent mLSTM (token by token), [1, n, H, *] layout, fp64 state."""
    h = modeling_xlstm.mlstm_recurrent_sequence_native(
        query=q.transpose(1, 2),
        key=k.transpose(1, 2),
        value=v.transpose(1, 2),
        igate=i.transpose(1, 2),
        fgate=f.transpose(1, 2),
        eps=eps,
        dtype_state=torch.float64,
    )
    return h.transpose(1, 2)


# ------------------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", list(LENGTHS))
def test_lightning_attention_matches_each_document_alone(name):
    lengths, gen = LENGTHS[name], torch.Generator().manual_seed(0)
    total, heads = sum(lengths), 3
    q, k = (torch.randn(1, total, heads, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, total, heads, 5, generator=gen, dtype=torch.float64)
    slope = torch.tensor([0.5, 0.05, 0.005], dtype=torch.float64)  # the last one: long memory
    inputs = [x.requires_grad_() for x in (q, k, v)]

    def op(q, k, v, *, segments):
        return lightning_attention_ref(q, k, v, slope, segments=segments, chunk_size=CHUNK)

    check(op, lambda q, k, v: lightning_seq(q, k, v, slope), inputs, lengths, stream_slice)


@pytest.mark.parametrize("name", list(LENGTHS))
def test_rg_lru_scan_matches_each_document_alone(name):
    lengths, gen = LENGTHS[name], torch.Generator().manual_seed(1)
    total = sum(lengths)
    x = torch.randn(1, total, 6, generator=gen, dtype=torch.float64)
    log_a = -torch.rand(1, total, 6, generator=gen, dtype=torch.float64) * 0.1
    inputs = [x.requires_grad_(), log_a.requires_grad_()]
    check(rg_lru_scan_ref, rg_lru_seq, inputs, lengths, stream_slice)


@pytest.mark.parametrize("name", list(LENGTHS))
def test_wkv_matches_each_document_alone(name):
    lengths, gen = LENGTHS[name], torch.Generator().manual_seed(2)
    total, dim = sum(lengths), 6
    k = torch.randn(1, total, dim, generator=gen, dtype=torch.float64) * 3
    v = torch.randn(1, total, dim, generator=gen, dtype=torch.float64)
    time_decay = torch.linspace(-6, 1, dim, dtype=torch.float64)  # w from 0.0025 (long memory) to 2.7
    time_first = torch.randn(dim, generator=gen, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (time_decay, time_first, k, v)]
    check(wkv_ref, wkv_seq, inputs, lengths, stream_slice)


@pytest.mark.parametrize("name", list(LENGTHS))
def test_wkv_matches_transformers_cpu_loop_with_large_keys(name):
    """Keys of +-60 overflow e^k in fp32: the stabilised scan must agree with transformers' stabilised loop."""
    lengths, gen = LENGTHS[name], torch.Generator().manual_seed(3)
    total, dim = sum(lengths), 5
    k = torch.randn(1, total, dim, generator=gen) * 60
    v = torch.randn(1, total, dim, generator=gen)
    time_decay = torch.linspace(-5, 2, dim)
    time_first = torch.randn(dim, generator=gen)
    out = wkv(time_decay, time_first, k, v, segments=segments_of(lengths))
    assert torch.isfinite(out).all()
    for a, b in docs(lengths):
        alone, _ = rwkv_linear_attention_cpu(time_decay, time_first, k[:, a:b], v[:, a:b])
        torch.testing.assert_close(out[:, a:b], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(LENGTHS))
def test_mlstm_matches_each_document_alone(name):
    lengths, gen = LENGTHS[name], torch.Generator().manual_seed(4)
    total, heads = sum(lengths), 2
    q, k = (torch.randn(1, total, heads, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, total, heads, 3, generator=gen, dtype=torch.float64)
    i = torch.randn(1, total, heads, generator=gen, dtype=torch.float64) * 3
    f = torch.randn(1, total, heads, generator=gen, dtype=torch.float64) * 2 + 4  # long memory
    inputs = [x.requires_grad_() for x in (q, k, v, i, f)]

    def op(q, k, v, i, f, *, segments):
        return mlstm_ref(q, k, v, i, f, segments=segments, chunk_size=CHUNK)

    check(op, mlstm_seq, inputs, lengths, stream_slice)


def test_mlstm_matches_transformers_chunkwise_kernel():
    """One 64-token document through transformers' chunkwise kernel (the train path) and mlstm."""
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 2, 64, 8, generator=gen) for _ in range(2))
    v = torch.randn(1, 2, 64, 8, generator=gen)
    i, f = torch.randn(1, 2, 64, generator=gen), torch.randn(1, 2, 64, generator=gen) + 3
    ref = modeling_xlstm.mlstm_chunkwise_native_autograd(q, k, v, i, f, chunk_size=16)
    out = mlstm(*(x.transpose(1, 2) for x in (q, k, v, i, f)), segments=segments_of([64]), chunk_size=32)
    torch.testing.assert_close(out.transpose(1, 2), ref, rtol=1e-5, atol=1e-5)


def test_token_shift_reads_zeros_at_document_starts():
    lengths = [3, 1, 2]
    x = torch.arange(1.0, 7.0)[None, :, None].requires_grad_()
    y = token_shift(x, segments=segments_of(lengths))
    assert y[0, :, 0].tolist() == [0.0, 1.0, 2.0, 0.0, 0.0, 5.0]
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g[0, :, 0].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    for a, b in docs(lengths):  # each document alone: the model's own ZeroPad2d shift
        alone = torch.nn.ZeroPad2d((0, 0, 1, -1))(x[:, a:b])
        assert torch.equal(y[:, a:b], alone)


def test_malformed_inputs_raise():
    seg = segments_of([3, 2])
    with pytest.raises(ValueError, match="packed stream"):
        rg_lru_scan(torch.zeros(2, 5, 4), torch.zeros(2, 5, 4), segments=seg)
    with pytest.raises(ValueError, match="log_a"):
        rg_lru_scan(torch.zeros(1, 5, 4), torch.zeros(1, 5, 3), segments=seg)
    with pytest.raises(ValueError, match="slope"):
        lightning_attention(
            torch.zeros(1, 5, 2, 4), torch.zeros(1, 5, 2, 4), torch.zeros(1, 5, 2, 4), torch.ones(3), segments=seg
        )
    with pytest.raises(ValueError, match="unknown deltapack backend"):
        wkv(torch.zeros(4), torch.zeros(4), torch.zeros(1, 5, 4), torch.zeros(1, 5, 4), segments=seg, backend="fla")
    with pytest.raises(ValueError, match="i must be"):
        mlstm(*(torch.zeros(1, 5, 2, 4) for _ in range(3)), torch.zeros(1, 5, 3), torch.zeros(1, 5, 2), segments=seg)


def test_a_fast_backend_that_raises_or_is_off_is_refused():
    """The first-use check of the FLA backends: a kernel that raises (forward or backward) or returns the wrong
    numbers is refused with RuntimeError (the op then runs the reference and logs why); a right one passes."""
    seg = segments_of([1, 5, 30])
    x = torch.randn(1, 36, 4)
    log_a = -torch.rand(1, 36, 4) * 0.1

    def ref(x, log_a):
        return rg_lru_scan_ref(x, log_a, segments=seg)

    check_fast_backend("right", ref, ref, [x, log_a])
    with pytest.raises(RuntimeError, match="broken raised"):
        check_fast_backend("broken", lambda x, a: (_ for _ in ()).throw(ValueError("no")), ref, [x, log_a])
    with pytest.raises(RuntimeError, match="leaky is off"):
        leaky = segments_of([36])
        check_fast_backend("leaky", lambda x, a: rg_lru_scan_ref(x, a, segments=leaky), ref, [x, log_a])
