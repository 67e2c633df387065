#!/usr/bin/env bash
# Issue 4's benchmark in parts that each fit one device command, most important first:
#
#   bash benchmarks/gpu/bench.sh PART [PART ...]      (from the repo root, on the GPU machine)
#
#   1  resnet50dilated-ppm_deepsup: inference at batch 1 and 16; training steps at batch 16 on
#      512x512 crops; the same steps fed by the trainer's pipeline over CamVid (.data/camvid, or
#      CAMVID=DIR): 14 workers augmenting, then the set kept and augmented on the GPU; for the
#      end-to-end ratio.
#   2  hrnetv2-c1, resnet50-upernet, mobilenetv2dilated-c1_deepsup: inference at batch 1 and 16;
#      then ADE20K-sized JPEGs (benchmarks/make_ade_sized.py) feeding resnet50dilated-ppm_deepsup's
#      training step, augmented by 14 workers and on the GPU, and the pipeline alone.
#   3  resnet50dilated-ppm_deepsup with torch.compile (alone and with CUDA graphs), inference and
#      training: slow, every variant and shape compiles anew.
#   4  torch.compile + CUDA graphs for the three models of part 2.
#
# All at 512x512, 150 classes, random weights (speed does not depend on them), each variant next
# to fp32 eager in the same process. Per part: JSON reports (rewritten after every row, so a part
# cut short keeps what it measured) in /tmp/gpu-results/partN/, packed into
# $OUT/bench-partN.tgz with the logs after every run (so even a command the device stops keeps
# what was measured before), and the markdown table in $OUT/table-partN.md (printed at the end
# of the part). Each `sceneparse bench` run is stopped before GPU_DEADLINE (see setup.sh). Exit
# status 1 if a bench run failed (one stopped at its time limit does not count).
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/setup.sh
RESULTS=${RESULTS:-/tmp/gpu-results}  # packed into $OUT; unpack into benchmarks/results/ to commit
CAMVID=${CAMVID:-.data/camvid}
ADE_SAMPLES=${ADE_SAMPLES:-.data/ade20k_samples}  # copies of ../shared/data/ade20k_samples and
ADE_ODGT=${ADE_ODGT:-.data/ade20k_meta/training.odgt}  # ../shared/data/ade20k_meta/training.odgt
SIZE=(--num-classes 150 --size 512 512 --batch 16)
INFER=(--tasks latency,throughput --warmup 5 --iters 20 --repeats 3)
TRAIN=(--tasks train --warmup 5 --iters 10 --repeats 3)
OTHERS=(hrnetv2:c1 resnet50:upernet mobilenetv2dilated:c1_deepsup)
failed=0

# bench PART NAME ENCODER:DECODER ARGS...: one `sceneparse bench` run, stopped in time.
bench() {
    local part=$1 name=$2 model=$3
    shift 3
    local dir=$RESULTS/part$part limit
    limit=$(gpu_time_left 30)  # -k 15 and the packing after it
    mkdir -p "$dir"
    if [ "$limit" -lt 45 ]; then
        echo "bench: no time left for $name (${limit} s)" | tee -a "$dir/skipped.txt"
        return 0
    fi
    echo "bench: part $part, $name, at most ${limit} s"
    timeout -s INT -k 15 "$limit" python3 -m sceneparse bench --encoder "${model%%:*}" --decoder "${model##*:}" \
        "$@" --json "$dir/$name.json" > "$dir/$name.log" 2>&1
    local status=$?
    # 124: stopped by SIGINT at the limit; 137: killed 15 s later (a compile that ignored it)
    if [ $status -eq 124 ] || [ $status -eq 137 ]; then
        echo "bench: $name stopped at its time limit; its JSON holds the rows measured"
    elif [ $status -ne 0 ]; then
        tail -5 "$dir/$name.log"
        failed=1
    fi
    grep -E "^(latency|throughput|train|data|eval)" "$dir/$name.log" || true
    pack "$part" quiet
}

part1() {
    bench 1 infer-resnet50dilated-ppm_deepsup resnet50dilated:ppm_deepsup "${SIZE[@]}" "${INFER[@]}" \
        --variants fp32+channels-last,bf16,bf16+channels-last,bf16+channels-last+cuda-graphs
    bench 1 train-resnet50dilated-ppm_deepsup resnet50dilated:ppm_deepsup "${SIZE[@]}" "${TRAIN[@]}" \
        --variants bf16,bf16+channels-last,fp16+channels-last
    if [ -d "$CAMVID" ]; then  # CamVid has 11 classes; the class count hardly changes the cost
        bench 1 train-data-resnet50dilated-ppm_deepsup resnet50dilated:ppm_deepsup \
            --num-classes 11 --size 512 512 --batch 16 --tasks train,train-data --warmup 5 --iters 10 \
            --repeats 3 --variants bf16+channels-last --data "$CAMVID" --workers 14
        # The same, augmented on the GPU from a GPU-resident training set (the CamVid recipe's way).
        bench 1 train-data-device-resnet50dilated-ppm_deepsup resnet50dilated:ppm_deepsup \
            --num-classes 11 --size 512 512 --batch 16 --tasks train,train-data --warmup 5 --iters 10 \
            --repeats 3 --variants bf16+channels-last --data "$CAMVID" --workers 0 --augment-on device --cache-in-memory
    else
        mkdir -p "$RESULTS/part1"
        echo "bench: no CamVid at $CAMVID (carry .data): no end-to-end training figure" | tee -a "$RESULTS/part1/skipped.txt"
    fi
}

part2() {
    for model in "${OTHERS[@]}"; do
        bench 2 "infer-${model/:/-}" "$model" "${SIZE[@]}" "${INFER[@]}" \
            --variants bf16+channels-last,bf16+channels-last+cuda-graphs
    done
    # End to end on ADE20K-sized JPEGs (real samples resized to sizes drawn from the real list):
    # the data pipeline alone, then feeding resnet50dilated-ppm_deepsup's training step; workers
    # augmenting, then workers decoding and the GPU augmenting.
    local limit
    limit=$(gpu_time_left 90)  # making the images, then at least one bench run after it
    mkdir -p "$RESULTS/part2"
    if [ "$limit" -lt 30 ]; then
        echo "bench: no time left for the ADE20K-sized runs" | tee -a "$RESULTS/part2/skipped.txt"
    elif [ -d "$ADE_SAMPLES" ] && [ -f "$ADE_ODGT" ]; then
        timeout -k 5 "$limit" python3 benchmarks/make_ade_sized.py "$ADE_SAMPLES" "$ADE_ODGT" /tmp/ade-sized --count 1024
        for where in workers device; do
            bench 2 "train-data-ade-$where-resnet50dilated-ppm_deepsup" resnet50dilated:ppm_deepsup \
                "${SIZE[@]}" --tasks data,train,train-data --warmup 5 --iters 10 --repeats 3 \
                --variants bf16+channels-last --data /tmp/ade-sized --data-kind ade20k --workers 14 \
                --augment-on "$where"
        done
    else
        echo "bench: no $ADE_SAMPLES or $ADE_ODGT (carry .data): no ADE20K-sized end-to-end figure" \
            | tee -a "$RESULTS/part2/skipped.txt"
    fi
}

part3() {
    bench 3 compile-infer-resnet50dilated-ppm_deepsup resnet50dilated:ppm_deepsup "${SIZE[@]}" "${INFER[@]}" \
        --variants bf16+channels-last+compile,bf16+channels-last+compile+cuda-graphs
    bench 3 compile-train-resnet50dilated-ppm_deepsup resnet50dilated:ppm_deepsup "${SIZE[@]}" "${TRAIN[@]}" \
        --variants bf16+channels-last+compile
}

part4() {
    for model in "${OTHERS[@]}"; do
        bench 4 "compile-infer-${model/:/-}" "$model" "${SIZE[@]}" "${INFER[@]}" \
            --variants bf16+channels-last+compile+cuda-graphs
    done
}

# pack PART [quiet]: the part's table and tarball into $OUT (quiet: without printing the table).
pack() {
    local part=$1 dir=$RESULTS/part$1
    [ -d "$dir" ] || return 0
    if ls "$dir"/*.json >/dev/null 2>&1; then
        python3 benchmarks/make_table.py "$dir"/*.json > "$OUT/table-part$part.md"
        [ "${2:-}" = quiet ] || cat "$OUT/table-part$part.md"
    fi
    tar czf "$OUT/bench-part$part.tgz" -C "$RESULTS" "part$part"
}

[ $# -gt 0 ] || { echo "usage: bench.sh PART [PART ...]   (parts 1-4, see the top of this file)" >&2; exit 2; }
for part in "$@"; do
    case $part in
        1|2|3|4) "part$part"; pack "$part" ;;
        *) echo "bench: unknown part $part" >&2; exit 2 ;;
    esac
done
exit $failed
