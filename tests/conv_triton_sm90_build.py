"""Compile deltapack's Triton conv kernels for sm_90 (an H100 / H200) on any machine with Triton's NVIDIA backend,
and print each variant's ptxas registers and spills as JSON (used by tests/test_conv_triton.py; no GPU needed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from deltapack.ops import conv_triton as ct


def build(fn, signature: dict, constexprs: dict, warps: int) -> dict:  # noqa: ANN001
    names = list(signature)
    # what Triton's launcher would specialize for D = 8192 and 16-byte aligned tensors
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if signature[n][0] == "*" or n == "D"}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        cmd = [get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(Path(tmp) / "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return {
        "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
        "spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill", log)),
    }


def main() -> None:
    out = {}
    for dtype, width, bias, silu in [("bf16", 4, False, True), ("bf16", 4, True, True), ("fp32", 4, True, True),
                                     ("fp16", 2, False, False)]:  # fmt: skip
        tensors = {"x": f"*{dtype}", "w": f"*{dtype}", "b": f"*{dtype}"}
        flags = {"W": width, "HAS_BIAS": bias, "SILU": silu}
        fwd = {**tensors, "seq": "*i32", "y": f"*{dtype}", "T": "i32", "D": "i32"}
        fwd.update(dict.fromkeys(("W", "HAS_BIAS", "SILU", "BT", "BD"), "constexpr"))
        bwd = {**tensors, "seq": "*i32", "dy": f"*{dtype}", "dx": f"*{dtype}", "dw_part": "*fp32", "db_part": "*fp32"}
        bwd.update({"T": "i32", "D": "i32"})
        bwd.update(dict.fromkeys(("TILES", "W", "HAS_BIAS", "SILU", "BT", "BD"), "constexpr"))
        key = f"{dtype} W={width} bias={bias} silu={silu}"
        out[f"forward {key}"] = build(ct._conv_fwd, fwd, {**flags, "BT": ct.FWD_BT, "BD": ct.FWD_BD}, ct.FWD_WARPS)
        consts = {**flags, "TILES": ct.MAX_TILES, "BT": ct.BWD_BT, "BD": ct.BWD_BD}
        out[f"backward {key}"] = build(ct._conv_bwd, bwd, consts, ct.BWD_WARPS)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
