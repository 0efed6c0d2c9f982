"""Full attention on a packed row (32768 tokens, 16 query / 4 KV heads, causal, bf16, forward+backward).

varlen with KV heads expanded vs passed as they are (where the kernel takes grouped heads), against SDPA with the
block-diagonal mask that transformers' sdpa path builds for packed rows.

Usage: python benchmarks/bench_attention.py [--out attention.json]
"""

from __future__ import annotations

import argparse
import inspect

import torch
import torch.nn.functional as F
from common import cuda_time_ms, document_lengths, environment, write
from torch.nn.attention.varlen import varlen_attn

from deltapack.ops import Segments
from deltapack.ops.attention import _expand_kv, varlen_attention_ref


def bench_dim(dim: int, lengths: list[int], cu: torch.Tensor, params: set[str], causal: dict) -> dict:
    total, longest = sum(lengths), max(lengths)
    q = torch.randn(total, 16, dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(total, 4, dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
    v = torch.randn(total, 4, dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
    do = torch.randn_like(q)
    gqa = {"enable_gqa": True} if "enable_gqa" in params else {}

    def expanded():
        ke, ve = _expand_kv(k, v, 16)
        varlen_attn(q, ke, ve, cu, cu, longest, longest, **causal).backward(do)

    def grouped():
        varlen_attn(q, k, v, cu, cu, longest, longest, **causal, **gqa).backward(do)

    def masked():
        doc = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), cu.diff(), output_size=total)
        pos = torch.arange(total, device="cuda")
        mask = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
        ke, ve = _expand_kv(k, v, 16)
        F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], ke.transpose(0, 1)[None], ve.transpose(0, 1)[None], attn_mask=mask[None, None]
        ).backward(do.transpose(0, 1)[None])

    row: dict = {"varlen_expanded_kv_ms": cuda_time_ms(expanded, reps=10)["median_ms"]}
    try:  # does this torch's varlen kernel take grouped KV heads as they are, and compute the same?
        with torch.no_grad():
            got = varlen_attn(q, k, v, cu, cu, longest, longest, **causal, **gqa)
            ke, ve = _expand_kv(k, v, 16)
            want = varlen_attn(q, ke, ve, cu, cu, longest, longest, **causal)
        row["grouped_equals_expanded"] = bool(torch.equal(got, want))
        row["varlen_grouped_kv_ms"] = cuda_time_ms(grouped, reps=10)["median_ms"]
    except Exception as err:  # noqa: BLE001 - record why grouped heads are not taken
        row["grouped_error"] = repr(err)[:300]
    if dim == 256:
        row["sdpa_block_mask_ms"] = cuda_time_ms(masked, warmup=1, reps=3)["median_ms"]
    # accuracy of the fast path against the fp32 reference on the documents of the first 4096 tokens
    sub_cu = cu[cu <= 4096]
    n = int(sub_cu[-1])
    sub = [t[:n].detach() for t in (q, k, v)]
    ref = varlen_attention_ref(*(t.float() for t in sub), segments=Segments.from_cu_seqlens(sub_cu))
    ke, ve = _expand_kv(sub[1], sub[2], 16)
    with torch.no_grad():
        fast = varlen_attn(sub[0], ke, ve, sub_cu, sub_cu, longest, longest, **causal)
    row["rel_err_vs_fp32_reference"] = float((fast.double() - ref.double()).norm() / ref.double().norm())
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    lengths = document_lengths(32768)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    params = set(inspect.signature(varlen_attn).parameters)
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    result = {"env": environment(), "varlen_attn_params": sorted(params), "tokens": total}
    for dim in (128, 256):
        result[f"head_dim_{dim}"] = bench_dim(dim, lengths, cu, params, causal)
        torch.cuda.empty_cache()
    write(args.out, result)


if __name__ == "__main__":
    main()
