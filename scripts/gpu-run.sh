#!/usr/bin/env bash
# Runs on the GPU machine over binaries staged by scripts/stage-gpu.sh:
# device facts, every test binary with LINKREDUCE_REQUIRE_GPU=1, the
# correctness sweep and the benchmark, each with ranks as threads and as
# processes. Logs go to $OUT (or ./gpu-logs).
#
# Usage: bash scripts/gpu-run.sh [info tests check check-processes soak soak-processes
#          sanitize bench bench-no-pdl bench-fused bench-fused-forced bench-processes
#          tune python ...]
#          (default: all but sanitize, bench-no-pdl, tune and python)
# bench-no-pdl is bench with the all-reduce kernels launched without
# programmatic dependent launch (bench --pdl off; on is the default where
# the GPU allows it), same sizes and BENCH_ARGS, into bench-no-pdl.json:
# run `bench bench-no-pdl` for an A/B in one go. To check or soak without
# it, add "--pdl off" to CHECK_ARGS, CHECK_PROCESSES_ARGS or SOAK_ARGS.
# Environment: TEST_TIMEOUT, CHECK_TIMEOUT, BENCH_TIMEOUT, SOAK_TIMEOUT,
#   SANITIZE_TIMEOUT (seconds per step),
#   SOAK_CASES (random cases per world size; default 20000), SOAK_WORLDS
#   (default 2,3,4: with two GPUs one rank per GPU, then 3 and 4 ranks
#   sharing them), SOAK_ARGS (extra arguments, e.g. "--seed 7"),
#   SANITIZE_CASES (default 100 per tool),
#   CHECK_ARGS, BENCH_ARGS (extra arguments, e.g. "--ranks 2" on one GPU),
#   BENCH_FUSED_ARGS (for `bench --op fused-norm`, e.g. "--rows 8,2048"),
#   CHECK_PROCESSES_ARGS (default: worlds 2-4; processes sharing a GPU
#   time-slice, so larger worlds are slow), BENCH_SIZES (default 1K:256M
#   plus sizes that are not powers of two).
# The device tool allows 10 minutes a command and brings back few files:
# on nvidia-h200-x2 run `info tests` in one command and the rest in another.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-logs}"
mkdir -p "$out"
export LINKREDUCE_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export LINKREDUCE_CACHE_DIR="${LINKREDUCE_CACHE_DIR:-/tmp/linkreduce-cache}"
export LINKREDUCE_BIN="$PWD/stage/linkreduce"
export LINKREDUCE_COMMIT="$(head -c 12 stage/COMMIT)$(grep -q uncommitted stage/COMMIT && echo +dirty)"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(info tests check check-processes soak soak-processes bench bench-processes)
sizes="${BENCH_SIZES:-1K:256M,3000,100000,1000000,5000000}"
status=0
{
  echo "commit: $(cat stage/COMMIT)"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "steps: ${steps[*]}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nvidia-smi topo -m
} > "$out/facts.txt" 2>&1
run() { # name timeout command...
  local name=$1 limit=$2; shift 2
  echo "\$ $*" > "$out/$name.txt"
  local started=$SECONDS
  timeout "$limit" "$@" >> "$out/$name.txt" 2>&1 || { echo "exit status $?" >> "$out/$name.txt"; status=1; }
  echo "($name: $((SECONDS - started)) s)" >> "$out/$name.txt"
  tail -n 5 "$out/$name.txt"
}
for step in "${steps[@]}"; do
  case "$step" in
    info) run info 60 stage/linkreduce info ;;
    tests)
      # One log for all test binaries: the device tool brings back few files.
      for t in stage/tests/*; do
        run "test-$(basename "$t")" "${TEST_TIMEOUT:-600}" "$t" --test-threads=1
        cat "$out/test-$(basename "$t").txt" >> "$out/tests.txt"
        rm "$out/test-$(basename "$t").txt"
      done ;;
    check) run check "${CHECK_TIMEOUT:-900}" stage/linkreduce check ${CHECK_ARGS:-} ;;
    check-processes) run check-processes "${CHECK_TIMEOUT:-900}" stage/linkreduce check --mode processes ${CHECK_PROCESSES_ARGS:---worlds 2,3,4 --graph-replays 50} ;;
    bench) run bench "${BENCH_TIMEOUT:-900}" stage/linkreduce bench --json "$out/bench.json" --sizes "$sizes" ${BENCH_ARGS:-} ;;
    bench-no-pdl) run bench-no-pdl "${BENCH_TIMEOUT:-900}" stage/linkreduce bench --pdl off --json "$out/bench-no-pdl.json" --sizes "$sizes" ${BENCH_ARGS:-} ;;
    bench-fused-forced)
      # The fused op with one kernel algorithm at every size, through a
      # tuning table that both `fused` and `lr+norm` follow: fused against
      # unfused for each algorithm, also those the automatic choice skips
      # on this machine.
      for algorithm in push one-stage two-stage; do
        table="/tmp/linkreduce-tuning-$algorithm.json"
        entries=$(for w in 2 3 4 5 6 7 8; do printf '{"world_size":%d,"up_to_bytes":null,"algorithm":"%s"}\n' "$w" "$algorithm"; done | paste -sd, -)
        echo "{\"measured_on\":\"forced by gpu-run.sh\",\"entries\":[$entries]}" > "$table"
        run "bench-fused-$algorithm" "${BENCH_TIMEOUT:-900}" env LINKREDUCE_TUNING="$table" \
          stage/linkreduce bench --op fused-norm --json "$out/bench-fused-$algorithm.json" ${BENCH_FUSED_ARGS:-}
      done ;;
    bench-fused) run bench-fused "${BENCH_TIMEOUT:-900}" stage/linkreduce bench --op fused-norm --json "$out/bench-fused.json" ${BENCH_FUSED_ARGS:-} ;;
    bench-processes) run bench-processes "${BENCH_TIMEOUT:-900}" stage/linkreduce bench --mode processes --json "$out/bench-processes.json" --sizes "$sizes" ${BENCH_ARGS:-} ;;
    soak) run soak "${SOAK_TIMEOUT:-900}" stage/linkreduce check --random "${SOAK_CASES:-20000}" --worlds "${SOAK_WORLDS:-2,3,4}" ${SOAK_ARGS:-} ;;
    soak-processes) run soak-processes "${SOAK_TIMEOUT:-900}" stage/linkreduce check --mode processes --random "${SOAK_CASES:-20000}" --worlds "${SOAK_WORLDS:-2,3,4}" ${SOAK_ARGS:-} ;;
    sanitize)
      # Each rank a process of its own, so that every rank's kernels run
      # under the tool while their peers' run too; a long deadline because
      # instrumented kernels are slow.
      for tool in memcheck racecheck synccheck; do
        run "sanitize-$tool" "${SANITIZE_TIMEOUT:-200}" /usr/local/cuda/bin/compute-sanitizer \
          --tool "$tool" --target-processes all --error-exitcode 9 \
          stage/linkreduce check --mode processes --random "${SANITIZE_CASES:-100}" --worlds 2 \
          --max-len 65536 --timeout-ms 120000 ${SOAK_ARGS:-}
        cat "$out/sanitize-$tool.txt" >> "$out/sanitize.txt"
        rm "$out/sanitize-$tool.txt"
      done ;;
    python)
      # The staged wheel installed beside the machine's PyTorch (python3 is
      # the interpreter that has torch: a venv of its own would not see it),
      # then the torchrun tests (correctness, graphs, fallbacks; then a
      # killed rank) and the PyTorch benchmark.
      rm -rf /tmp/linkreduce-py &&
        python3 -m pip install --quiet --no-index --no-deps --target /tmp/linkreduce-py stage/wheels/linkreduce-*.whl
      torchrun=(env PYTHONPATH=/tmp/linkreduce-py python3 -m torch.distributed.run --nproc-per-node 2)
      run python-tests "${TEST_TIMEOUT:-600}" "${torchrun[@]}" python/tests/test_torch_gpu.py
      run python-kill 120 "${torchrun[@]}" python/tests/test_torch_gpu.py --kill
      run python-bench "${BENCH_TIMEOUT:-900}" "${torchrun[@]}" -m linkreduce.bench ;;
    tune) run tune "${BENCH_TIMEOUT:-900}" stage/linkreduce tune --tune-out "$out/tuning.json" --sizes "$sizes" ${BENCH_ARGS:-} ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
done
exit $status
