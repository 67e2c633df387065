#!/usr/bin/env bash
# CamVid from scratch (issue 5) on the GPU machine, in one device command (the call must carry
# .data, holding a copy of ../shared/data/camvid; see docs/benchmarks.md):
#
#   bash benchmarks/gpu/camvid.sh [key=value ...]    (overrides for `sceneparse train`;
#                                                     CONFIG=, CAMVID=, TIME_BUDGET_S= to change)
#
# Trains CONFIG (default configs/camvid/scratch_10min.yaml) on CAMVID (default .data/camvid),
# with train.time_budget_s lowered when the command's deadline needs it (the device stops a
# command at 600 s, set-up and evaluation included), then evaluates last.pt on val at 480x360:
# fp32, and bf16 + channels-last (the reduced-precision check on a trained model).
# Back in $OUT (8 files, the device's limit): camvid-train.log, metrics.jsonl, curves.png,
# eval/{report.json,confusion.png}, eval-bf16/report.json, and camvid.md (benchmarks/camvid_report.py).
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/setup.sh
CAMVID=${CAMVID:-.data/camvid}
CONFIG=${CONFIG:-configs/camvid/scratch_10min.yaml}
RUN=runs/gpu-camvid
[ -d "$CAMVID/train" ] || { echo "camvid: no CamVid at $CAMVID (copy ../shared/data/camvid to .data/, carry .data)" >&2; exit 2; }
budget=$(gpu_time_left 65)  # interpreter start-up, the final validation and save, two evaluations
[ "$budget" -gt "${TIME_BUDGET_S:-540}" ] && budget=${TIME_BUDGET_S:-540}
echo "camvid: $CONFIG on $CAMVID, train.time_budget_s=$budget"
start=$(date +%s)
# SIGTERM (should the budget overrun) makes the trainer finish its step (or validation) and save
# last.pt. --foreground: the signal goes to the trainer alone, not to its DataLoader workers too
# (killed mid-validation, they would take the final validation and save down with them).
timeout --foreground -s TERM -k 30 $((budget + 40)) python3 -m sceneparse train "$CONFIG" "data.root=$CAMVID" \
    "output_dir=$RUN" "train.time_budget_s=$budget" "$@" --overwrite > "$OUT/camvid-train.log" 2>&1
status=$?
train_s=$(( $(date +%s) - start ))
echo "camvid: training exited $status after $train_s s (interpreter start-up included)"
tr '\r' '\n' < "$OUT/camvid-train.log" | grep -vE "^train: +[0-9]+%" | tail -15
cp "$RUN/metrics.jsonl" "$RUN/curves.png" "$OUT/" 2>/dev/null
if [ -f "$RUN/last.pt" ]; then
    for mode in fp32 bf16; do
        extra=()
        [ "$mode" = bf16 ] && extra=(--amp bf16 --channels-last)
        out=$OUT/eval; [ "$mode" = bf16 ] && out=$OUT/eval-bf16
        left=$(gpu_time_left 5)  # each evaluation gets what the deadline leaves, the report 5 s
        if [ "$left" -lt 20 ]; then echo "camvid: $left s left, $mode evaluation skipped" >&2; continue; fi
        timeout -k 5 $(( left < 90 ? left : 90 )) python3 -m sceneparse eval --model "$RUN/last.pt" \
            --dataset camvid --data-root "$CAMVID" --split val --workers 8 --output "$out" "${extra[@]}" 2>&1 \
            | grep -E "mean IoU|images in"
    done
    rm -f "$OUT/eval-bf16/confusion.png"  # the device returns at most 8 files: keep the fp32 one
else
    echo "camvid: no last.pt" >&2
    status=1
fi
# The block for docs/camvid.md: iterations, speed, validations, per-class IoU (fp32 and bf16).
python3 benchmarks/camvid_report.py "$RUN" "$OUT/eval" "$OUT/eval-bf16" --wall-clock "$train_s" \
    --checkpoint "$RUN/last.pt" | tee "$OUT/camvid.md"
exit $status
