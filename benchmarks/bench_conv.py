"""The varlen depthwise causal conv of the GDN layer against its memory floor: FLA's Triton kernels vs FLA's Gluon
kernels (``FLA_CONV_GLUON=1``, if this Triton has Gluon) vs deltapack's own Triton kernels
(:mod:`deltapack.ops.conv_triton`), forward and forward+backward, bf16.

The e2e spec's 32768 tokens (40 documents) and the model's conv (channels 2 * 16 * 128 + 32 * 128 = 8192, width 4,
no bias, SiLU), through ``deltapack.ops.causal_conv1d(..., backend="fla")`` (entries "triton" and "gluon") and
``backend="triton"`` (entry "deltapack_triton"). For each entry:

- ``forward_ms`` / ``forward_backward_ms``: medians (CUDA events); ``backward_ms`` their difference;
- ``kernel_failure`` (deltapack_triton): why its kernels failed and the reference ran instead, else None;
- ``dispatch_log``: what FLA's dispatcher logged (the Gluon backend's verifier may refuse an input; then FLA's
  Triton kernels ran);
- ``vs_reference``: relative L2 errors of y and of the x and weight gradients against deltapack's exact reference
  (fp32 on the same bf16 inputs);
- ``floor_ms``: the bytes the pass must move (forward: x read, y written; backward: dy and x read, dx written; the
  weight's few KB ignored) over this card's measured copy bandwidth (a 4 GiB device-to-device copy, bytes read +
  written); ``vs_floor`` = measured / floor.

Usage: python benchmarks/bench_conv.py [--out conv.json] [--dry]   (``--dry``: 2048 tokens on the CPU, reference only)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

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

# entry: (deltapack backend, FLA_CONV_GLUON)
BACKENDS = {"triton": ("fla", "0"), "gluon": ("fla", "1"), "deltapack_triton": ("triton", "0")}


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + written)."""
    src = torch.empty(1 << 31, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, reps=10)["median_ms"]
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--dry", action="store_true", help="2048 tokens on the CPU, the reference only")
    args = parser.parse_args()

    cfg = load_spec()["model"]["config"]
    channels = 2 * cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"]
    channels += cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"]
    width = cfg.get("linear_conv_kernel_dim", 4)
    device = "cpu" if args.dry else "cuda"
    lengths = [n // 16 or 1 for n in document_lengths(32768)] if args.dry else document_lengths(32768)
    if args.dry:
        channels = 64
    total = sum(lengths)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    segments = Boundaries.from_cu_seqlens(cu, (1, total)).to(device).segments
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float32 if args.dry else torch.bfloat16
    x = torch.randn(1, total, channels, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(channels, width, generator=gen) / width**0.5).to(device, dtype).requires_grad_()
    dy = torch.randn(1, total, channels, generator=gen).to(device, dtype)

    def run(backend: str):
        x.grad = weight.grad = None
        y = ops.causal_conv1d(x, weight, None, "silu", segments=segments, backend=backend)
        y.backward(dy)
        return y, x.grad, weight.grad

    torch.backends.cudnn.allow_tf32 = False  # the fp32 reference in fp32, not TF32 (cuDNN's default)
    x32, w32 = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    y_ref = ops.causal_conv1d(x32, w32, None, "silu", segments=segments, backend="reference")
    y_ref.backward(dy.float())
    ref = (y_ref, x32.grad, w32.grad)
    result: dict = {
        "env": environment() if device == "cuda" else {"device": "cpu (dry run)", "torch": torch.__version__},
        "tokens": total,
        "documents": len(lengths),
        "channels": channels,
        "width": width,
        "backends": {},
    }
    if args.dry:
        got = run("reference")
        result["backends"]["reference"] = {"vs_reference": dict(zip(("y", "dx", "dweight"), map(rel, got, ref)))}
        write(args.out, result)
        return
    dispatch = FlaDispatchLog("conv")
    logging.getLogger("fla").addHandler(dispatch)
    logging.getLogger("fla").setLevel(logging.INFO)
    bandwidth = copy_bandwidth()
    stream = total * channels * x.element_size()
    floors = {k: n * stream / bandwidth * 1e3 for k, n in (("forward", 2), ("backward", 3), ("forward_backward", 5))}
    result["copy_bandwidth_TBps"] = bandwidth / 1e12
    result["floor_ms"] = floors
    for name, (backend, flag) in BACKENDS.items():
        os.environ["FLA_CONV_GLUON"] = flag  # FLA reads it at every call
        entry: dict = {"backend": backend}
        try:
            got = run(backend)
            entry["vs_reference"] = dict(zip(("y", "dx", "dweight"), map(rel, got, ref)))
            with torch.no_grad():
                entry["forward_ms"] = cuda_time_ms(
                    lambda b=backend: ops.causal_conv1d(x, weight, None, "silu", segments=segments, backend=b)
                )["median_ms"]
            entry["forward_backward_ms"] = cuda_time_ms(lambda b=backend: run(b))["median_ms"]
            entry["backward_ms"] = entry["forward_backward_ms"] - entry["forward_ms"]
            entry["vs_floor"] = {k: entry[f"{k}_ms"] / floors[k] for k in floors}
            if backend == "triton":  # a kernel that failed at run time is logged and the reference runs instead
                from deltapack.ops import conv_triton

                entry["kernel_failure"] = conv_triton.FAILURE.reason or None
        except Exception as err:  # noqa: BLE001 - recorded; the other backend still runs
            entry["error"] = repr(err)[:500]
        entry["dispatch_log"] = list(dispatch.lines)
        dispatch.lines.clear()
        result["backends"][name] = entry
        write(args.out, result)
    os.environ["FLA_CONV_GLUON"] = "0"


if __name__ == "__main__":
    main()
