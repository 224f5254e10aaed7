#!/usr/bin/env bash
# One script for a machine with an NVIDIA GPU (under 8 minutes): install, run the GPU-marked
# tests (bf16 autocast, compile, fused AdamW, SDPA flash), then GPT-2 124M training tokens/s and
# MFU against the GPU's dense bf16 peak (pass it as PEAK_TFLOPS; default 989 = H100/H200 SXM).
#   bash benchmarks/gpu_check.sh            # results: benchmarks/results/gpt2_mfu.json
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
make setup
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
.venv/bin/python -m pytest -q -m gpu tests/gpu
.venv/bin/python benchmarks/gpt2_mfu.py --steps 30 --batch 12 --peak-tflops "${PEAK_TFLOPS:-989}"
