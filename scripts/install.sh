#!/usr/bin/env bash
# Install milora into ./.venv: torch first (so no dependency pulls another build), then deepspeed built
# against it (it ships as an sdist), then the package with its test extras and bitsandbytes (4-bit bases).
#   TORCH_SPEC  torch requirement to install (default: torch==2.13.0, the CPU wheel on our dev machines;
#               on a GPU box use e.g. TORCH_SPEC="torch==2.11.0" with your CUDA index)
#   VENV        where to create the environment (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
$PIP "$TORCH_SPEC"
DS_BUILD_OPS=0 $PIP --no-build-isolation "deepspeed>=0.16"
$PIP -e ".[dev,quantization]"
"$VENV/bin/python" -c "import torch, transformers, peft, trl, milora; print('milora', milora.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__)"
