#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), from anywhere in the repo, before a GPU session:
#
#   bash benchmarks/gpu/fetch_wheels.sh
#
# Downloads into .whl/ (git-ignored; name it in the device call's `carry`) the wheels the GPU
# machine lacks: its python3 (3.12, torch 2.11) has no omegaconf, and its timm may differ from
# ours, on which every encoder is built. Versions: those of .venv, so the GPU runs the library
# versions the CPU tests pass with. omegaconf >= 2.4 needs only PyYAML (there already); older
# ones also need antlr4-python3-runtime 4.9, an sdist, built into a wheel here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
version() {  # installed version of $1, else the default $2
    "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"
}
OMEGACONF=$(version omegaconf 2.4.0)
TIMM=$(version timm 1.0.31)

mkdir -p .whl
rm -f .whl/*.whl  # exactly one version of each: two stop the install there
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "omegaconf==$OMEGACONF" "timm==$TIMM"
if unzip -p .whl/omegaconf-*.whl '*/METADATA' | grep -q '^Requires-Dist: antlr4-python3-runtime'; then
    "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps -w .whl 'antlr4-python3-runtime==4.9.3'
fi
# What they need beyond themselves; the GPU image has PyYAML, torch, torchvision,
# huggingface_hub and safetensors (/work/.library/device/KINDS.md).
for w in .whl/*.whl; do
    echo "$(basename "$w"): $(unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
        | sed 's/Requires-Dist: //' | paste -sd, -)"
done
du -sh .whl
