#!/usr/bin/env bash
# ARR at real shapes on one GPU, in one call of under 8 minutes: step time, SFT tokens/s, peak
# torch.cuda.max_memory_allocated and MFU (against PEAK_TFLOPS, the GPU's dense bf16 peak; 989 for an
# H100/H200 SXM) of sft, arr-default (method: arr as it trains by default), arr (replay_ratio 1, the KL on
# every row) and arr-copy (arr with a separate frozen copy as the reference), at the Qwen2.5-1.5B and -7B
# shapes (random weights built on the GPU, 1 x 512 tokens): bf16 base weights + gradient checkpointing, then
# QLoRA (NF4 base) when bitsandbytes is importable.
#
# Needs torch (CUDA), transformers, peft, accelerate, pyyaml, safetensors; not the model or data packages
# (--synthetic token rows). A machine without internet gets the versions arrtune is tested with from
# wheels in .whl/ (GPU_WHEELS), which `bash benchmarks/gpu_wheels.sh` downloads (on a machine with PyPI)
# and this script installs to /tmp/site first.
#
# Usage: bash benchmarks/gpu.sh [OUT_DIR]    (OUT_DIR/gpu_bf16.json, gpu_nf4.json, gpu.log: the printed tables)
# Each stage has its own time limit; a stage stopped by it still prints and saves the rows it measured, and
# the next stage runs. GPU_MODELS replaces the two shapes (tests run this script end to end on a CPU with
# GPU_MODELS=tiny-shape).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/arrtune-gpu}}"
mkdir -p "$out"
exec > >(tee "$out/gpu.log") 2>&1
wheels="${GPU_WHEELS:-.whl}"
if compgen -G "$wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
    || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null || echo "no nvidia-smi"
python3 -c "import importlib.metadata as m, torch; print('cuda', torch.cuda.is_available(), *(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'peft', 'accelerate')))" \
  || { echo "torch/transformers/peft missing: see benchmarks/gpu_wheels.sh"; exit 1; }
if [[ -z "${GPU_MODELS:-}" ]] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device: the real shapes are for a GPU (GPU_MODELS=tiny-shape checks this script on a CPU)"; exit 1
fi
read -r -a models <<< "${GPU_MODELS:-qwen2.5-1.5b-shape qwen2.5-7b-shape}"
common=(--synthetic --precisions bf16 --batch-size 1 --max-length 512 --steps 3 --peak-tflops "${PEAK_TFLOPS:-989}"
        --models "${models[@]}" --checkpointing on)
status=0
timeout "${BF16_LIMIT_S:-200}" python3 benchmarks/overhead.py "${common[@]}" --weights bf16 \
  --methods sft arr-default arr arr-copy --json "$out/gpu_bf16.json" || { status=$?; echo "bf16 stage: exit $status"; }
if python3 -c "import bitsandbytes" 2> /dev/null; then
  timeout "${NF4_LIMIT_S:-240}" python3 benchmarks/overhead.py "${common[@]}" --weights nf4 \
    --methods sft arr-default arr --json "$out/gpu_nf4.json" || { status=$?; echo "nf4 stage: exit $status"; }
else
  echo "bitsandbytes not importable: no QLoRA rows (see benchmarks/gpu_wheels.sh)"
  status=1
fi
exit "$status"
