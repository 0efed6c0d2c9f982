"""The op contract every recurrent family builds on: Segments, the op registry and the one backend choice (CPU).

A toy op (a per-document cumulative sum) stands in for a family: one reference, fast backends that are plain PyTorch
here, and a verifier each, so every rule of the choice can be exercised without a GPU.
"""

from __future__ import annotations

import ast
import inspect
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import deltapack
from deltapack import ops
from deltapack.ops import Backend, Op, Segments, fla
from deltapack.ops import dispatch as dispatch_mod


def doc_cumsum_ref(x: torch.Tensor, *, segments: Segments, scale: float = 1.0) -> torch.Tensor:
    """x: [1, T, D] -> [1, T, D]: the running sum inside each document, times ``scale``."""
    out = [x[:, a:b].cumsum(1) for a, b in zip(segments.cu_seqlens_host[:-1], segments.cu_seqlens_host[1:])]
    return torch.cat(out, dim=1) * scale


def _verify_float64(x: torch.Tensor, *, segments: Segments, scale: float = 1.0) -> tuple[bool, str]:
    return (x.dtype == torch.float64, f"x is {x.dtype}; the fast kernel takes float64")


def make_op(calls: list[str], load_error: Exception | None = None) -> Op:
    def fast(x, *, segments, scale=1.0):
        calls.append("fast")
        return doc_cumsum_ref(x, segments=segments, scale=scale)

    def load():
        if load_error is not None:
            raise load_error
        return fast

    op = Op("doc_cumsum", doc_cumsum_ref)
    op.add_backend(Backend("fast", load=load, verify=_verify_float64, package="toykernels", hint="install toykernels"))
    return op


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("DELTAPACK_BACKEND", raising=False)


# ---------------------------------------------------------------------------------------------- Segments
def test_segments_from_offsets():
    seg = Segments.from_cu_seqlens([0, 1, 4, 9])
    assert seg.cu_seqlens.dtype == torch.int32 and seg.cu_seqlens.tolist() == [0, 1, 4, 9]
    assert seg.cu_seqlens_host == (0, 1, 4, 9)
    assert seg.seq_idx.tolist() == [[0, 1, 1, 1, 2, 2, 2, 2, 2]] and seg.seq_idx.dtype == torch.int32
    assert (seg.num_docs, seg.total_tokens, seg.doc_lengths, seg.max_seqlen) == (3, 9, [1, 3, 5], 5)
    assert seg.device == torch.device("cpu")
    with pytest.raises(ValueError, match="start at 0 and increase strictly"):
        Segments.from_cu_seqlens([0, 3, 3])
    with pytest.raises(ValueError, match="start at 0"):
        Segments.from_cu_seqlens(torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        Segments.from_cu_seqlens(torch.tensor([0.0, 3.0]))
    with pytest.raises(AttributeError):
        seg.max_seqlen = 3  # immutable


def test_plans_are_built_once_per_batch():
    seg = Segments.from_cu_seqlens([0, 1, 65, 66, 200])
    built = []

    def build(s: Segments) -> int:
        built.append(s)
        return s.total_tokens * 2

    assert seg.plan(build) == 400 and seg.plan(build) == 400 and built == [seg]
    rows = seg.chunk_indices(64)
    assert seg.chunk_indices(64) is rows
    expected = [(d, c) for d, n in enumerate(seg.doc_lengths) for c in range(-(-n // 64))]
    assert [tuple(r) for r in rows.tolist()] == expected and rows.dtype == torch.int32
    assert len(seg.chunk_indices(128)) == 1 + 1 + 1 + 2  # another chunk length, another plan
    assert seg.to("cpu").plan(build) == 400 and len(built) == 2  # a moved copy starts without plans


def test_boundaries_hold_one_segments_per_batch():
    bounds = deltapack.Boundaries.from_document_ids(torch.tensor([[1, 1, 2, 0], [1, 1, 1, 1]]))
    seg = bounds.segments
    assert seg is bounds.segments
    assert seg.cu_seqlens_host == bounds.cu_seqlens_host == (0, 2, 3, 7)
    assert torch.equal(seg.seq_idx, bounds.seq_idx) and seg.max_seqlen == bounds.max_seqlen == 4
    labels = torch.arange(7)[None]
    assert seg.shift_labels(labels).tolist() == bounds.shift_labels(labels).tolist() == [[1, -100, -100, 4, 5, 6, -100]]


# ---------------------------------------------------------------------------------------------- the choice
def _inputs(dtype=torch.float32):
    seg = Segments.from_cu_seqlens([0, 2, 5])
    return torch.randn(1, 5, 3, dtype=dtype), seg


def test_automatic_choice_takes_the_fastest_backend_that_verifies(caplog):
    calls: list[str] = []
    op = make_op(calls)
    x, seg = _inputs(torch.float64)
    with caplog.at_level(logging.INFO, logger="deltapack"):
        out = op(x, segments=seg, scale=2.0)
        op(x, segments=seg, scale=2.0)
    assert calls == ["fast", "fast"]
    assert torch.equal(out, doc_cumsum_ref(x, segments=seg, scale=2.0))
    assert [r.getMessage() for r in caplog.records] == ["deltapack: doc_cumsum runs on the fast backend"]  # once


def test_refused_inputs_run_the_reference_and_the_log_says_why(caplog):
    calls: list[str] = []
    op = make_op(calls)
    x, seg = _inputs(torch.float32)
    with caplog.at_level(logging.INFO, logger="deltapack"):
        out = op(x, segments=seg)
    assert calls == [] and torch.equal(out, doc_cumsum_ref(x, segments=seg))
    assert [r.getMessage() for r in caplog.records] == [
        "deltapack: doc_cumsum runs on the reference backend (fast: x is torch.float32; the fast kernel takes float64)"
    ]


def test_a_backend_asked_for_by_name_runs_or_raises(monkeypatch):
    calls: list[str] = []
    op = make_op(calls)
    x64, seg = _inputs(torch.float64)
    op(x64, segments=seg, backend="reference")
    assert calls == []  # the argument wins over automatic
    monkeypatch.setenv("DELTAPACK_BACKEND", "reference")
    op(x64, segments=seg)
    assert calls == []  # and so does the environment
    op(x64, segments=seg, backend="fast")
    assert calls == ["fast"]  # the argument wins over the environment
    x32, _ = _inputs(torch.float32)
    with pytest.raises(RuntimeError, match=r"'fast' was requested for doc_cumsum .*float32.*install toykernels"):
        op(x32, segments=seg, backend="fast")
    with pytest.raises(ValueError, match=r"unknown deltapack backend 'triton' for doc_cumsum .*expected one of"):
        op(x32, segments=seg, backend="triton")


def test_the_shared_environment_setting_skips_ops_without_that_backend(monkeypatch, caplog):
    monkeypatch.setenv("DELTAPACK_BACKEND", "fla")
    op = make_op([])
    x, seg = _inputs()
    with caplog.at_level(logging.INFO, logger="deltapack"):
        op(x, segments=seg)
    assert "DELTAPACK_BACKEND=fla names no backend of doc_cumsum" in caplog.text


def test_a_broken_kernel_import_on_a_cuda_machine_warns_with_the_exception(monkeypatch, caplog):
    monkeypatch.setattr(dispatch_mod.torch.cuda, "is_available", lambda: True)
    op = make_op([], load_error=ImportError("libcuda.so: undefined symbol cuFoo"))
    x, seg = _inputs(torch.float64)
    with caplog.at_level(logging.INFO, logger="deltapack"):
        out = op(x, segments=seg)
    assert torch.equal(out, doc_cumsum_ref(x, segments=seg))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "undefined symbol cuFoo" in warnings[0].getMessage()
    assert "runs on the reference backend (fast: its kernels do not import (ImportError" in caplog.text
    with pytest.raises(RuntimeError, match="undefined symbol cuFoo"):
        op(x, segments=seg, backend="fast")


def test_a_kernel_package_that_is_not_installed_is_no_warning(monkeypatch, caplog):
    monkeypatch.setattr(dispatch_mod.torch.cuda, "is_available", lambda: True)
    missing = ModuleNotFoundError("No module named 'toykernels'", name="toykernels")
    op = make_op([], load_error=missing)
    x, seg = _inputs(torch.float64)
    with caplog.at_level(logging.INFO, logger="deltapack"):
        op(x, segments=seg)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "No module named 'toykernels'" in caplog.text  # still the reason in the choice's log line


def test_segments_hook_takes_the_op_over():
    """A kind of Segments (context parallelism) can run an op itself; the dispatcher then chooses nothing."""

    class Halved(Segments):
        def run_op(self, op, *args, backend=None, **kwargs):
            return ("hooked", op, args[0].shape, backend, kwargs)

    plain = Segments.from_cu_seqlens([0, 2, 5])
    seg = Halved(plain.cu_seqlens, plain.cu_seqlens_host, plain.seq_idx, plain.max_seqlen)
    x = torch.randn(1, 5, 3)
    assert make_op([])(x, segments=seg, scale=3.0) == ("hooked", "doc_cumsum", x.shape, None, {"scale": 3.0})


def test_ops_take_segments_not_boundaries():
    bounds = deltapack.Boundaries.from_document_ids(torch.tensor([[1, 1, 2, 2, 2]]))
    with pytest.raises(TypeError, match=r"expected a deltapack.ops.Segments \(a batch's Boundaries carries one"):
        make_op([])(torch.randn(1, 5, 3), segments=bounds)


def test_registry_names_are_unique():
    op = make_op([])
    with pytest.raises(ValueError, match="already has a backend named 'fast'"):
        op.add_backend(Backend("fast", load=lambda: None, verify=_verify_float64))
    name = "doc_cumsum_registry_test"
    registered = dispatch_mod.register_op(name, doc_cumsum_ref)
    try:
        assert dispatch_mod.OPS[name] is registered and registered.names == ("reference",)
        with pytest.raises(ValueError, match="already registered"):
            dispatch_mod.register_op(name, doc_cumsum_ref)
    finally:
        del dispatch_mod.OPS[name]


# ---------------------------------------------------------------------------------------------- the GDN ops
def test_the_log_names_the_backend_that_runs(monkeypatch, caplog):
    """fp32 inputs on CUDA run the exact reference, and the log says so with FLA's reason; bf16 runs FLA and the log
    names it. The device check and FLA's kernel are stood in for (no GPU here); the op's own state is swapped for
    fresh state so that nothing leaks into other tests."""
    rule = ops.OPS["gated_delta_rule"]
    for attr, fresh in (("_loaded", {}), ("_logged", set()), ("ran", Counter())):
        monkeypatch.setattr(rule, attr, fresh)
    monkeypatch.setattr(fla, "on_cuda", lambda t: True)
    kernel_calls = []

    def stand_in_kernel(q, k, v, g, beta, **kwargs):
        kernel_calls.append((q.dtype, tuple(kwargs["cu_seqlens_cpu"].tolist())))
        return torch.zeros_like(v), None

    monkeypatch.setattr(fla, "kernels", lambda: SimpleNamespace(chunk_gated_delta_rule=stand_in_kernel))
    seg = Segments.from_cu_seqlens([0, 3, 8])
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 8, 2, 16, generator=gen) for _ in range(2))
    v, g, beta = torch.randn(1, 8, 2, 16, generator=gen), -torch.rand(1, 8, 2, generator=gen), torch.rand(1, 8, 2)

    with caplog.at_level(logging.INFO, logger="deltapack"):
        out, _ = ops.gated_delta_rule(q, k, v, g, beta, segments=seg)
    assert torch.equal(out, ops.gated_delta_rule_ref(q, k, v, g, beta, segments=seg)[0]) and kernel_calls == []
    assert caplog.messages == [
        "deltapack: gated_delta_rule runs on the reference backend (fla: q is torch.float32; FLA's delta rule is "
        "exact to our checks in bf16 / fp16 only)"
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deltapack"):
        ops.gated_delta_rule(*(t.bfloat16() for t in (q, k, v)), g, beta.bfloat16(), segments=seg)
    assert kernel_calls == [(torch.bfloat16, (0, 3, 8))]
    assert caplog.messages == ["deltapack: gated_delta_rule runs on the fla backend"]
    assert rule.ran == {"reference": 1, "fla": 1}


def test_gdn_ops_are_fn_ref_twins():
    """Each public op has the signature of its reference plus ``backend=None`` (mamba_ssm's fn / ref habit)."""
    for op, ref in ((ops.causal_conv1d, ops.causal_conv1d_ref), (ops.gated_delta_rule, ops.gated_delta_rule_ref)):

        def shape(fn):  # names, kinds and defaults (annotations may spell a type differently)
            return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

        assert shape(op)[-1] == ("backend", inspect.Parameter.KEYWORD_ONLY, None)
        assert shape(op)[:-1] == shape(ref)
        assert "segments" in inspect.signature(ref).parameters


def test_public_functions_are_fn_ref_twins_and_bind_like_written_signatures():
    """Ops whose public function is built from the reference (``public_function``): the reference's signature plus
    ``backend=None``, named after the op, and a wrong call fails as a written signature would, before any backend."""
    from deltapack.ops import kda, lightning, mlstm, rg_lru, selective_scan, ssd

    twins = [(ssd.ssd, ssd.ssd_ref), (selective_scan.selective_scan, selective_scan.selective_scan_ref)]
    twins += [(lightning.lightning_attention, lightning.lightning_attention_ref), (mlstm.mlstm, mlstm.mlstm_ref)]
    twins += [(rg_lru.rg_lru_scan, rg_lru.rg_lru_scan_ref), (kda.kda, kda.kda_ref)]
    twins += [(ops.causal_conv1d, ops.causal_conv1d_ref), (ops.gated_delta_rule, ops.gated_delta_rule_ref)]
    for op, ref in twins:
        params = list(inspect.signature(op).parameters.values())
        assert params[:-1] == list(inspect.signature(ref).parameters.values())
        assert (params[-1].name, params[-1].kind, params[-1].default) == (
            "backend",
            inspect.Parameter.KEYWORD_ONLY,
            None,
        )
        assert ops.OPS[op.__name__].reference is ref and op.__doc__  # named after its op, whose reference is ref
    seg = Segments.from_cu_seqlens([0, 2, 5])
    x = torch.randn(1, 5, 3)
    with pytest.raises(TypeError, match="log_b"):
        rg_lru.rg_lru_scan(x, x, segments=seg, log_b=x)
    with pytest.raises(TypeError, match="segments"):
        rg_lru.rg_lru_scan(x, x)
    with pytest.raises(ValueError, match="log_a must have the shape of x"):
        rg_lru.rg_lru_scan(x, x[..., :2], segments=seg)
    assert torch.equal(rg_lru.rg_lru_scan(x, -x.abs(), segments=seg), rg_lru.rg_lru_scan_ref(x, -x.abs(), segments=seg))


def test_context_parallel_segments_refuse_an_op_they_cannot_keep_exact():
    from deltapack.distributed import ContextShard

    bounds = deltapack.Boundaries.from_cu_seqlens([0, 5, 16], (1, 16))
    shard = ContextShard.build(bounds, None, layout="zigzag", rank=0, world_size=2)
    segments = shard.local.segments
    assert segments.is_shard and not bounds.segments.is_shard
    with pytest.raises(ValueError, match="doc_cumsum has no context-parallel version"):
        make_op([])(torch.randn(1, shard.num_local_tokens, 3), segments=segments)
    q = torch.randn(1, shard.num_local_tokens, 1, 4)
    with pytest.raises(ValueError, match="output_final_state under context parallelism|initial state"):
        ops.gated_delta_rule(q, q, q, q[..., 0], q[..., 0], segments=segments, output_final_state=True)


# ---------------------------------------------------------------------------------------------- the import graph
SRC = Path(deltapack.__file__).parent
# each top-level part of the package may import only parts of a lower or the same rank (the package root, the
# public API, is reached only from inside functions)
RANKS = {"ops": 0, "diagnostics": 0, "boundaries": 1, "data": 2, "models": 2, "tiny": 2, "chunked_loss": 2, "patch": 3}
RANKS |= {"distributed": 4, "audit": 4}
RANKS |= {"train": 5, "cli": 6}


def _imports(path: Path) -> set[str]:
    """The deltapack modules ``path`` imports (anywhere in it), as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return {n for n in names if n.startswith("deltapack.")}


def _part(dotted: str) -> str:
    return dotted.split(".")[1]


def test_ops_import_nothing_above_them():
    for path in sorted((SRC / "ops").glob("*.py")):
        above = sorted(n for n in _imports(path) if not n.startswith("deltapack.ops"))
        assert not above, f"{path.name} imports {above}; ops/ may import only deltapack.ops"


def test_the_import_graph_flows_one_way():
    edges = 0
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        part = rel.parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        assert part in RANKS, f"{rel}: a new part of the package; give it its layer in RANKS"
        for name in _imports(path):
            target = _part(name)
            if target in RANKS:
                assert RANKS[target] <= RANKS[part], f"{rel} ({part}) imports {name} from a higher layer"
                edges += 1
    assert edges > 50  # the scan sees the imports


def _module_graph() -> dict[str, set[str]]:
    """{module: the deltapack modules it imports, at the top or inside a function}, skipping imports made for type
    checkers only (``if TYPE_CHECKING:``); ``from package import name`` counts as the submodule when there is one."""
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = ("deltapack", *path.relative_to(SRC).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body
            for node in ast.walk(stmt)
        }
        targets = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names}  # fmt: skip
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def test_the_import_graph_has_no_circle():
    """No module reaches itself through imports, lazy ones (inside functions) included: a lazy import that closes a
    circle is still a lower layer calling up."""
    graph = _module_graph()
    assert len(graph) > 50 and "deltapack.ops.dispatch" in graph["deltapack.ops.conv"]
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(f"import circle: {' -> '.join(path[path.index(module) :] + [module])}")
        if module not in done:
            for target in sorted(graph[module]):
                visit(target, [*path, module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])


# ---------------------------------------------------------------------------------------------- the packing guard
def test_a_gdn_layer_recomputed_without_its_boundaries_raises():
    """A GDN layer that ran packed and is replayed by activation checkpointing outside the packing scope (a
    checkpoint that does not go through transformers) raises instead of running the stream as one document; the
    same layer with the scope, and the same layer outside any packed call, run."""
    from torch.utils.checkpoint import checkpoint

    from deltapack.models.scope import packing_scope
    from deltapack.tiny import tiny_model

    model = deltapack.patch(tiny_model("qwen3_5"))
    try:
        gdn = next(m for m in model.modules() if type(m).__name__ == "Qwen3_5GatedDeltaNet")
        bounds = deltapack.Boundaries.from_document_ids(torch.tensor([[1, 1, 1, 2, 2, 2, 2]]))
        hidden = torch.randn(1, 7, model.config.hidden_size, requires_grad=True)
        with packing_scope(bounds):
            packed = gdn(hidden)
        alone = gdn(hidden[:, 3:])  # outside a packed call: the layer's own forward on one document
        assert (packed[:, 3:] - alone).abs().max() <= 1e-5
        with packing_scope(bounds):
            out = checkpoint(gdn, hidden, use_reentrant=False)
        with pytest.raises(RuntimeError, match="recomputed in the backward pass without the batch's boundaries"):
            out.sum().backward()
    finally:
        deltapack.unpatch(model)
