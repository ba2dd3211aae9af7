#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels benchmarks/gpu.sh installs on a GPU machine without internet:
# the transformers, peft and accelerate this checkout's venv runs (the versions the tests pass with), the
# regex transformers needs, and bitsandbytes (QLoRA rows). Python 3.12, Linux x86-64 (PYTHON_VERSION to change).
# Usage: bash benchmarks/gpu_wheels.sh [VENV_PYTHON]    (default .venv/bin/python; wheels go to .whl/)
set -euo pipefail
cd "$(dirname "$0")/.."
venv_python="${1:-.venv/bin/python}"
pins=$("$venv_python" -c "import importlib.metadata as m; print(*(f'{p}=={m.version(p)}' for p in ('transformers', 'peft', 'accelerate', 'bitsandbytes', 'regex')))")
rm -rf .whl && mkdir .whl
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
# shellcheck disable=SC2086  # pins is a list of requirements
"$venv_python" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
  --implementation cp "${platforms[@]}" -d .whl $pins
# bitsandbytes ships its kernels for every CUDA and ROCm release (43 MB); keep the CPU and CUDA 13 builds, which
# the GPU machine's torch (cu130) loads, so that the wheels and the checkout fit the 64 MiB a call carries
"$venv_python" - "${BNB_KEEP:-cuda13}" <<'PY'
import re, sys, zipfile
from pathlib import Path

keep = sys.argv[1]
for wheel in Path(".whl").glob("bitsandbytes-*.whl"):
    drop = re.compile(rf"bitsandbytes/libbitsandbytes_(?!cpu|{keep}).*\.so$")
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if drop.match(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(x for x in lines if not drop.match(x.split(",")[0])).encode()
            dst.writestr(item, data)
    slim.replace(wheel)
PY
ls -l .whl
du -sh .whl
