#!/usr/bin/env bash
# The GPU check of the cohort engine (issue 11), one script, under 6 minutes on one H100 / H200.
#
# For a bare GPU machine with python3, torch (CUDA), transformers and peft, but no opacus:
# what is missing is installed from the wheels carried in .whl/ (Python 3.12, manylinux x86_64):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     -d .whl opacus==1.6.0 opt-einsum==3.4.0 scipy==1.17.1 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
# (the engine needs opacus alone; the device path's test also needs scipy and cryptography).
# Runs the `gpu` tests (the engine's, then the sequential device path's: a DP round and a reply with a
# bfloat16 base on CUDA) and the anchor benchmark (SmolLM2-135M shape, random weights, LoRA r=8 on every
# linear layer of all 30 blocks, seq 128, bf16 autocast, cohorts 8 / 32 / 64) and writes to $OUT
# (default results/gpu-check): env.txt, pytest-gpu.txt, pytest-gpu-device.txt, bench-anchor.txt, nvidia-smi.txt.
#
#   bash simulations/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
start=$(date +%s)

# Each missing module from its wheel in .whl/ (same name), all in one install.
wheels=() missing=()
for mod in opacus opt_einsum scipy cryptography cffi pycparser; do
  python3 -c "import $mod" 2>/dev/null && continue
  if ls .whl/"$mod"-*.whl >/dev/null 2>&1; then wheels+=(.whl/"$mod"-*.whl); else missing+=("$mod"); fi
done
if [ ${#wheels[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site \
    "${wheels[@]}" || exit 1
  export PYTHONPATH="$PWD:/tmp/gpu-check-site"
fi
if [[ " ${missing[*]} " == *" opacus "* ]]; then
  echo "gpu_check: opacus is missing and no wheel in .whl/ (see the pip download line at the top)" >&2
  exit 1
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

echo "== pytest -m gpu (the sequential device path)"
if [ ${#missing[@]} -eq 0 ]; then
  timeout 90 python3 -m pytest tests/client/test_device_gpu.py -m gpu -q -p no:cacheprovider -rs 2>&1 \
    | tee "$OUT/pytest-gpu-device.txt"
  device_rc=${PIPESTATUS[0]}
else
  echo "gpu_check: device-path gpu test not run: missing ${missing[*]} (no wheel in .whl/)" | tee "$OUT/pytest-gpu-device.txt"
  device_rc=1
fi

echo "== fedpersona bench engine --preset anchor"
timeout 270 python3 -m fedpersona.cli bench engine --preset anchor 2>&1 | tee "$OUT/bench-anchor.txt"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc, device tests rc=$device_rc, bench rc=$bench_rc, $(( $(date +%s) - start )) s" \
  | tee -a "$OUT/env.txt"
[ "$tests_rc" -eq 0 ] && [ "$device_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
