#!/usr/bin/env bash
# One sitting on a GPU machine: GPU tests, then the layer, attention and end-to-end benchmarks.
# Usage (project root, GPU packages on the path): OUT=<dir> bash benchmarks/gpu_run.sh [tests] [layer] [attention] [e2e]
# Kernel caches: when KERNEL_CACHE (a .tar.xz of Triton's and TileLang's caches) exists it is unpacked first, so
# autotuning and compiling are skipped; the caches are packed again into $OUT/kernel_cache.tar.xz at the end.
set -u
out="${OUT:-benchmarks/results/run}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cache="${KERNEL_CACHE_DIR:-$PWD/.kernel-cache}"  # Triton's and TileLang's compiled kernels
export TRITON_CACHE_DIR="$cache/triton" TILELANG_CACHE_DIR="$cache/tilelang"
mkdir -p "$TRITON_CACHE_DIR" "$TILELANG_CACHE_DIR"
if [ -n "${KERNEL_CACHE:-}" ] && [ -f "$KERNEL_CACHE" ]; then tar -C "$cache" -xJf "$KERNEL_CACHE"; fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
stage() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0)) s"
  grep -v "TileLang\|falling back to its reference" "$out/$name.log" | tail -n "${TAIL:-40}"
}
for what in "$@"; do
  case "$what" in
    tests) stage tests "${TESTS_LIMIT:-400}" python -m pytest -v --tb=short --timeout="${TEST_TIMEOUT:-150}" -m gpu tests/gpu -p no:cacheprovider ;;
    layer) stage layer "${LAYER_LIMIT:-240}" python benchmarks/bench_layer.py --out "$out/layer.json" ;;
    attention) stage attention 90 python benchmarks/bench_attention.py --out "$out/attention.json" ;;
    e2e) stage e2e "${E2E_LIMIT:-300}" python benchmarks/bench_e2e.py --out "$out/e2e.json" ;;
  esac
done
tar -C "$cache" -cJf "$out/kernel_cache.tar.xz" . && ls -la "$out/kernel_cache.tar.xz"
du -sh "$cache"/*
