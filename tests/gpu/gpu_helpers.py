"""Helpers of the GPU tests (marked ``gpu``, skipped cleanly where CUDA or FLA is missing)."""

from __future__ import annotations

import pytest
import torch

from deltapack.ops import Segments

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out holds a NaN or an inf."""
    out, ref = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def random_lengths(total: int, gen: torch.Generator, short: bool = False) -> list[int]:
    """Document lengths summing to ``total``: awkward ones first (1, 3, 63, 64, 65), then random."""
    lengths = [n for n in (1, 3, 63, 64, 65) if n <= total][: max(1, total // 200)]
    rest = total - sum(lengths)
    while rest > 0:
        hi = 40 if short else 700
        n = min(rest, int(torch.randint(1, hi, (1,), generator=gen)))
        lengths.append(n)
        rest -= n
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    return [lengths[i] for i in perm]


def cu_of(lengths: list[int], device: str = "cuda") -> tuple[torch.Tensor, tuple[int, ...]]:
    host = [0]
    for n in lengths:
        host.append(host[-1] + n)
    return torch.tensor(host, dtype=torch.int32, device=device), tuple(host)


def segments_of(lengths: list[int], device: str = "cuda") -> Segments:
    return Segments.from_cu_seqlens(cu_of(lengths, "cpu")[1], device)


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


# tolerance of a fast path against the fp32 reference, by input dtype (relative L2 error)
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-3}


ROWS = [[70, 5, 1, 130], [64, 33]]  # document lengths per row: one token, a chunk exactly, over a chunk


LEAK = 1e-3


def make_batch(vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    width = max(sum(r) for r in ROWS) + 3  # some padding on the right of every row
    ids = torch.zeros(len(ROWS), width, dtype=torch.long)
    doc_ids = torch.zeros_like(ids)
    places = []
    for r, row in enumerate(ROWS):
        col = 0
        for n, length in enumerate(row):
            ids[r, col : col + length] = torch.randint(1, vocab, (length,), generator=gen)
            doc_ids[r, col : col + length] = n + 1
            places.append((r, col, length))
            col += length
    return ids.cuda(), doc_ids.cuda(), places


def alone(model, ids: torch.Tensor) -> torch.Tensor:
    """One document through the same patched path and kernels (explicit offsets [0, L])."""
    cu = torch.tensor([0, ids.numel()], dtype=torch.int32, device="cuda")
    return model(input_ids=ids[None], cu_seq_lens_q=cu).logits[0]


def per_doc_diff(logits, places, alone_logits, dtype) -> float:
    if dtype == torch.float32:
        return max((logits[r, c : c + n] - a).abs().max().item() for (r, c, n), a in zip(places, alone_logits))
    return max(rel_err(logits[r, c : c + n], a) for (r, c, n), a in zip(places, alone_logits))
