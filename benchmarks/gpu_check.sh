#!/usr/bin/env bash
# The GPU path, checked on a machine with a CUDA GPU (docs/scale.md):
#   1. the unit tests marked `gpu` (training, validation and embedding on the device, equal to
#      the CPU to float rounding; the node config's device);
#   2. the local-training throughput benchmark, scfedvi against scvi-tools, both on the GPU
#      (benchmarks/bench_training.py --accelerator gpu; same architecture, optimizer, epochs).
# Prints both and writes benchmark-out/gpu_check/{pytest.txt,bench_training_gpu.json}.
# Usage: bash benchmarks/gpu_check.sh [extra bench_training.py options, e.g. --epochs 4]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT_DIR:-benchmark-out/gpu_check}
mkdir -p "$OUT"
"$PY" - <<'PYEOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; nothing to check")
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PYEOF
echo "== pytest -m gpu"
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.txt"
echo "== bench_training.py --accelerator gpu"
"$PY" benchmarks/bench_training.py --accelerator gpu --no-floor --threads 1 \
  --out "$OUT/bench_training_gpu.json" "$@" 2>&1 | tee "$OUT/bench_training.txt"
echo "gpu_check: done; outputs in $OUT/"
