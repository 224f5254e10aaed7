#!/usr/bin/env bash
# One script for a machine with an NVIDIA GPU (under 8 minutes): install, run the GPU-marked
# tests (bf16 autocast, compile, fused AdamW, SDPA flash), then GPT-2 124M training tokens/s and
# MFU against the GPU's dense bf16 peak (pass it as PEAK_TFLOPS; default 989 = H100/H200 SXM).
#   bash benchmarks/gpu_check.sh            # results: benchmarks/results/gpt2_mfu*.json
# On a machine with no package index (an offline GPU box with its own PyTorch), set
# FROMZERO_PYTHON=python3: the script then skips `make setup` and runs from src/ with that
# interpreter's packages. If OUT is set, the JSON results are copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [[ -n "${FROMZERO_PYTHON:-}" ]]; then
  PY="$FROMZERO_PYTHON"
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  make setup
  PY=.venv/bin/python
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
PEAK="${PEAK_TFLOPS:-989}"
"$PY" benchmarks/gpt2_mfu.py --steps 30 --batch 12 --peak-tflops "$PEAK" --no-compile --out benchmarks/results/gpt2_mfu_eager.json
"$PY" benchmarks/gpt2_mfu.py --steps 30 --batch 12 --peak-tflops "$PEAK" --out benchmarks/results/gpt2_mfu.json
"$PY" benchmarks/gpt2_mfu.py --steps 20 --batch 32 --peak-tflops "$PEAK" --out benchmarks/results/gpt2_mfu_b32.json
if [[ -n "${OUT:-}" ]]; then cp benchmarks/results/gpt2_mfu*.json "$OUT/"; fi
