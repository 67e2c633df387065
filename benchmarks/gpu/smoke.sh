#!/usr/bin/env bash
# Every CUDA-only code path, briefly (tests/test_gpu.py, plus tests/test_speed_paths.py whose CUDA
# graph test skips on CPU): run on the GPU machine from the repo root, e.g. through run.sh.
# Writes $OUT/smoke.log (the whole pytest output). Stops by itself at SMOKE_MAX_S seconds
# (default 330) or before GPU_DEADLINE, keeping 20 s for what follows.
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/setup.sh
limit=$(gpu_time_left 20)
[ "$limit" -gt "${SMOKE_MAX_S:-330}" ] && limit=${SMOKE_MAX_S:-330}
echo "smoke: tests/test_gpu.py tests/test_speed_paths.py, at most ${limit} s"
# 4 processes share the GPU: the compile-heavy tests overlap instead of queueing.
timeout -s INT -k 15 "$limit" python3 -m pytest -q -n 4 --dist load -p no:cacheprovider -rA \
    tests/test_gpu.py tests/test_speed_paths.py 2>&1 | tee "$OUT/smoke.log" | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|error"
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && echo "smoke: stopped at its time limit (${limit} s)"
exit "$status"
