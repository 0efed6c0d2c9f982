"""The GDN core on one packed stream: FLA's Triton kernels vs FLA's FlashQLA backend, forward+backward, bf16.

The e2e spec's 32768 tokens (40 documents, ``cu_seqlens``), the model's GDN dims (16 key heads, 32 value heads,
K = V = 128), through ``deltapack.ops.gated_delta_rule(..., backend="fla")``, which calls FLA's dispatched
``chunk_gated_delta_rule``: FLA picks FlashQLA when the ``flash_qla`` package is installed and ``FLA_FLASH_QLA`` is
not "0" (FLA reads it at every call), else its Triton kernels. Each backend in turn:

- ``first_call_s``: the first forward+backward (JIT compile: FlashQLA's TileLang build took 92 s on an H200);
- ``ms``: median forward+backward time (CUDA events);
- ``ran``: the backend FLA's dispatcher logged for the call, else its default Triton kernels (FlashQLA's verifier
  may refuse an input: ``dispatch_log`` then holds its reason);
- ``vs_reference``: relative L2 errors of the output and of the q, k, v, g, beta gradients against deltapack's exact
  reference in fp32 on the documents of the first ``--check-tokens`` tokens (the bf16 error the kernel adds).

``gdn_core.flashqla_vs_triton`` = Triton ms / FlashQLA ms (above 1: FlashQLA is faster). FlashQLA missing from
this installation is recorded as "not installed", not an error. The JSON is written after each backend.

Usage: python benchmarks/bench_gdn_core.py [--out gdn_core.json] [--dry]
``--dry``: 2048 tokens on the CPU, the reference only (checks the script).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    FlaDispatchLog,
    cuda_time_ms,
    document_lengths,
    environment,
    load_spec,
    rel,
    write,
)

from deltapack import Boundaries, ops  # noqa: E402

BACKENDS = {"triton": "0", "flash_qla": "1"}  # FLA_FLASH_QLA for each


def inputs(total: int, hk: int, hv: int, dim: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """q, k [1, T, Hk, K], v [1, T, Hv, V] bf16; g [1, T, Hv] fp32 log-decay; beta [1, T, Hv] bf16; all leaves."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q, k = randn(1, total, hk, dim), randn(1, total, hk, dim)
    v = randn(1, total, hv, dim)
    g = -F.softplus(randn(1, total, hv))
    beta = torch.rand(1, total, hv, generator=gen)
    return [
        t.to(device, dt).requires_grad_() for t, dt in zip((q, k, v, g, beta), (dtype,) * 3 + (torch.float32, dtype))
    ]


def run(tensors: list[torch.Tensor], segments, do: torch.Tensor, backend: str) -> tuple[torch.Tensor, list]:
    for t in tensors:
        t.grad = None
    o, _ = ops.gated_delta_rule(*tensors, segments=segments, backend=backend)
    o.backward(do)
    return o, [t.grad for t in tensors]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--check-tokens", type=int, default=8192)
    parser.add_argument("--dry", action="store_true", help="2048 tokens on the CPU, the reference only")
    args = parser.parse_args()

    cfg = load_spec()["model"]["config"]
    hk, hv, dim = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"], cfg["linear_key_head_dim"]
    device = "cpu" if args.dry else "cuda"
    if args.dry:
        hk, hv, dim, args.check_tokens = 2, 4, 32, 1024
        lengths = [n // 16 or 1 for n in document_lengths(32768)]
    else:
        lengths = document_lengths(32768)
    total = sum(lengths)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    bounds = Boundaries.from_cu_seqlens(cu, (1, total)).to(device)
    tensors = inputs(total, hk, hv, dim, device)
    do = torch.randn(tensors[2].shape, generator=torch.Generator().manual_seed(1)).to(device, tensors[2].dtype)
    result: dict = {
        "env": environment() if device == "cuda" else {"device": "cpu (dry run)", "torch": torch.__version__},
        "tokens": total,
        "documents": len(lengths),
        "heads": {"key": hk, "value": hv, "dim": dim},
        "flash_qla_installed": importlib.util.find_spec("flash_qla") is not None,
        "backends": {},
    }

    # the exact reference in fp32 on the documents of the first check_tokens tokens, computed once when first needed
    n_docs = max(1, sum(1 for c in cu[1:] if c <= args.check_tokens))
    n = cu[n_docs]
    small = Boundaries.from_cu_seqlens(cu[: n_docs + 1], (1, n)).to(device)
    result["check"] = {"tokens": n, "documents": n_docs}
    reference: list = []

    def vs_reference(backend: str) -> dict:
        if not reference:
            part = [t[:, :n].detach().float().requires_grad_() for t in tensors]
            reference.extend(run(part, small.segments, do[:, :n].float(), "reference"))
        ref_o, ref_grads = reference
        o, grads = run(
            [t[:, :n].detach().clone().requires_grad_() for t in tensors], small.segments, do[:, :n], backend
        )
        return {
            "output": rel(o, ref_o),
            **{f"d{k}": rel(g, r) for k, g, r in zip(("q", "k", "v", "g", "beta"), grads, ref_grads)},
        }

    fla_ok = device == "cuda" and importlib.util.find_spec("fla") is not None
    handler = FlaDispatchLog("gated_delta_rule")
    fla_logger = logging.getLogger("fla")
    fla_logger.addHandler(handler)
    fla_logger.setLevel(logging.INFO)
    previous = os.environ.get("FLA_FLASH_QLA")
    for name, flag in BACKENDS.items():
        if name == "flash_qla" and not result["flash_qla_installed"]:
            result["backends"][name] = {"status": "not installed (the flash_qla package is not importable)"}
            continue
        if not fla_ok:
            result["backends"][name] = {"status": "not run: FLA needs CUDA and the fla package"}
            continue
        os.environ["FLA_FLASH_QLA"] = flag
        handler.lines.clear()
        record: dict = {"FLA_FLASH_QLA": flag}
        try:
            start = time.perf_counter()
            run(tensors, bounds.segments, do, "fla")
            torch.cuda.synchronize()
            record["first_call_s"] = time.perf_counter() - start
            chosen = [line.split("->")[-1].strip() for line in handler.lines if "rejected" not in line]
            record["ran"] = chosen[0] if chosen else "triton (FLA's default kernels: no backend taken)"
            record["dispatch_log"] = handler.lines[:6]
            record["ms"] = cuda_time_ms(lambda: run(tensors, bounds.segments, do, "fla"), warmup=2, reps=args.reps)
            record["status"] = "ran"
        except Exception as err:  # noqa: BLE001 - recorded; the other backend still runs
            record["status"] = "failed"
            record["error"] = repr(err)[:2000]
        result["backends"][name] = record
        write(args.out, result)
        if record["status"] == "ran":
            try:
                record["vs_reference"] = vs_reference("fla")
            except Exception as err:  # noqa: BLE001 - recorded
                record["vs_reference"] = {"error": repr(err)[:2000]}
            write(args.out, result)
    if previous is None:
        os.environ.pop("FLA_FLASH_QLA", None)
    else:
        os.environ["FLA_FLASH_QLA"] = previous
    fla_logger.removeHandler(handler)
    if not fla_ok:  # the dry run: the reference in the dtype of the inputs against the fp32 one, so the path runs
        result["dry_reference_vs_reference"] = vs_reference("reference")
    times = {k: v["ms"]["median_ms"] for k, v in result["backends"].items() if "ms" in v}
    if len(times) == 2:
        result["gdn_core"] = {
            "flashqla_vs_triton": times["triton"] / times["flash_qla"],
            **{f"{k}_ms": v for k, v in times.items()},
        }
    write(args.out, result)


if __name__ == "__main__":
    main()
