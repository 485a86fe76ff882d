#!/usr/bin/env bash
# The GPU machine's one command for bench/gpu.py (see its docstring). No network there: the packages it lacks
# (diffusers) travel as wheels in .whl (ignored by git, carried by the run), installed to /tmp/site. Writes the
# report and the log to $OUT (runs/ when unset). Extra arguments go to bench/gpu.py. The wheel, made here first:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl "diffusers==$(python3 -c
#         'import diffusers; print(diffusers.__version__)')"
# Then, on the GPU machine, from the repository root:
#     bash bench/gpu_run.sh
set -euo pipefail
OUT=${OUT:-runs}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L || true
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
PYTHONUNBUFFERED=1 python3 bench/gpu.py --device cuda --out "$OUT/gpu.md" "$@" 2>&1 | tee "$OUT/gpu.log"
