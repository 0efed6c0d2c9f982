"""Which FLA kernels run forward and backward correctly on this GPU, with ``cu_seqlens``.

FLA refuses some gated backward kernels on Hopper with Triton < 3.7.1 (``chunk_bwd_dqkwg``), and a kernel that runs
may still be wrong. For each candidate kernel of deltapack's recurrent families this runs, on a small packed stream
(documents of 1 to 300 tokens), the forward and backward with ``cu_seqlens`` and compares outputs and input
gradients with FLA's own naive recurrence run on each document alone in fp32; then times fwd+bwd on a 32768-token
stream. Results go to ``--out`` (JSON): ok / error text, max |diff| relative to the largest reference value, time.

    python benchmarks/probe_fla_kernels.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable

import torch


def _cu(lengths: list[int], device: str) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _lengths(total: int, gen: torch.Generator, longest: int) -> list[int]:
    out, left = [], total
    while left > 0:
        n = min(left, int(torch.randint(1, longest + 1, (1,), generator=gen)))
        out.append(n)
        left -= n
    return out


def _per_doc(naive: Callable[..., torch.Tensor], tensors: list[torch.Tensor], cu: list[int], **kw) -> torch.Tensor:
    outs = []
    for a, b in zip(cu[:-1], cu[1:]):
        o = naive(*[t[:, a:b].float() for t in tensors], **kw)
        outs.append(o[0] if isinstance(o, tuple) else o)
    return torch.cat(outs, 1)


def _inputs(kind: str, total: int, heads: int, dim: int, dtype: torch.dtype, gen: torch.Generator) -> list:
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).cuda().to(dtype).requires_grad_()

    def gate(*shape):  # log-decays in [-0.1, 0): long memory
        return (-torch.rand(*shape, generator=gen) * 0.1).cuda().float().requires_grad_()

    q, k, v = (
        rnd(1, total, heads, dim, scale=dim**-0.5),
        rnd(1, total, heads, dim, scale=dim**-0.5),
        rnd(1, total, heads, dim),
    )
    if kind == "simple_gla":
        return [q, k, v, gate(1, total, heads)]
    if kind in ("gla", "kda"):
        g = gate(1, total, heads, dim)
        if kind == "gla":
            return [q, k, v, g]
        beta = torch.rand(1, total, heads, generator=gen).cuda().to(dtype).requires_grad_()
        kn = torch.nn.functional.normalize(k.detach().float(), dim=-1).to(dtype).requires_grad_()
        return [q, kn, v, g, beta]
    if kind == "hgrn":
        x = rnd(1, total, heads * dim)
        return [x, gate(1, total, heads * dim)]
    if kind == "lightning":
        return [q, k, v]
    raise ValueError(kind)


def _cases() -> dict[str, tuple[Callable, Callable, dict]]:
    from fla.ops.gla import chunk_gla
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.hgrn import fused_recurrent_hgrn
    from fla.ops.hgrn.naive import naive_recurrent_hgrn
    from fla.ops.kda import chunk_kda
    from fla.ops.kda.naive import naive_recurrent_kda
    from fla.ops.simple_gla import chunk_simple_gla
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    def lightning_fast(q, k, v, cu_seqlens):
        gamma = -torch.linspace(0.01, 0.1, q.shape[2], device=q.device)
        return chunk_simple_gla(q, k, v, g_gamma=gamma, scale=1.0, cu_seqlens=cu_seqlens)[0]

    def lightning_naive(q, k, v):
        gamma = -torch.linspace(0.01, 0.1, q.shape[2], device=q.device)
        g = gamma.expand(q.shape[0], q.shape[1], -1)
        return naive_recurrent_simple_gla(q, k, v, g, scale=1.0)[0]

    return {
        "chunk_simple_gla": (
            lambda q, k, v, g, cu_seqlens: chunk_simple_gla(q, k, v, g=g, scale=1.0, cu_seqlens=cu_seqlens)[0],
            lambda q, k, v, g: naive_recurrent_simple_gla(q, k, v, g, scale=1.0)[0],
            {"kind": "simple_gla"},
        ),
        "chunk_simple_gla_fp32": (
            lambda q, k, v, g, cu_seqlens: chunk_simple_gla(q, k, v, g=g, scale=1.0, cu_seqlens=cu_seqlens)[0],
            lambda q, k, v, g: naive_recurrent_simple_gla(q, k, v, g, scale=1.0)[0],
            {"kind": "simple_gla", "dtype": torch.float32},
        ),
        "chunk_simple_gla_g_gamma": (lightning_fast, lightning_naive, {"kind": "lightning"}),
        "chunk_gla": (
            lambda q, k, v, g, cu_seqlens: chunk_gla(q, k, v, g, scale=1.0, cu_seqlens=cu_seqlens)[0],
            lambda q, k, v, g: naive_recurrent_gla(q, k, v, g)[0],
            {"kind": "gla"},
        ),
        "chunk_kda": (
            lambda q, k, v, g, beta, cu_seqlens: chunk_kda(q, k, v, g, beta, cu_seqlens=cu_seqlens)[0],
            lambda q, k, v, g, beta: naive_recurrent_kda(q, k, v, g, beta)[0],
            {"kind": "kda"},
        ),
        "fused_recurrent_hgrn": (
            lambda x, g, cu_seqlens: fused_recurrent_hgrn(x, g, cu_seqlens=cu_seqlens)[0],
            lambda x, g: naive_recurrent_hgrn(x, g)[0],
            {"kind": "hgrn"},
        ),
    }


def probe(name: str, fast: Callable, naive: Callable, kind: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    gen = torch.Generator().manual_seed(0)
    row: dict = {"kernel": name, "dtype": str(dtype).removeprefix("torch.")}
    try:
        lengths = [1, 7, 64, 65, 300, 2, 129, 200, 31, 1]
        cu = _cu(lengths, "cuda")
        xs = _inputs(kind, sum(lengths), 4, 64, dtype, gen)
        out = fast(*xs, cu_seqlens=cu)
        dout = torch.randn(out.shape, generator=gen).cuda().to(out.dtype)
        grads = torch.autograd.grad(out, xs, dout)
        ref_xs = [x.detach().float().requires_grad_() for x in xs]
        ref = _per_doc(naive, ref_xs, cu.tolist())
        ref_grads = torch.autograd.grad(ref, ref_xs, dout.float())
        rel = lambda a, b: float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6))  # noqa: E731
        row["out_rel_err"] = rel(out, ref)
        row["grad_rel_err"] = [rel(g, r) for g, r in zip(grads, ref_grads)]
        big = [4096] * 8
        xs = _inputs(kind, sum(big), 16, 128 if kind != "hgrn" else 64, dtype, gen)
        cu = _cu(_lengths(sum(big), gen, 4096), "cuda")
        for _ in range(3):
            out = fast(*xs, cu_seqlens=cu)
            torch.autograd.grad(out, xs, torch.ones_like(out))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            out = fast(*xs, cu_seqlens=cu)
            torch.autograd.grad(out, xs, torch.ones_like(out))
        torch.cuda.synchronize()
        row["fwd_bwd_ms_32k"] = (time.perf_counter() - t0) / 5 * 1e3
        row["ok"] = True
    except Exception as exc:  # a refusal or a crash is the finding
        row["ok"] = False
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        row["where"] = traceback.format_exc().splitlines()[-3:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import triton

    result = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rows": [],
    }
    for name, (fast, naive, opts) in _cases().items():
        row = probe(name, fast, naive, **opts)
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
