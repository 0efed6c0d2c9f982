"""Where does a packed document stop being bit-identical to the same document alone? (GPU, bf16)

Runs the end-to-end model of e2e-spec.json on the packed batch (indexed mask, the patched path) and every document
alone through the same patched path (``cu_seq_lens_q=[0, n]``), with forward hooks on every leaf module of the
decoder layers. For each document that is not bit-identical it prints the first module (in execution order) whose
output differs, and whether that module's input was still identical: a matrix product whose input is identical but
whose output differs is computing the same rows differently because the number of rows changed.

Usage: python benchmarks/diag_exact.py [--out diag.json]
"""

from __future__ import annotations

import argparse

import torch
from bench_e2e import ROW, to_cuda
from common import deltapack_batch, document_lengths, documents, e2e_model, environment, load_spec, rows_of, write

import deltapack
from deltapack import Boundaries


def leaf_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.model.layers.named_modules() if n and not list(m.children())]


def by_token(t: torch.Tensor, tokens: int) -> torch.Tensor:
    """[tokens, -1] view of a token-major tensor ([1, T, ...] or [T * heads, dim])."""
    return t.reshape(tokens, -1)


def capture(model: torch.nn.Module, run) -> tuple[object, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Run ``run()`` with hooks; returns its result and {module name: (first input, output)} in call order."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name, module in leaf_modules(model):

        def hook(mod, args, out, name=name):
            if name not in seen and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                seen[name] = (args[0].detach(), out.detach())

        hooks.append(module.register_forward_hook(hook))
    try:
        result = run()
    finally:
        for h in hooks:
            h.remove()
    return result, seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    spec = load_spec()
    model = e2e_model(spec).eval()
    config = model.config
    docs = documents(document_lengths(spec["tokens"]["total"]), config.vocab_size)
    rows = rows_of(docs, ROW)
    deltapack.patch(model)
    batch, doc_ids, places = deltapack_batch(rows, ROW)
    batch = to_cuda(batch)
    bounds = Boundaries.from_document_ids(doc_ids).to("cuda")
    starts = list(bounds.cu_seqlens_host)
    report = []
    with torch.no_grad():
        packed_logits, packed = capture(model, lambda: model(input_ids=batch["input_ids"], boundaries=bounds).logits)
        for index, (r, c, n) in enumerate(places):
            ids = batch["input_ids"][r : r + 1, c : c + n]
            cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
            logits, alone = capture(model, lambda ids=ids, cu=cu: model(input_ids=ids, cu_seq_lens_q=cu).logits[0])
            diff = (packed_logits[r, c : c + n] - logits).abs().max().item()
            entry = {"document": index, "length": n, "max_abs_logit_diff": diff}
            if diff:
                a, b = starts[index], starts[index + 1]
                for name in alone:  # call order of the alone run
                    x_p, y_p = (by_token(t, starts[-1]) for t in packed[name])
                    x_a, y_a = (by_token(t, n) for t in alone[name])
                    if not torch.equal(y_p[a:b], y_a):
                        entry["first_module"] = name
                        entry["module_type"] = type(model.model.layers.get_submodule(name)).__name__
                        entry["input_identical"] = bool(torch.equal(x_p[a:b], x_a))
                        entry["output_max_abs_diff"] = (y_p[a:b].float() - y_a.float()).abs().max().item()
                        break
            report.append(entry)
            print(entry, flush=True)

        # the same matrix product on all 32768 rows vs on each document's rows alone
        weight = model.model.layers[0].linear_attn.in_proj_qkv.weight
        x = by_token(packed["0.input_layernorm"][1], starts[-1])
        gemm = []
        for flag in (True, False):
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag
            full = torch.nn.functional.linear(x, weight)
            differing = sum(
                not torch.equal(full[a:b], torch.nn.functional.linear(x[a:b], weight))
                for a, b in zip(starts[:-1], starts[1:])
            )
            gemm.append({"allow_bf16_reduced_precision_reduction": flag, "documents_differing": differing})
            print(gemm[-1], flush=True)
    result = {"env": environment(), "documents": report, "gemm_rows_check": gemm}
    write(args.out, result)
    bad = [e for e in report if e["max_abs_logit_diff"]]
    print(f"{len(report) - len(bad)} of {len(report)} documents bit-exact; first differing modules:")
    for e in bad:
        print(
            f"  doc {e['document']} (len {e['length']}): {e.get('first_module')} {e.get('module_type')} "
            f"input identical={e.get('input_identical')} out diff={e.get('output_max_abs_diff')}"
        )


if __name__ == "__main__":
    main()
