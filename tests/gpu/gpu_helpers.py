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


# max |diff| in fp32 (TF32 matmuls in FLA), relative L2 in bf16: a tiny patched model vs each document alone
MODEL_TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


def packed_and_unpatched_diffs(model, dtype) -> tuple[float, float]:
    """A tiny model on CUDA (``dtype``), fed the indexed-mask batch of :func:`make_batch`: the per-document diff
    (:func:`per_doc_diff`) of the patched model, then of the unpatched one, vs each document alone through the
    patched path. Leaves ``model`` patched."""
    import deltapack

    ids, doc_ids, places = make_batch(model.config.vocab_size)
    with torch.no_grad():
        leaky = model(input_ids=ids, attention_mask=doc_ids, use_cache=False).logits
        deltapack.patch(model)
        out = model(input_ids=ids, attention_mask=doc_ids).logits
        alone_logits = [alone(model, ids[r, c : c + n]) for r, c, n in places]
    return per_doc_diff(out, places, alone_logits, dtype), per_doc_diff(leaky, places, alone_logits, dtype)


def assert_packed_equals_alone_on_cuda(model, dtype) -> None:
    """:func:`packed_and_unpatched_diffs`: patched within ``MODEL_TOL``, unpatched leaks (> ``LEAK``)."""
    packed, leaky = packed_and_unpatched_diffs(model, dtype)
    assert packed <= MODEL_TOL[dtype]
    assert leaky > LEAK


def assert_no_host_sync_in_packed_step(model) -> None:
    """:func:`packed_step_host_syncs` of ``model`` (patched, bf16, train mode): no host sync, a finite loss."""
    syncs, loss = packed_step_host_syncs(model)
    assert syncs == 0
    assert torch.isfinite(loss).item()


def packed_step_host_syncs(model) -> tuple[int, torch.Tensor]:
    """A patched bf16 model in train mode: the host syncs of one packed forward+backward with boundaries built
    before the call (after one step that compiles and checks the kernels), and that step's loss."""
    from deltapack import Boundaries
    from deltapack.diagnostics import count_host_syncs

    ids, doc_ids, _ = make_batch(model.config.vocab_size, seed=2)

    def step(bounds):
        out = model(input_ids=ids, labels=ids, boundaries=bounds)
        out.loss.backward()
        return out.loss

    step(Boundaries.from_document_ids(doc_ids.cpu()).to("cuda"))  # compiles the kernels, checks them once
    bounds = Boundaries.from_document_ids(doc_ids.cpu()).to("cuda")
    losses = []
    syncs = count_host_syncs(lambda: losses.append(step(bounds)))
    return syncs, losses[0]
