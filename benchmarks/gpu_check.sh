#!/usr/bin/env bash
# The GPU suite on the lent H200 machine, as one command. Prepare here first: bash benchmarks/prepare_gpu.sh
# (it builds .gpu-ort/ and .gpu-assets/), then run with the device tool, carrying both folders:
#   command "bash benchmarks/gpu_check.sh", carry [".gpu-ort", ".gpu-assets"], timeout_s 540
# The machine runs the repository from source (Python 3.12, its own torch/transformers; our pins do not apply).
# Records land in $OUT/gpu.jsonl (or benchmarks/results/ when $OUT is unset) with the log beside them; the
# report and plot are rendered there when matplotlib is present, else here: doe bench --suite gpu --render-only.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
. .gpu-ort/device-env.sh
python3 - <<'PY'
import torch, onnxruntime as ort
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("onnxruntime", ort.__version__, ort.get_available_providers())
PY
python3 -m doe_export.cli bench --suite gpu --out "$OUT_DIR" --work-dir /tmp/doe-gpu \
  --gpu-tokenizer-dir .gpu-assets/tokenizer --no-progress "$@" 2>&1 | tee "$OUT_DIR/gpu.log"
