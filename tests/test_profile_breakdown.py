"""benchmarks/profile_step.py's breakdown of a profiler trace: categories from kernel names and launching ops, phases,
GPU idle time (a hand-made trace; the GPU run itself is the benchmark's)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
profile_step = pytest.importorskip("profile_step")


def _x(cat: str, name: str, ts: float, dur: float, tid: int = 1, **args) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "args": args}


def _kernel(name: str, launch_ts: float, ts: float, dur: float, corr: int, tid: int = 1) -> list[dict]:
    return [
        _x("cuda_runtime", "cudaLaunchKernel", launch_ts, 1, tid=tid, correlation=corr),
        _x("kernel", name, ts, dur, tid=7, correlation=corr),
    ]


def test_breakdown_by_category_phase_and_idle() -> None:
    events = [
        _x("user_annotation", "profiled_step", 0, 1000),
        _x("user_annotation", "forward", 0, 400),
        _x("cpu_op", "aten::linear", 10, 20),
        _x("cpu_op", "aten::mm", 12, 10),
        *_kernel("nvjet_tst_128x256", 15, 100, 50, corr=1),
        _x("user_annotation", "deltapack::gated_delta_rule", 40, 30),
        *_kernel("chunk_fwd_kernel_o", 45, 150, 40, corr=2),  # a Triton kernel: named only by the range around it
        _x("cpu_op", "aten::cross_entropy_loss", 300, 50),
        _x("cpu_op", "aten::_log_softmax", 305, 10),
        *_kernel("cunn_SoftMaxForward", 306, 400, 10, corr=3),
        _x("user_annotation", "backward", 400, 400),
        _x("cpu_op", "autograd::engine::evaluate_function: ChunkGatedDeltaRuleFunctionBackward", 420, 30, tid=2),
        *_kernel("some_fused_kernel", 425, 500, 100, corr=4, tid=2),  # launched by the autograd thread
        _x("cpu_op", "aten::copy_", 460, 5, tid=2),
        *_kernel("direct_copy_kernel", 461, 600, 20, corr=5, tid=2),
        _x("user_annotation", "optimizer", 800, 200),
        *_kernel("multi_tensor_apply_kernel", 810, 850, 50, corr=6),
        *_kernel("mystery", 2000, 2000, 5, corr=7),  # launched after the step: not counted
    ]
    got = profile_step.analyse({"traceEvents": events})
    cats = got["by_category_ms"]
    assert cats["matmul"] == pytest.approx(0.05)
    assert cats["gdn_core"] == pytest.approx(0.14)  # forward (range) and backward (Function name)
    assert cats["loss"] == pytest.approx(0.01)
    assert cats["copy_cast"] == pytest.approx(0.02)
    assert cats["optimizer"] == pytest.approx(0.05)
    assert cats["other"] == 0
    assert got["kernel_time_ms"] == pytest.approx(0.27)
    assert got["by_phase_ms"]["backward"] == {"gdn_core": pytest.approx(0.1), "copy_cast": pytest.approx(0.02)}
    # kernels busy 100-190, 400-410, 500-620, 850-900 of the step's 0-1000 us
    assert got["gpu_busy_ms"] == pytest.approx(0.27)
    assert got["step_wall_ms"] == pytest.approx(1.0)
    assert got["gpu_idle_ms"] == pytest.approx(0.73)


def test_overlapping_kernels_count_once_in_busy_time() -> None:
    assert profile_step._union_us([(0, 10), (5, 20), (30, 40)]) == 30


@pytest.mark.parametrize(
    "kernel,ops,want",
    [
        ("sm90_xmma_gemm_bf16bf16", [], "matmul"),
        ("pytorch_flash::flash_fwd_kernel", ["deltapack::varlen_attention"], "attention"),
        ("causal_conv1d_fwd_kernel", [], "conv"),
        ("vectorized_elementwise_kernel", ["aten::silu"], "norm_elementwise"),
        ("unrolled_elementwise_kernel", ["aten::_to_copy", "aten::copy_"], "copy_cast"),
        ("whatever", ["Optimizer.step#AdamW.step"], "optimizer"),
        ("whatever", [], "other"),
    ],
)
def test_categories(kernel: str, ops: list[str], want: str) -> None:
    assert profile_step.categorize(kernel, ops, None) == want
