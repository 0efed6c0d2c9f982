"""The reference ops against independent oracles, one document at a time: transformers' own GDN functions run on
each document alone, a token-by-token recurrence, and F.conv1d per document; outputs, final states and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import causal_conv1d_fn, torch_chunk_gated_delta_rule

from deltapack import ops
from deltapack.ops import Segments
from deltapack.ops.reference import causal_conv1d_ref, gated_delta_rule_ref, l2norm

# readable ids: length 1, shorter than a chunk, exactly a chunk, not a multiple of a chunk, longer than two chunks
LENGTHS = {
    "one-token": [1],
    "short": [5, 1, 17],
    "chunk-aligned": [64, 64],
    "ragged": [63, 65, 2, 130],
    "long": [200, 3],
}


def cu_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def seg_of(lengths):
    return Segments.from_cu_seqlens(cu_of(lengths))


def gated_delta_rule_recurrent_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    segments: Segments,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """Token-by-token form of :func:`gated_delta_rule_ref` (same arguments, output only): slow, the oracle the
    chunked reference is checked against."""
    total, num_k_heads, head_k = q.shape[1:]
    num_v_heads, head_v = v.shape[-2:]
    scale = head_k**-0.5 if scale is None else scale
    group = num_v_heads // num_k_heads
    q, k = q.float().repeat_interleave(group, dim=2), k.float().repeat_interleave(group, dim=2)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * scale
    v, g, beta = v.float(), g.float(), beta.float()
    starts = set(segments.cu_seqlens_host[:-1])
    out = torch.empty(1, total, num_v_heads, head_v)
    state = q.new_zeros(1, num_v_heads, head_k, head_v)
    for t in range(total):
        if t in starts:
            state = torch.zeros_like(state)
        state = state * g[:, t].exp()[..., None, None]
        pred = (state * k[:, t, :, :, None]).sum(-2)
        state = state + k[:, t, :, :, None] * ((v[:, t] - pred) * beta[:, t, :, None])[:, :, None, :]
        out[:, t] = (state * q[:, t, :, :, None]).sum(-2)
    return out.to(v.dtype)


def gdn_inputs(total, hk=2, ratio=2, k=16, v=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hv = hk * ratio
    q = torch.randn(1, total, hk, k, generator=gen)
    kk = torch.randn(1, total, hk, k, generator=gen)
    vv = torch.randn(1, total, hv, v, generator=gen)
    g = -torch.rand(1, total, hv, generator=gen) * 0.05  # long memory: a leak would show
    beta = torch.rand(1, total, hv, generator=gen)
    return [x.requires_grad_() for x in (q, kk, vv, g, beta)]


@pytest.mark.parametrize("ratio", [1, 2])
@pytest.mark.parametrize("name", list(LENGTHS))
def test_gated_delta_rule_matches_each_document_alone(name, ratio):
    lengths = LENGTHS[name]
    cu = cu_of(lengths)
    inputs = gdn_inputs(sum(lengths), ratio=ratio)
    out, final = gated_delta_rule_ref(*inputs, segments=seg_of(lengths), output_final_state=True)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), inputs)

    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        piece = [x.detach()[:, a:b].clone().requires_grad_() for x in inputs]
        # key heads repeated for their value heads by hand (transformers before 5.18 takes equal head counts)
        q_alone, k_alone = (x.repeat_interleave(ratio, dim=2) for x in piece[:2])
        o_alone, s_alone = torch_chunk_gated_delta_rule(
            q_alone, k_alone, piece[2], g=piece[3], beta=piece[4], output_final_state=True, use_qk_l2norm_in_kernel=True
        )
        torch.testing.assert_close(out[:, a:b], o_alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(final[n], s_alone[0], rtol=0, atol=1e-5)
        g_alone = torch.autograd.grad((o_alone * weights[:, a:b]).sum(), piece)
        for g_packed, g_ref in zip(grads, g_alone):
            torch.testing.assert_close(g_packed[:, a:b], g_ref, rtol=1e-4, atol=1e-5)

    if len(lengths) > 1:  # the same stream as one sequence leaks: the test can tell
        leaky, _ = gated_delta_rule_ref(*inputs, segments=seg_of([sum(lengths)]))
        assert (leaky - out).abs().max() > 1e-3


def test_chunked_equals_recurrent():
    lengths = [3, 70, 1, 9]
    segments = seg_of(lengths)
    inputs = [x.detach() for x in gdn_inputs(sum(lengths), seed=1)]
    chunked, _ = gated_delta_rule_ref(*inputs, segments=segments)
    recurrent = gated_delta_rule_recurrent_ref(*inputs, segments=segments)
    torch.testing.assert_close(chunked, recurrent, rtol=0, atol=1e-5)


def test_two_rows_packed_are_the_two_rows_alone():
    inputs = [x.detach() for x in gdn_inputs(2 * 20, seed=2)]
    rows = [
        gated_delta_rule_ref(*(x[:, i * 20 : (i + 1) * 20] for x in inputs), segments=seg_of([20]))[0] for i in (0, 1)
    ]
    stream, _ = gated_delta_rule_ref(*inputs, segments=seg_of([20, 20]))
    torch.testing.assert_close(torch.cat(rows, dim=1), stream, rtol=0, atol=0)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_never_reads_across_a_boundary(width, bias, activation):
    lengths = [1, 2, 7, 3, 1]
    total, channels = sum(lengths), 6
    x = torch.randn(1, total, channels, requires_grad=True)
    weight = torch.randn(channels, width, requires_grad=True)
    b = torch.randn(channels, requires_grad=True) if bias else None
    out = causal_conv1d_ref(x, weight, b, activation, segments=seg_of(lengths))
    out.pow(2).sum().backward()
    cu = cu_of(lengths).tolist()
    expected = torch.cat(
        [
            causal_conv1d_fn(x[:, a:e].transpose(1, 2), weight, b, activation=activation).transpose(1, 2)
            for a, e in zip(cu[:-1], cu[1:])
        ],
        dim=1,
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    grad_x = torch.autograd.grad(expected.pow(2).sum(), x)[0]
    torch.testing.assert_close(x.grad, grad_x, rtol=1e-5, atol=1e-6)
    unbounded = causal_conv1d_ref(x, weight, b, activation, segments=seg_of([total]))  # one sequence: leaks
    assert (unbounded - out).abs().max() > 1e-3


def test_public_ops_run_the_reference_on_cpu():
    segments = seg_of([4, 9])
    q, k, v, g, beta = (x.detach() for x in gdn_inputs(13))
    out, _ = ops.gated_delta_rule(q, k, v, g, beta, segments=segments)
    ref, _ = gated_delta_rule_ref(q, k, v, g, beta, segments=segments)
    assert torch.equal(out, ref)
    x, w = torch.randn(1, 13, 5), torch.randn(5, 4)
    conv = ops.causal_conv1d(x, w, None, "silu", segments=segments)
    assert torch.equal(conv, causal_conv1d_ref(x, w, None, "silu", segments=segments))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda q, k, v, g, b: gated_delta_rule_ref(q, k, v, g, b, segments=seg_of([3, 3])), "the 6 tokens"),
        (lambda q, k, v, g, b: gated_delta_rule_ref(q, k, v[:, :, :3], g, b, segments=seg_of([13])), "Hv a multiple"),
        (lambda q, k, v, g, b: gated_delta_rule_ref(q, k, v, g[..., :1], b, segments=seg_of([13])), "g must be"),
        (lambda q, k, v, g, b: ops.gated_delta_rule(q[0], k, v, g, b, segments=seg_of([13])), "one packed stream"),
    ],
)
def test_bad_shapes_raise(call, message):
    inputs = [x.detach() for x in gdn_inputs(13)]
    with pytest.raises(ValueError, match=message):
        call(*inputs)
