#!/usr/bin/env bash
# Reproduce the GPU table of docs/benchmarks.md on a machine with a CUDA GPU, from the repo root:
#
#   benchmarks/run_benchmarks.sh [OUT_DIR]          (default: benchmarks/results)
#
# Inference and evaluation of four CSAIL ADE20K models (150 classes, 512x512, batch 1 and 16) in
# fp32 eager and with bf16 autocast, channels-last, torch.compile and CUDA graphs (alone and
# combined); training of resnet50dilated-ppm_deepsup at batch 16 on 512x512 crops, also with real
# data loading from CamVid when it is present (CAMVID=path, default ../shared/data/camvid).
# Weights are random: speed does not depend on them. Every JSON report records the device, torch
# version, date and command; benchmarks/make_table.py turns them into the markdown table.
# Expect about an hour on one GPU: every torch.compile variant compiles anew per task and shape.
# For a time-limited session (device commands of at most 10 minutes), benchmarks/gpu/ measures
# the figures of issue 4 in parts instead: see the runbook in docs/benchmarks.md.
set -euo pipefail

OUT=${1:-benchmarks/results}
PYTHON=${PYTHON:-python}
CAMVID=${CAMVID:-../shared/data/camvid}
COMMON=(--num-classes 150 --size 512 512 --batch 16 --warmup 10 --iters 20 --repeats 5)
mkdir -p "$OUT"

for model in resnet50dilated:ppm_deepsup hrnetv2:c1 resnet50:upernet mobilenetv2dilated:c1_deepsup; do
    encoder=${model%%:*}
    decoder=${model##*:}
    "$PYTHON" -m sceneparse bench --encoder "$encoder" --decoder "$decoder" "${COMMON[@]}" \
        --tasks latency,throughput,eval --amp bf16 --channels-last --compile --cuda-graphs \
        --json "$OUT/infer-$encoder-$decoder.json"
done

# Training steps (forward, backward, SGD) at batch 16 on 512x512 crops.
"$PYTHON" -m sceneparse bench --encoder resnet50dilated --decoder ppm_deepsup "${COMMON[@]}" \
    --tasks train --amp bf16 --channels-last --compile \
    --json "$OUT/train-resnet50dilated-ppm_deepsup.json"

# The same steps fed by a real DataLoader (JPEG/PNG decoding, augmentation in 8 workers, pinned
# memory). CamVid has 11 classes; the class count hardly changes the cost.
if [ -d "$CAMVID" ]; then
    "$PYTHON" -m sceneparse bench --encoder resnet50dilated --decoder ppm_deepsup \
        --num-classes 11 --size 512 512 --batch 16 --warmup 10 --iters 20 --repeats 5 \
        --tasks train,train-data --amp bf16 --channels-last --data "$CAMVID" --workers 8 \
        --json "$OUT/train-data-resnet50dilated-ppm_deepsup.json"
else
    echo "CamVid not found at $CAMVID: skipping the train-data benchmark" >&2
fi

"$PYTHON" benchmarks/make_table.py "$OUT"/*.json | tee "$OUT/table.md"
