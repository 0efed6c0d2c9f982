"""Layer benchmark: one Qwen3.5 GDN layer (the e2e model's dims), forward+backward on one packed row of 32768 tokens.

patched: deltapack's packed_gdn_forward with the batch's boundaries (exact per document).
unpatched: the transformers layer on the same row as one sequence (what HF does without packing support: it leaks).
Also: the layer's two kernels alone (conv, gated delta rule) each way, and the host syncs of the patched layer.

Usage: python benchmarks/bench_layer.py [--out layer.json]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from common import cuda_time_ms, document_lengths, environment, load_spec, write
from transformers import AutoConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

from deltapack import Boundaries, ops
from deltapack.diagnostics import count_host_syncs
from deltapack.models.gated_deltanet import packed_gdn_forward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()

    spec = load_spec()
    config = AutoConfig.for_model("qwen3_5_text", **spec["model"]["config"])
    torch.manual_seed(0)
    layer = Qwen3_5GatedDeltaNet(config, layer_idx=0).to("cuda", torch.bfloat16)
    lengths = document_lengths(32768)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.randn(1, total, config.hidden_size, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn_like(x)

    def fresh_bounds() -> Boundaries:
        return Boundaries.from_cu_seqlens(cu, (1, total)).to("cuda")

    bounds = fresh_bounds()

    def patched():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        packed_gdn_forward(layer, x, bounds).backward(dy)

    def unpatched():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(dy)

    result = {"env": environment(), "tokens": total, "documents": len(lengths)}
    clock = time.perf_counter()
    for name, fn in (("unpatched", unpatched), ("patched", patched)):  # first calls: compile and autotune
        fn()
        torch.cuda.synchronize()
        print(f"{name}: first forward+backward done at {time.perf_counter() - clock:.1f} s", flush=True)
    # interleave the two so drift on the card hits both alike
    t_un = cuda_time_ms(unpatched, warmup=1, reps=args.reps)
    t_pa = cuda_time_ms(patched, warmup=1, reps=args.reps)
    print(f"timed once at {time.perf_counter() - clock:.1f} s: {t_un}, {t_pa}", flush=True)
    t_un2 = cuda_time_ms(unpatched, warmup=1, reps=args.reps)
    t_pa2 = cuda_time_ms(patched, warmup=1, reps=args.reps)
    un = min(t_un["median_ms"], t_un2["median_ms"])
    pa = min(t_pa["median_ms"], t_pa2["median_ms"])
    result["layer"] = {
        "patched_ms": pa,
        "unpatched_ms": un,
        "ratio": pa / un,
        "runs": {"unpatched": [t_un, t_un2], "patched": [t_pa, t_pa2]},
    }
    prebuilt = fresh_bounds()  # built as a collator would, before the model runs
    result["layer"]["host_syncs"] = count_host_syncs(lambda: packed_gdn_forward(layer, x, prebuilt).backward(dy))

    # the two kernels alone, each way, on the layer's real conv input size
    mixed = torch.randn(1, total, layer.conv_dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dmixed = torch.randn_like(mixed)
    weight = layer.conv1d.weight.squeeze(1)

    def conv_fla():
        ops.causal_conv1d(mixed, weight, None, "silu", segments=bounds.segments, backend="fla").backward(dmixed)

    def conv_torch():  # what the transformers layer runs without the causal-conv1d package
        y = F.conv1d(
            mixed.transpose(1, 2), layer.conv1d.weight, None, padding=weight.shape[1] - 1, groups=layer.conv_dim
        )[..., :total]
        F.silu(y).transpose(1, 2).backward(dmixed)

    hk, hv, dk = layer.num_k_heads, layer.num_v_heads, layer.head_k_dim
    q, k = (torch.randn(1, total, hk, dk, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    v = torch.randn(1, total, hv, dk, device="cuda", dtype=torch.bfloat16).requires_grad_()
    g = (-F.softplus(torch.randn(1, total, hv, device="cuda"))).requires_grad_()
    beta = torch.rand(1, total, hv, device="cuda", dtype=torch.bfloat16).requires_grad_()
    do = torch.randn_like(v)
    one = Boundaries.from_cu_seqlens([0, total], (1, total)).to("cuda")

    def gdn(b):
        def run():
            o, _ = ops.gated_delta_rule(q, k, v, g, beta, segments=b.segments, backend="fla")
            o.backward(do)

        return run

    # the fast path against the exact reference at the model's dims, on the documents of the first 4096 tokens
    n_docs = sum(1 for c in bounds.cu_seqlens_host[1:] if c <= 4096)
    n = bounds.cu_seqlens_host[n_docs]
    xs = x[:, :n].detach().requires_grad_()
    small = Boundaries.from_cu_seqlens(bounds.cu_seqlens_host[: n_docs + 1], (1, n)).to("cuda")
    fast = packed_gdn_forward(layer, xs, small)
    (dx_fast,) = torch.autograd.grad(fast, xs, dy[:, :n])
    os.environ["DELTAPACK_BACKEND"] = "reference"
    try:
        ref = packed_gdn_forward(layer, xs, small)
        (dx_ref,) = torch.autograd.grad(ref, xs, dy[:, :n])
    finally:
        del os.environ["DELTAPACK_BACKEND"]
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    result["layer"]["rel_err_vs_reference"] = {"tokens": n, "output": rel(fast, ref), "dx": rel(dx_fast, dx_ref)}

    write(args.out, result)
    print(f"layer done at {time.perf_counter() - clock:.1f} s", flush=True)
    result["kernels"] = {
        "conv_fla_varlen_ms": cuda_time_ms(conv_fla, reps=args.reps)["median_ms"],
        "conv_torch_one_sequence_ms": cuda_time_ms(conv_torch, reps=args.reps)["median_ms"],
        "gdn_fla_varlen_ms": cuda_time_ms(gdn(bounds), reps=args.reps)["median_ms"],
        "gdn_fla_one_sequence_ms": cuda_time_ms(gdn(one), reps=args.reps)["median_ms"],
    }
    write(args.out, result)


if __name__ == "__main__":
    main()
