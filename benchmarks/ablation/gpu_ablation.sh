#!/usr/bin/env bash
# The 7B-shaped ablation grid on one GPU (random weights; memory and time are 7B's): 16 cells, 3 steps each,
# global batch 4 x 512 tokens (GA on: 1 x 4). About 5 minutes on an H200. Results land in $OUT (default ablation/).
set -u
OUT=${OUT:-ablation}; ASSETS=${ASSETS:-../shared/assets}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 scripts/ablate.py --model llama2-7b --device cuda --steps 3 --num_samples 32 --seq_len 512 \
  --data_path "$ASSETS/alpaca_5000.json" --tokenizer_path "$ASSETS/tokenizer.model" --out "$OUT/llama2-7b-h200"
