#!/usr/bin/env bash
# GPU check, prepared for the lent H200 machine (one call, a few minutes of device time):
#   device run: bash benchmarks/gpu_check.sh
# That machine has torch + transformers + the CPU build of onnxruntime, not onnxruntime-gpu (its
# wheel exceeds what can be carried there), and no network: the repository runs from source on
# PYTHONPATH (its torch pin does not apply there) and the model is MiniLM's shape with random
# weights. Results land in $OUT/gpu.jsonl (or benchmarks/results/ when $OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
export PYTHONPATH="$PWD:$PWD/runtime${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY'
import torch, onnxruntime as ort
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("onnxruntime", ort.__version__, ort.get_available_providers())
PY
python3 -m doe_export.bench.gpu --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu.log"
