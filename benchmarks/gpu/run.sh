#!/usr/bin/env bash
# One device command = one call of this script, from the repo root:
#
#   bash benchmarks/gpu/run.sh STEP [STEP ...]
#
# STEPs, run in order: smoke (smoke.sh), 1 2 3 4 (bench.sh parts), camvid (camvid.sh). Set-up
# (setup.sh) runs once, and all steps share one deadline, 570 s after the start: a step that
# would overrun is cut short (bench rows measured so far are kept) or skipped, so the command
# ends inside the device's 600-s limit with its files in $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/setup.sh
status=0
for step in "$@"; do
    echo "=== $step: $(gpu_time_left) s left"
    case $step in
        smoke) bash benchmarks/gpu/smoke.sh || status=1 ;;
        camvid) bash benchmarks/gpu/camvid.sh || status=1 ;;
        1|2|3|4) bash benchmarks/gpu/bench.sh "$step" || status=1 ;;
        *) echo "run.sh: unknown step $step (smoke, 1, 2, 3, 4, camvid)" >&2; status=2 ;;
    esac
done
ls -la "$OUT"
exit $status
