#!/usr/bin/env bash
# Runs on the GPU machine over binaries staged by scripts/stage-gpu.sh:
# device facts, every test binary with LINKREDUCE_REQUIRE_GPU=1, the
# correctness sweep and the benchmark. Logs go to $OUT (or ./gpu-logs).
# Usage: bash scripts/gpu-run.sh [tests|check|bench ...]   (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-logs}"
mkdir -p "$out"
export LINKREDUCE_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export LINKREDUCE_CACHE_DIR="${LINKREDUCE_CACHE_DIR:-/tmp/linkreduce-cache}"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(info tests check bench)
status=0
{
  echo "commit: $(cat stage/COMMIT)"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nvidia-smi topo -m
} > "$out/facts.txt" 2>&1
for step in "${steps[@]}"; do
  case "$step" in
    info) stage/linkreduce info 2>&1 | tee "$out/info.txt" ;;
    tests)
      for t in stage/tests/*; do
        echo "== $t"
        timeout "${TEST_TIMEOUT:-600}" "$t" --test-threads=1 2>&1 || status=1
      done | tee "$out/tests.txt" ;;
    check) timeout 900 stage/linkreduce check 2>&1 | tee "$out/check.txt" || status=1 ;;
    bench) timeout "${BENCH_TIMEOUT:-900}" stage/linkreduce bench --json "$out/bench.json" --sizes "${BENCH_SIZES:-1K:256M,3000,100000,1000000,5000000}" 2>&1 | tee "$out/bench.txt" || status=1 ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
done
exit $status
