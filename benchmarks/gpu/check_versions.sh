#!/usr/bin/env bash
# The CPU test suite under the GPU machine's versions (Python 3.12, torch 2.11, torchvision 0.26,
# and the omegaconf/timm wheels that fetch_wheels.sh puts in .whl/), here, with no device time:
# an API our pins (torch 2.14.1) have and 2.11 lacks fails here instead of in a device call.
#
#   bash benchmarks/gpu/check_versions.sh [pytest args]      (from the repo root)
#
# The venv (VENV, default ../venv-gpu-versions, beside the checkout) costs a one-time download
# of about 4.7 GB from PyPI (torch's CUDA build); later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-../venv-gpu-versions}
PY312=${PY312:-$(command -v python3.12 || true)}
[ -n "$PY312" ] || { echo "check_versions: no python3.12 here (set PY312=/path/to/python3.12)" >&2; exit 2; }
ls .whl/*.whl >/dev/null 2>&1 || bash benchmarks/gpu/fetch_wheels.sh
if [ ! -x "$VENV/bin/python" ]; then
    "$PY312" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.11.0 torchvision==0.26.0
    # The project's other needs, by name: `pip install -e .` would pull torch 2.14.1 (our pin).
    "$VENV/bin/pip" install --quiet --disable-pip-version-check .whl/*.whl tqdm tensorboard matplotlib \
        numpy pillow pytest pytest-xdist
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps mit-semseg==1.0.0
fi
"$VENV/bin/python" -c "import platform, torch, torchvision, timm, omegaconf; print('check_versions: python',
platform.python_version(), 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm',
timm.__version__, 'omegaconf', omegaconf.__version__)"
# The checkout on PYTHONPATH and the venv's bin first on PATH, as setup.sh does on the GPU machine
# (tests that start `python -m sceneparse` or torchrun then get this venv).
PYTHONPATH="$(pwd)" PATH="$(cd "$VENV/bin" && pwd):$PATH" OMP_NUM_THREADS=1 \
    "$VENV/bin/python" -m pytest -n 2 --dist loadfile -q -p no:cacheprovider "$@"
