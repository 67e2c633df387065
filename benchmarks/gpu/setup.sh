# Source at the start of every device command, from the repo root:  . benchmarks/gpu/setup.sh
#
# Every call may land on a fresh machine (one goes back 30 s after a command), so this is quick
# and idempotent. It installs the wheels carried in .whl/ (benchmarks/gpu/fetch_wheels.sh made
# them here; the call must name ".whl" in `carry`) into the machine's python3, puts this
# checkout on PYTHONPATH (no `pip install -e .`: our pyproject pins torch 2.14.1;
# the machine has torch 2.11 and Python 3.12, and nothing can be fetched there) and a
# `sceneparse` command on PATH, prints the versions and the GPU, and sets GPU_DEADLINE: the
# epoch second by which the scripts of this command must be done (570 s after the first
# `source`, inside the device's 600-s limit; export it earlier to choose).
REPO=$(pwd)
export GPU_DEADLINE=${GPU_DEADLINE:-$(( $(date +%s) + 570 ))}
export OUT=${OUT:-/tmp/gpu-out}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ -z "${SCENEPARSE_GPU_SETUP:-}" ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-cache-dir \
            --find-links .whl .whl/*.whl 2>&1 | grep -v "^WARNING: Running pip as" || true
    else
        echo "setup: no .whl/ here: run benchmarks/gpu/fetch_wheels.sh and carry .whl" >&2
    fi
    mkdir -p /tmp/gpu-bin
    printf '#!/bin/sh\nPYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m sceneparse "$@"\n' "$REPO" \
        > /tmp/gpu-bin/sceneparse
    chmod +x /tmp/gpu-bin/sceneparse
    python3 - <<'PY'
import importlib, platform, torch
mods = {n: getattr(importlib.import_module(n), "__version__", "?") for n in ("torchvision", "timm", "omegaconf")}
print(f"setup: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}), " + ", ".join(f"{k} {v}" for k, v in mods.items()))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"setup: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"{torch.cuda.device_count()} device(s)")
else:
    print("setup: NO CUDA DEVICE VISIBLE")
import sceneparse.engine.train  # noqa: F401 - fails here, not mid-run, if something is missing
PY
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader \
        || echo "setup: nvidia-smi failed" >&2
    export SCENEPARSE_GPU_SETUP=1
fi
export PATH="/tmp/gpu-bin:$PATH"

# Seconds left before GPU_DEADLINE, minus $1 (a reserve for what must still run afterwards).
gpu_time_left() { echo $(( GPU_DEADLINE - $(date +%s) - ${1:-0} )); }
