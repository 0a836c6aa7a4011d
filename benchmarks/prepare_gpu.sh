#!/usr/bin/env bash
# Prepare, here, what the GPU suite needs on the lent GPU machine (which has torch for CUDA 13 and the CPU build
# of onnxruntime only, no packages of ours and no network):
#   .gpu-ort/      onnxruntime-gpu 1.31.1 for H100/H200, ~60 MB (../shared/tools/ort-gpu/README.md)
#   .gpu-assets/   the packaged MiniLM tokenizer the random-weight models use (copied from the installed package)
# Both are git-ignored; send them with the command (device tool: carry [".gpu-ort", ".gpu-assets"]) and run
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .gpu-ort/ort.tar.xz ] || bash ../shared/tools/ort-gpu/make-kit.sh
mkdir -p .gpu-assets/tokenizer
python - <<'PY'
import shutil
from doe_export.loading import packaged_minilm_dir

folder = packaged_minilm_dir()
for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "config.json"):
    if (folder / name).is_file():
        shutil.copy(folder / name, ".gpu-assets/tokenizer/" + name)
print("tokenizer files in .gpu-assets/tokenizer:", sorted(p.name for p in __import__("pathlib").Path(".gpu-assets/tokenizer").iterdir()))
PY
du -sh .gpu-ort .gpu-assets
