#!/usr/bin/env bash
# ARR at real shapes on one GPU, in one call of under 8 minutes: step time, SFT tokens/s, peak
# torch.cuda.max_memory_allocated and MFU (against --peak-tflops, the GPU's dense bf16 peak; 989 for an
# H100/H200 SXM) for sft, arr and arr-copy, at the Qwen2.5-1.5B and -7B shapes (random weights, 1 x 512
# tokens): bf16 base weights + gradient checkpointing, then QLoRA (NF4) when bitsandbytes is importable.
# Needs torch (CUDA), transformers, peft, accelerate, pyyaml, safetensors; not the model or data packages
# (--synthetic token rows). Wheels of anything missing can be put in .whl/ (installed to /tmp/site first).
# Usage: bash benchmarks/gpu.sh [OUT_DIR]     (results: OUT_DIR/gpu_*.json and the printed tables)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/arrtune-gpu}}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
peak="${PEAK_TFLOPS:-989}"
common=(--synthetic --precisions bf16 --batch-size 1 --max-length 512 --steps 3 --peak-tflops "$peak")
timeout 300 python3 benchmarks/overhead.py "${common[@]}" --models qwen2.5-1.5b-shape qwen2.5-7b-shape \
  --weights bf16 --checkpointing on --methods sft arr arr-copy --json "$out/gpu_bf16.json"
if python3 -c "import bitsandbytes" 2> /dev/null; then
  timeout 180 python3 benchmarks/overhead.py "${common[@]}" --models qwen2.5-1.5b-shape qwen2.5-7b-shape \
    --weights nf4 --checkpointing on --methods sft arr --json "$out/gpu_nf4.json"
else
  echo "bitsandbytes not importable: no QLoRA rows (put its wheel in .whl/)"
fi
