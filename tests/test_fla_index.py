"""The per-batch chunk index handed to FLA kernels that build their own (deltapack.ops.fla_index), on the CPU with a
stand-in for FLA's kernel module: the batch's host offsets get deltapack's index, anything else FLA's function."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from deltapack.ops import Segments
from deltapack.ops.fla_index import host_offsets, install

LENGTHS = [1, 64, 65, 130, 3]


def expected(lengths: list[int], chunk: int) -> list[list[int]]:
    """(document, chunk inside it) for every chunk, as FLA's prepare_chunk_indices lists them."""
    return [[d, c] for d, n in enumerate(lengths) for c in range(-(-n // chunk))]


def fake_fla_module():
    calls = []

    def prepare_chunk_indices(cu_seqlens, chunk_size, cu_seqlens_cpu=None):
        calls.append((cu_seqlens, chunk_size, cu_seqlens_cpu))
        return "fla's own"

    return SimpleNamespace(prepare_chunk_indices=prepare_chunk_indices), calls


def test_the_batch_offsets_get_the_device_index_and_other_calls_reach_fla():
    module, calls = fake_fla_module()
    install(module)
    install(module)  # idempotent: wrapped once
    assert module.prepare_chunk_indices.deltapack_original.__name__ == "prepare_chunk_indices"
    segments = Segments.from_cu_seqlens([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    cpu = segments.plan(host_offsets)
    assert cpu is segments.plan(host_offsets)  # one tensor per batch: every layer hands FLA the same one
    assert cpu.dtype == torch.long and cpu.tolist() == list(segments.cu_seqlens_host)
    for chunk in (64, 32):
        # both call styles FLA 0.6 uses (chunk_simple_gla positional, chunk_kda keywords)
        got = module.prepare_chunk_indices(segments.cu_seqlens, chunk, cu_seqlens_cpu=cpu)
        again = module.prepare_chunk_indices(cu_seqlens=segments.cu_seqlens, chunk_size=chunk, cu_seqlens_cpu=cpu)
        assert got is again  # built once per chunk length
        assert got.dtype == segments.cu_seqlens.dtype and got.tolist() == expected(LENGTHS, chunk)
    assert calls == []
    # other offsets, or the right host offsets with another device tensor: FLA's function, unchanged
    other = torch.tensor(segments.cu_seqlens_host, dtype=torch.long)
    assert module.prepare_chunk_indices(segments.cu_seqlens, 64, cu_seqlens_cpu=other) == "fla's own"
    assert module.prepare_chunk_indices(segments.cu_seqlens.clone(), 64, cu_seqlens_cpu=cpu) == "fla's own"
    assert module.prepare_chunk_indices(segments.cu_seqlens, 64) == "fla's own"
    assert len(calls) == 3
