#!/usr/bin/env bash
# One sitting on a GPU machine: GPU tests, then the layer, attention and end-to-end benchmarks.
# Usage (project root, GPU packages on the path): [OUT=<dir>] bash benchmarks/gpu_run.sh [tests] [layer] [attention] [e2e]
#   [cp-tests] [cp-665m] [cp-9b]   (the cp-* stages need 2 GPUs; each of the last two stands for its settings)
#   [prev-layer] [prev-e2e] (an earlier build in .prev/) [mamba] [mamba-tests] [fla-families] [recurrences] [llama] [family-tests]
#   [fla-recurrence-tests]   (RECURRENCES_ARGS: more arguments of bench_recurrences.py, e.g. --lightning-chunk)
#   [compile-tests] [probe] (which FLA kernels run fwd+bwd here) [profile] [profile-recommended] (one packed training step of the e2e
#   model by kernel category: eager, or the recommended configuration with one more step under cProfile)
#   [gdn-core] (FLA's Triton GDN kernels vs FlashQLA, if installed) [conv] (FLA's conv kernels vs the memory floor)
#   [largest-9b] (the 9B config's largest row, one GPU) [summary] (summarize_run.py over this folder)
#   [recipe] (e2e-recommended gdn-core conv profile profile-recommended largest-9b summary: the GPU recipe's figures)
# Kernel caches: when KERNEL_CACHE (a .tar.xz of Triton's and TileLang's caches) exists it is unpacked first, so
# autotuning and compiling are skipped; the caches are packed again into $OUT/kernel_cache.tar.xz at the end
# (SAVE_KERNEL_CACHE=0: not) and Triton's autotuning results into $OUT/autotune_cache.tar.xz (AUTOTUNE_CACHE).
# DEADLINE=<s>: no stage runs past that many seconds from the start; a stage with under 30 s left is skipped.
# CP2_665M_ROWS / CP2_9B_ROWS=<n,n>: the rows CP=2 tries (default: from the CP=1 stage of the same call);
# CP_9B_FIRST: the first row of the 9B config's CP=1 ladder (default 32768).
set -u
# default: benchmarks/results/<date>_<N>x<card>/, the layout RESULTS.md indexes (one folder per date and card)
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | sed 's/^NVIDIA //; s/ .*//')
out="${OUT:-benchmarks/results/$(date -u +%F)_$(nvidia-smi -L | wc -l)x${card}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
site="${PYTHONPATH#*:}"  # the GPU packages (what .gpu/env.sh put after src/)
cache="${KERNEL_CACHE_DIR:-$PWD/.kernel-cache}"  # Triton's and TileLang's compiled kernels
# (and inductor's compiled graphs, so that a compiled model's next process skips most of its compile)
export TRITON_CACHE_DIR="$cache/triton" TILELANG_CACHE_DIR="$cache/tilelang" TORCHINDUCTOR_CACHE_DIR="$cache/inductor"
mkdir -p "$TRITON_CACHE_DIR" "$TILELANG_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
if [ -n "${KERNEL_CACHE:-}" ] && [ -f "$KERNEL_CACHE" ]; then tar -C "$cache" -xJf "$KERNEL_CACHE"; fi
# Triton's autotuning results alone (kilobytes): with them each kernel compiles its chosen config only, not every
# candidate; the full cache of the 2-GPU checks is too large to carry next to the GPU packages
if [ -n "${AUTOTUNE_CACHE:-}" ] && [ -f "$AUTOTUNE_CACHE" ]; then tar -C "$cache" -xJf "$AUTOTUNE_CACHE"; fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
stage() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 30 ]; then echo "=== $name skipped: ${left} s left before the deadline"; return; fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "=== $name"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0)) s"
  grep -v "TileLang\|falling back to its reference" "$out/$name.log" | tail -n "${TAIL:-40}"
  # after every stage, so that a run cut short still hands its autotuning on
  (cd "$cache" && find . -name '*.autotune.json' | tar -cJf "$out/autotune_cache.tar.xz" -T -)
  # and every JSON and log so far in one file that sorts first: a transfer that returns only the first few files
  # of the folder (alphabetically) still returns all of them
  (cd "$out" && find . -maxdepth 1 -type f \( -name '*.json' -o -name '*.log' \) | tar -cJf 00_outputs.tar.xz -T -)
}
cp2_rows() {  # CP=2's rows: $3 if set (comma-separated), else from the CP=1 run of this call, else a ladder from $2
  if [ -n "$3" ]; then echo "--sizes $3"; elif [ -f "$1" ]; then echo "--from-cp1 $1"; else echo "--first-tokens $2"; fi
}
stages=()
for what in "$@"; do  # cp-665m and cp-9b stand for all of their settings
  case "$what" in
    cp-665m) stages+=(cp-665m-cp1 cp-665m-cp2) ;;
    cp-9b) stages+=(cp-9b-cp1 cp-9b-cp2 cp-9b-one-gpu) ;;
    # the GPU recipe's figures in one call (~8 minutes warm), summarised at the end into summary.json
    recipe) stages+=(e2e-recommended gdn-core conv profile profile-recommended largest-9b summary) ;;
    *) stages+=("$what") ;;
  esac
done
for what in "${stages[@]}"; do
  case "$what" in
    tests) stage tests "${TESTS_LIMIT:-400}" python -m pytest -v --tb=short --timeout="${TEST_TIMEOUT:-150}" -m gpu tests/gpu -p no:cacheprovider ;;
    # the chunked loss on FLA's cross-entropy kernels, deltapack's Triton conv, then torch.compile (COMPILE_TESTS_K:
    # a pytest -k selection)
    compile-tests) stage compile-tests "${TESTS_LIMIT:-400}" python -m pytest -v --tb=short -m gpu -p no:cacheprovider \
        --timeout="${TEST_TIMEOUT:-150}" tests/gpu/test_chunked_loss_gpu.py tests/gpu/test_conv_triton_gpu.py \
        tests/gpu/test_compile_gpu.py \
        ${COMPILE_TESTS_K:+-k "$COMPILE_TESTS_K"} ;;
    layer) stage layer "${LAYER_LIMIT:-240}" python benchmarks/bench_layer.py --out "$out/layer.json" ;;
    attention) stage attention 90 python benchmarks/bench_attention.py --out "$out/attention.json" ;;
    # E2E_ARGS=--compile: also the recommended configuration (chunked loss, compiled layers, FlashQLA if installed)
    e2e) stage e2e "${E2E_LIMIT:-300}" python benchmarks/bench_e2e.py --out "$out/e2e.json" ${E2E_ARGS:-} ;;
    e2e-recommended) stage e2e-recommended "${E2E_LIMIT:-300}" python benchmarks/bench_e2e.py --compile \
        --out "$out/e2e_recommended.json" ;;
    summary) stage summary 30 python benchmarks/summarize_run.py "$out" --out "$out/summary.json" ;;
    # the same benchmarks on an earlier build exported to .prev/ (git archive COMMIT src benchmarks | tar -x -C .prev)
    prev-layer) PYTHONPATH="$PWD/.prev/src:$site" stage prev-layer "${LAYER_LIMIT:-240}" \
        python .prev/benchmarks/bench_layer.py --out "$out/prev_layer.json" ;;
    prev-e2e) PYTHONPATH="$PWD/.prev/src:$site" stage prev-e2e "${E2E_LIMIT:-300}" \
        python .prev/benchmarks/bench_e2e.py --skip-exact --out "$out/prev_e2e.json" ;;
    # the families' layers, each packed vs the unpatched transformers layer on one 32768-token row
    mamba) stage mamba "${FAMILY_LIMIT:-240}" python benchmarks/bench_mamba.py --out "$out/mamba.json" ;;
    mamba-tests) stage mamba-tests "${TESTS_LIMIT:-400}" python -m pytest -v --tb=short -m gpu -p no:cacheprovider \
        tests/gpu/test_mamba_ops_gpu.py tests/gpu/test_mamba_models_gpu.py ;;
    fla-families) stage fla-families "${FAMILY_LIMIT:-240}" python benchmarks/bench_fla_families.py \
        --out "$out/fla_families.json" ;;
    recurrences) stage recurrences "${FAMILY_LIMIT:-240}" python benchmarks/bench_recurrences.py \
        --out "$out/recurrences.json" ${RECURRENCES_ARGS:-} ;;
    llama) stage llama "${FAMILY_LIMIT:-240}" python benchmarks/bench_llama.py --out "$out/llama.json" ;;
    family-tests) stage family-tests "${TESTS_LIMIT:-400}" python -m pytest -v --tb=short -m gpu -p no:cacheprovider \
        tests/gpu/test_mamba_ops_gpu.py tests/gpu/test_kda_gpu.py tests/gpu/test_recurrence_gpu.py \
        tests/gpu/test_attention_plan_gpu.py tests/gpu/test_mamba_models_gpu.py tests/gpu/test_fla_families_gpu.py ;;
    # the GPU tests of the KDA, short-conv and recurrence families, cheapest first (the KDA op tests use the layer
    # benchmark's head shapes, so after fla-families they reuse its kernel tuning; the tiny models tune their own)
    fla-recurrence-tests) stage fla-recurrence-tests "${TESTS_LIMIT:-400}" python -m pytest -v --tb=short \
        --timeout="${TEST_TIMEOUT:-300}" -m gpu -p no:cacheprovider tests/gpu/test_recurrence_gpu.py \
        tests/gpu/test_kda_gpu.py tests/gpu/test_fla_families_gpu.py ;;
    probe) stage probe 240 python benchmarks/probe_fla_kernels.py --out "$out/probe_fla.json" ;;
    # one optimizer step of the e2e model under the torch profiler (GPU time by category, idle time, MFU)
    # (PROFILE_TRACE=<file.json.gz>: also keep the profiler's trace)
    # (PROFILE_ARGS=--recommended: the recommended configuration; profile-recommended: that, as a second stage)
    profile) stage profile "${PROFILE_LIMIT:-300}" python benchmarks/profile_step.py --out "$out/profile.json" \
        ${PROFILE_TRACE:+--trace "$PROFILE_TRACE"} ${PROFILE_ARGS:-} ;;
    profile-recommended) stage profile-recommended "${PROFILE_LIMIT:-300}" python benchmarks/profile_step.py \
        --recommended --host-profile --out "$out/profile_recommended.json" ;;
    conv) stage conv 120 python benchmarks/bench_conv.py --out "$out/conv.json" ;;
    gdn-core) stage gdn-core "${GDN_CORE_LIMIT:-240}" python benchmarks/bench_gdn_core.py --out "$out/gdn_core.json" ;;
    # each row in a fresh process (an out-of-memory leaves the next a clean card); LARGEST_9B_FIRST: the first row
    largest-9b) stage largest-9b "${LARGEST_9B_LIMIT:-540}" python benchmarks/largest_row.py --model 9b \
        --first "${LARGEST_9B_FIRST:-65536}" --out "$out/largest_9b.json" ;;
    # two GPUs: context-parallel exactness, then the largest packed row at CP=1 vs CP=2
    cp-tests) DELTAPACK_CP_REPORT="$out/cp_exact.json" DELTAPACK_CP_STACKS_AFTER=200 stage cp-tests "${CP_TESTS_LIMIT:-240}" python -m pytest -v -s \
        --tb=short -m gpu tests/gpu/test_context_parallel_gpu.py tests/gpu/test_varlen_attention.py -p no:cacheprovider ;;
    # each setting in its own launch, so that one's out-of-memory leaves the next a clean start; CP=1's ladder first,
    # then CP=2 at twice its largest and twice its first failed row (a new row length costs minutes of kernel tuning)
    cp-665m-cp1) stage cp-665m-cp1 "${CP_665M_LIMIT:-240}" torchrun --nproc-per-node 2 benchmarks/bench_cp.py \
        --model 665m --modes cp1,exchange --first-tokens 65536 --out "$out/cp_665m_cp1.json" ;;
    cp-665m-cp2) stage cp-665m-cp2 "${CP_665M_LIMIT:-240}" torchrun --nproc-per-node 2 benchmarks/bench_cp.py \
        --model 665m --modes cp2 $(cp2_rows "$out/cp_665m_cp1.json" 131072 "${CP2_665M_ROWS:-}") --out "$out/cp_665m_cp2.json" ;;
    cp-9b-cp1) stage cp-9b-cp1 "${CP_9B_LIMIT:-240}" torchrun --nproc-per-node 2 benchmarks/bench_cp.py \
        --model 9b --modes cp1 --first-tokens "${CP_9B_FIRST:-32768}" --out "$out/cp_9b_cp1.json" ;;
    cp-9b-cp2) stage cp-9b-cp2 "${CP_9B_LIMIT:-240}" torchrun --nproc-per-node 2 benchmarks/bench_cp.py \
        --model 9b --modes cp2 $(cp2_rows "$out/cp_9b_cp1.json" 32768 "${CP2_9B_ROWS:-}") --out "$out/cp_9b_cp2.json" ;;
    cp-9b-one-gpu) stage cp-9b-one-gpu 120 python benchmarks/bench_cp.py --model 9b --one-gpu --tokens 65536 \
        --out "$out/cp_9b_one_gpu.json" ;;
    *) echo "unknown stage: $what" >&2 ;;
  esac
done
[ "${SAVE_KERNEL_CACHE:-1}" = 1 ] && tar -C "$cache" -cJf "$out/kernel_cache.tar.xz" . && ls -la "$out/kernel_cache.tar.xz"
du -sh "$cache"/*
