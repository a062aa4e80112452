#!/usr/bin/env bash
# The GPU check of the cohort engine (issue 11), one script, under 6 minutes on one H100 / H200.
#
# For a bare GPU machine with python3, torch (CUDA), transformers and peft, but no opacus:
# opacus is installed from the wheel carried in .whl/ (pip download --no-deps opacus==1.6.0 -d .whl).
# Runs the `gpu` tests and the anchor benchmark (SmolLM2-135M shape, random weights, LoRA r=8 on every
# linear layer of all 30 blocks, seq 128, bf16 autocast, cohorts 8 / 32 / 64) and writes to $OUT
# (default results/gpu-check): env.txt, pytest-gpu.txt, bench-anchor.txt, nvidia-smi.txt.
#
#   bash simulations/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
start=$(date +%s)

if ! python3 -c "import opacus" 2>/dev/null; then
  if ! ls .whl/opacus-*.whl >/dev/null 2>&1; then
    echo "gpu_check: opacus is missing and no wheel in .whl/ (pip download --no-deps opacus==1.6.0 -d .whl)" >&2
    exit 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site \
    .whl/opacus-*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/gpu-check-site"
fi

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import platform, torch, transformers, peft, opacus
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}, opacus {opacus.__version__}")
print("cuda available:", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY

echo "== pytest -m gpu"
timeout 150 python3 -m pytest tests/simulations/test_engine_gpu.py -m gpu -q -p no:cacheprovider -rs 2>&1 \
  | tee "$OUT/pytest-gpu.txt"
tests_rc=${PIPESTATUS[0]}

echo "== fedpersona bench engine --preset anchor"
timeout 270 python3 -m fedpersona.cli bench engine --preset anchor 2>&1 | tee "$OUT/bench-anchor.txt"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
