"""deltapack's Triton causal conv1d (:mod:`deltapack.ops.conv_triton`) on the CPU, in Triton's interpreter.

``TRITON_INTERPRET=1`` is set before Triton is imported, so the kernels run on CPU fp32 tensors; the backend's
function is called directly (its verifier asks for CUDA). Skipped where Triton is not installed (CI has no Triton:
there these tests skip, and the GPU test ``tests/gpu/test_conv_triton_gpu.py`` covers the compiled kernels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported; a no-op where it was imported already

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
conv_triton = pytest.importorskip("deltapack.ops.conv_triton")

from deltapack import ops  # noqa: E402
from deltapack.ops import Segments  # noqa: E402
from deltapack.ops.conv import verify_causal_conv1d_triton  # noqa: E402
from deltapack.ops.reference import causal_conv1d_ref  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)


def _split(total: int, gen: torch.Generator) -> list[int]:
    """Document offsets over ``total`` tokens: 1-, 2- and 3-token documents first, then random lengths."""
    cu = [0, 1, 3, 6]
    while cu[-1] < total:
        cu.append(min(total, cu[-1] + int(torch.randint(1, 40, (1,), generator=gen))))
    return cu


def _run(fn, x, w, b, activation, segments, dy):  # noqa: ANN001, ANN202
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = fn(leaves[0], leaves[1], leaves[2] if b is not None else None, activation, segments=segments)
    return [y, *torch.autograd.grad(y, leaves, dy)]


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want|, relative to max |want| where that is above 1 (absolute below)."""
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1.0))


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize(("with_bias", "activation"), [(False, None), (True, "silu"), (False, "swish")])
def test_triton_conv_equals_the_reference(width, with_bias, activation):
    gen = torch.Generator().manual_seed(width)
    total, channels = 157, 136  # neither a multiple of a block
    segments = Segments.from_cu_seqlens(_split(total, gen))
    x = torch.randn(1, total, channels, generator=gen)
    w = torch.randn(channels, width, generator=gen)
    b = torch.randn(channels, generator=gen) if with_bias else None
    dy = torch.randn(1, total, channels, generator=gen)
    got = _run(conv_triton.causal_conv1d_triton, x, w, b, activation, segments, dy)
    want = _run(causal_conv1d_ref, x, w, b, activation, segments, dy)
    assert not conv_triton.FAILURE, conv_triton.FAILURE.reason  # the kernels ran, not the fallback
    for name, g, r in zip(("y", "dx", "dweight", "dbias"), got, want):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert _max_err(g, r) <= 1e-5, (name, _max_err(g, r))
    if width == 1:  # one tap reads no other token: there is no cut to ignore
        return
    # the same input as one document: the cut matters, so a conv that ignored it would fail above
    whole = _run(causal_conv1d_ref, x, w, b, activation, Segments.from_cu_seqlens([0, total]), dy)
    assert _max_err(whole[0], want[0]) > 1e-2 and _max_err(whole[1], want[1]) > 1e-2


def test_many_token_tiles_per_backward_program():
    """A stream long enough that a backward program walks several token tiles and several programs sum partials."""
    gen = torch.Generator().manual_seed(7)
    total, channels = 2 * 64 * conv_triton.BWD_BT + 5, 8
    segments = Segments.from_cu_seqlens(_split(total, gen))
    x, w, b = torch.randn(1, total, channels), torch.randn(channels, 4), torch.randn(channels)
    dy = torch.randn(1, total, channels, generator=gen)
    got = _run(conv_triton.causal_conv1d_triton, x, w, b, "silu", segments, dy)
    want = _run(causal_conv1d_ref, x, w, b, "silu", segments, dy)
    assert not conv_triton.FAILURE, conv_triton.FAILURE.reason
    for name, g, r in zip(("y", "dx", "dweight", "dbias"), got, want):
        assert _max_err(g, r) <= 1e-5, (name, _max_err(g, r))


def test_verifier_and_registration():
    x, w = torch.randn(1, 6, 4), torch.randn(4, 3)
    segments = Segments.from_cu_seqlens([0, 2, 6])
    ok, why = verify_causal_conv1d_triton(x, w, segments=segments)
    assert not ok and "CUDA" in why
    assert ops.OPS["causal_conv1d"].names == ("fla", "triton", "reference")  # automatic order unchanged: fla first
    with pytest.raises(RuntimeError, match="backend 'triton' was requested for causal_conv1d .*CUDA"):
        ops.causal_conv1d(x, w, segments=segments, backend="triton")


def test_kernels_compile_for_sm90_without_spills():
    """The compiled (not interpreted) kernels: built for sm_90 by Triton's NVIDIA backend and its ptxas (no GPU
    needed), in a subprocess without TRITON_INTERPRET; the chosen block sizes must not spill registers."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    script = Path(__file__).with_name("conv_triton_sm90_build.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(conv_triton.__file__).parents[2]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("Triton's ptxas is not installed")
    assert done.returncode == 0, done.stderr[-2000:]
    built = json.loads(done.stdout)
    assert len(built) == 8
    for variant, figures in built.items():
        assert figures["spill_bytes"] == 0, (variant, figures)
