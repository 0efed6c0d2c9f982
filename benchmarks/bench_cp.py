"""The largest packed row that trains with context parallelism 1 vs 2, on 2 GPUs: step time, tokens/s, peak memory.

    torchrun --nproc-per-node 2 benchmarks/bench_cp.py --model 665m --out cp_665m.json
    python benchmarks/bench_cp.py --model 9b --one-gpu --tokens 65536      # the larger config on one GPU

Both settings shard parameters, gradients and optimizer state over the 2 GPUs with FSDP2 (bf16 compute, fp32 master
weights and reductions, the GDN decay parameters in fp32) and checkpoint every decoder layer's activations:

- ``cp1``: each GPU trains its own packed row of N tokens (data parallelism 2): 2N tokens per step.
- ``cp2``: the two GPUs split one packed row of N tokens (zigzag), FLA's context-parallel GDN kernels and varlen
  attention over all-gathered keys: N tokens per step.

N grows by 1.5x from ``--first-tokens`` until a step runs out of memory, which ends that setting's ladder (run
each setting in its own launch: ``--modes cp1,exchange``, then ``--modes cp2 --from-cp1 FILE``). One step is an
optimizer step (forward, backward, AdamW) on the e2e spec's documents (lognormal lengths, median 600 tokens) repeated
to N tokens. The LM head's loss is computed in chunks of 4096 x 32000 logits (4096 tokens of a 32K vocabulary; the
logits of a 512K-token row in fp32 would take 64 GB alone); the same head runs in both settings.

Models: ``665m`` is the model of ``e2e-spec.json``; ``9b`` is transformers' default Qwen3.5 config, the layout of
the 9B checkpoint (hidden 4096, 24 GDN + 8 attention layers, vocabulary 248320): 9.0B parameters, whose fp32 master
weights, gradients and AdamW state alone take 133 GiB, more than an H100 holds and all but 7 GiB of an H200 (the
``--one-gpu`` run checks 64K tokens on one card); ``7b`` is the same with a 32K vocabulary (7.2B parameters, 107 GiB
of state), which trained 64K tokens on one H200 at 134 GiB.

``--sizes`` replaces the ladder by a list of rows; ``--from-cp1 FILE`` sets it from a ``cp1`` run of the same model
and cards: twice its largest row and twice its first out-of-memory row (CP=2 holds a row of 2N tokens in about the
memory CP=1 needs for N per GPU, measured on a pair of H200s), so CP=2 finds its limit in two tries; a new row
length costs its first step minutes of kernel tuning.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import document_lengths, documents, environment, load_spec  # noqa: E402

import deltapack  # noqa: E402
from deltapack import Boundaries  # noqa: E402
from deltapack.distributed import (  # noqa: E402
    ContextShard,
    apply_fsdp,
    disable_context_parallel,
    enable_context_parallel,
    num_targets,
)
from deltapack.distributed.fsdp import set_gradient_divisor  # noqa: E402

NINE_B = dict(  # transformers' Qwen3_5TextConfig defaults, spelled out
    vocab_size=248320,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 8,
)
MODELS = {"9b": NINE_B, "7b": NINE_B | {"vocab_size": 32000}}
LOSS_ELEMENTS = 4096 * 32000  # logits per loss chunk: 4096 tokens of a 32K vocabulary
LEAD = 1000  # see row()
STEP, ALIGN = 1.5, 16384  # the ladder: each row 1.5x the last, a multiple of 16384 tokens


class _ChunkedLMLoss(torch.autograd.Function):
    """Token-sum cross entropy of ``hidden @ weight.T`` over ``denom``, chunk by chunk; gradients made in forward, so
    no [T, vocab] tensor lives beyond one chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, denom):  # [T, H], [V, H], [T], scalar
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        chunk = max(1, LOSS_ELEMENTS // weight.shape[0])
        for s in range(0, hidden.shape[0], chunk):
            h, lab = hidden[s : s + chunk], labels[s : s + chunk]
            logits = (h @ weight.T).float()
            valid = lab != -100
            target = lab.clamp(min=0)
            lse = logits.logsumexp(-1)
            total += ((lse - logits.gather(1, target[:, None])[:, 0]) * valid).sum()
            grad = (logits - lse[:, None]).exp_()
            grad[torch.arange(len(lab), device=lab.device), target] -= 1
            grad = (grad * (valid[:, None] / denom)).to(hidden.dtype)
            grad_hidden[s : s + chunk] = grad @ weight
            grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out.to(grad_hidden.dtype), grad_weight * grad_out.to(grad_weight.dtype), None, None


class ChunkedHead(nn.Module):
    """The LM head as a loss: hidden [1, T, H], next-token labels [1, T], the number of targets -> scalar."""

    def __init__(self, lm_head: nn.Linear):
        super().__init__()
        self.weight = lm_head.weight

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
        return _ChunkedLMLoss.apply(hidden[0], self.weight, labels[0], denom.float())


def model_fields(name: str) -> dict:
    return load_spec()["model"]["config"] if name == "665m" else MODELS[name]


def build(name: str, mesh) -> tuple[nn.Module, ChunkedHead, torch.optim.Optimizer, int]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_5_text", **model_fields(name), tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    params = sum(p.numel() for p in model.parameters())
    head = ChunkedHead(model.lm_head)
    model.lm_head = nn.Identity()  # the model returns hidden states; the head takes the loss
    model = deltapack.patch(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    apply_fsdp(model, mesh)
    fully_shard(head, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-5)
    return model, head, optimizer, params


def row(tokens: int) -> tuple[torch.Tensor, list[int]]:
    """[1, tokens] ids and document offsets: the spec's documents, repeated until the row is full (the last cut),
    the first one LEAD tokens short, so that the rank boundaries (multiples of 4096) cut documents (the spec's
    stream is 32768 tokens, so without it a row of 2^k tokens splits between documents and CP=2 hands no state
    over)."""
    base, kept = document_lengths(), []
    while sum(kept) < tokens + LEAD:
        kept.extend(base)
    kept[0] -= LEAD
    while sum(kept) > tokens:
        excess = sum(kept) - tokens
        if kept[-1] > excess:
            kept[-1] -= excess
        else:
            kept.pop()
    cu = [0]
    for length in kept:
        cu.append(cu[-1] + length)
    return torch.cat(documents(kept)).unsqueeze(0), cu


def trial(model, head, optimizer, tokens: int, mode: str, world: int, steps: int = 2) -> dict:
    ids, cu = row(tokens)
    ids = ids.cuda()
    bounds = Boundaries.from_cu_seqlens(cu, (1, tokens)).to("cuda")
    if mode == "cp2":
        shard = ContextShard.build(bounds, None, layout="zigzag")
        inputs = dict(input_ids=shard.shard(ids), boundaries=shard.local)
        labels = shard.shift_labels(shard.shard(ids))
        denom = num_targets(labels, shard)
        tokens_per_step = tokens
        # rank boundaries inside a document
        extra = {"rank_boundaries_in_documents": sum(part.context_before > 0 for part in shard.chain)}
    else:
        inputs = dict(input_ids=ids, boundaries=bounds)
        labels = bounds.shift_labels(ids)
        denom = (labels != -100).sum()
        tokens_per_step = tokens * world
        extra = {}
    times, losses = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        hidden = model(**inputs).logits
        loss = head(hidden, labels, denom)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if dist.get_rank() == 0:
            print(f"{mode} {tokens} tokens: step {len(times)} in {times[-1]:.2f} s", flush=True)
        loss = loss.detach()
        if mode == "cp2":  # each rank holds its share of the row's token mean
            dist.all_reduce(loss)
        losses.append(loss.item())
    step_s = statistics.median(times[1:])  # the first step compiles kernels and allocates optimizer state
    return {
        "tokens": tokens,
        "tokens_per_step": tokens_per_step,
        "step_s": round(step_s, 3),
        "tokens_per_s": round(tokens_per_step / step_s),
        "loss": losses[-1],
    } | extra


def ladder(start: int, limit: int) -> list[int]:
    """Rows from ``start`` growing by 1.5x (multiples of 16384) up to ``limit``."""
    sizes = []
    while start <= limit:
        sizes.append(start)
        start = max(start + ALIGN, int(start * STEP) // ALIGN * ALIGN)  # 16384 * 1.5 rounds back to 16384
    return sizes


def sizes_from_cp1(path: str) -> list[int]:
    """Twice the largest row a ``cp1`` run trained, then twice its first out-of-memory row (if it reached one); if
    it trained none, the row it failed on (which CP=2 holds in half the memory per GPU)."""
    rows = json.loads(Path(path).read_text()).get("cp1", [])
    trained = [r["tokens"] for r in rows if not r["oom"]]
    failed = [r["tokens"] for r in rows if r["oom"]]
    if not trained and not failed:
        raise SystemExit(f"{path} has no cp1 row; run --modes cp1 first")
    if not trained:
        return [min(failed)]
    return [2 * max(trained)] + ([2 * min(failed)] if failed else [])


def run_sizes(model, head, optimizer, mode: str, sizes: list[int], world: int, out: dict, path: str) -> None:
    """One trial per row size in order, until the first out-of-memory."""
    rank = dist.get_rank()
    for module in (model, head):  # cp1: the mean over replicas; cp2: the sum of each rank's share of one loss
        set_gradient_divisor(module, float(world) if mode == "cp1" else 1.0)
    (enable_context_parallel if mode == "cp2" else disable_context_parallel)(model)
    results, ok_sizes = out.setdefault(mode, []), []
    for tokens in sizes:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        record: dict = {"tokens": tokens}
        oom = torch.zeros((), device="cuda")
        faulthandler.dump_traceback_later(120, repeat=True)  # every 2 min of one trial: where each rank is
        try:
            record = trial(model, head, optimizer, tokens, mode, world)
        except (torch.OutOfMemoryError, RuntimeError) as err:  # Triton kernels raise RuntimeError on OOM
            if "out of memory" not in str(err):
                raise
            oom.fill_(1)
            optimizer.zero_grad(set_to_none=True)
        faulthandler.cancel_dump_traceback_later()
        if oom.item():  # the failed step's tensors, freed so that the collectives below can allocate
            gc.collect()
            torch.cuda.empty_cache()
        dist.all_reduce(oom, op=dist.ReduceOp.MAX)
        peaks = [None] * world
        dist.all_gather_object(peaks, round(torch.cuda.max_memory_allocated() / 2**30, 2))
        record |= {"oom": bool(oom.item()), "peak_mem_GiB_per_gpu": peaks}
        results.append(record)
        if rank == 0:
            print(json.dumps({mode: record}), flush=True)
            Path(path).write_text(json.dumps(out, indent=1))
        if record["oom"]:  # the end: FSDP's state after a failed backward is not trusted further
            break
        ok_sizes.append(tokens)
    out[f"{mode}_largest_tokens"] = max(ok_sizes) if ok_sizes else 0


def attention_exchange(name: str, sizes: list[int], out: dict) -> None:
    """All-gather vs ring, bounded: the time of the key/value all-gather (and its reduce-scatter backward) of one
    full-attention layer against the layer's whole context-parallel attention (gather, key rows, varlen forward and
    backward), zigzag over the group. A ring can hide at most the exchange behind the compute, so the share is the
    most it could save."""
    fields = model_fields(name)
    dims = fields["num_attention_heads"], fields["num_key_value_heads"], fields["head_dim"]
    rows = out.setdefault("attention_exchange", [])
    for tokens in sizes:
        record = _exchange_row(tokens, *dims)
        rows.append(record)
        if dist.get_rank() == 0:
            print(json.dumps({"attention_exchange": record}), flush=True)


def _exchange_row(tokens: int, heads: int, kv_heads: int, dim: int) -> dict:
    from common import cuda_time_ms

    from deltapack.distributed.attention import key_plan
    from deltapack.distributed.collectives import all_gather
    from deltapack.ops.attention import varlen_attention

    world = dist.get_world_size()
    _, cu = row(tokens)
    shard = ContextShard.build(Boundaries.from_cu_seqlens(cu, (1, tokens)).to("cuda"), None, layout="zigzag")
    local = shard.num_local_tokens
    q = torch.randn(local, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(2, local, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    plan = key_plan(shard)
    index = torch.cat([plan.index, plan.index + local])

    def exchange() -> None:
        all_gather(kv, None, world).float().sum().backward()

    def attention() -> None:
        keys, values = all_gather(kv, None, world).reshape(-1, kv_heads, dim).index_select(0, index).chunk(2)
        o = varlen_attention(
            q,
            keys,
            values,
            segments=shard.local.segments.pieces,
            segments_k=plan.segments_k,
        )
        o.float().sum().backward()

    gather_ms = cuda_time_ms(exchange, warmup=2, reps=5)["median_ms"]
    total_ms = cuda_time_ms(attention, warmup=2, reps=5)["median_ms"]
    return {
        "tokens": tokens,
        "gather_ms": round(gather_ms, 3),
        "attention_ms": round(total_ms, 3),
        "gather_share": round(gather_ms / total_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("665m", *MODELS), default="665m")
    parser.add_argument("--modes", default="cp2,cp1,exchange")
    parser.add_argument("--first-tokens", type=int, default=32768)
    parser.add_argument("--limit", type=int, default=2**20)
    parser.add_argument("--sizes", help="comma-separated rows to try instead of the ladder (cp1 / cp2)")
    parser.add_argument("--from-cp1", metavar="FILE", help="cp2 rows: twice the largest and the first failed cp1 row")
    parser.add_argument("--one-gpu", action="store_true", help="one process, one GPU: train --tokens once")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--out", default="cp_bench.json")
    args = parser.parse_args()
    from torch.distributed.device_mesh import init_device_mesh

    if args.one_gpu:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
    else:
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    dist.barrier(device_ids=[rank])  # NCCL's buffers, allocated before the model fills the card
    mesh = init_device_mesh("cuda", (world,))
    out: dict = {"model": args.model, "world": world, "environment": environment()}
    try:
        model, head, optimizer, params = build(args.model, mesh)
        out["parameters_millions"] = round(params / 1e6, 1)
    except torch.OutOfMemoryError:
        out["oom_building"] = True
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(json.dumps(out), flush=True)
        return
    if args.one_gpu:
        run_sizes(model, head, optimizer, "cp1", [args.tokens], world, out, args.out)
    else:
        for mode in args.modes.split(","):
            if mode == "exchange":
                attention_exchange(args.model, [65536, 131072, 262144], out)
                continue
            if args.sizes:
                sizes = [int(n) for n in args.sizes.split(",")]
            elif args.from_cp1 and mode == "cp2":
                sizes = sizes_from_cp1(args.from_cp1)
            else:
                sizes = ladder(args.first_tokens, args.limit)
            run_sizes(model, head, optimizer, mode, sizes, world, out, args.out)
    if rank == 0:
        Path(args.out).write_text(json.dumps(out, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
