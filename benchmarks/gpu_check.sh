#!/usr/bin/env bash
# One prepared GPU run (about 6 minutes on an H200): the 7B LoRA step under each precision setting, each in its own
# process for a clean peak, then the real fit.py on the 7B recipe for a few steps. Random weights: memory and time
# are those of LLaMA-2 7B, the loss is not. Writes JSON lines and logs to $OUT (default: bench_results/).
#   bash benchmarks/gpu_check.sh               (on a GPU machine, in the repo root)
#   SHAPE=small DEVICE=cpu STEPS=2 bash benchmarks/gpu_check.sh   (dry run of every command on a CPU)
set -u
OUT=${OUT:-bench_results}; mkdir -p "$OUT"
SHAPE=${SHAPE:-llama2-7b}; DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-8}
ASSETS=${ASSETS:-${LLAMA_LORA_TEST_ASSETS:-../shared/assets}}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
J="$OUT/gpu_steps.jsonl"
date -u +"date: %Y-%m-%dT%H:%MZ"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"

step() {  # label, then bench_step.py arguments
  local label=$1; shift
  echo "== $label"
  python3 benchmarks/bench_step.py --shape "$SHAPE" --device "$DEVICE" --batch 4 --seq 512 --json "$J" "$@" \
    || echo "{\"cell\": \"$label\", \"failed\": true}" >> "$J"
}
PART=${PART:-all}  # all | compile (only the torch.compile cells and fit.py) | partial-gc (see below)
if [ "$PART" = partial-gc ]; then
# Partial checkpointing under compile: recompute only the first N of the 32 blocks, looking for >= 40% MFU within
# 16 GB (full GC + compile: 13.59 GiB, 35.4%; no GC + compile: 19.34 GiB, 52.9%). Not yet run on a GPU.
for n in 24 20 16 12; do
  step "fp16 base + 16-mixed + compile + GC on $n blocks" --base-dtype fp16 --amp fp16 --gc-layers "$n" --compile \
    --warmup 3 --steps "$STEPS"
done
exit 0
fi
if [ "$PART" = all ]; then
# The optimisation goal: half-precision frozen base, fp32 LoRA, 16-mixed, gradient checkpointing, micro-batch 4x512.
step "fp16 base + 16-mixed + GC" --base-dtype fp16 --amp fp16 --gc --steps "$STEPS"
step "fp16 base + 16-mixed"      --base-dtype fp16 --amp fp16 --steps "$STEPS"
step "bf16 base + bf16-mixed + GC" --base-dtype bf16 --amp bf16 --gc --steps "$STEPS"
# The seed experiment's two cells: fp32 weights without AMP, and fp32 weights under fp16 autocast (its 39 GB).
step "fp32 base, no AMP (seed MP off)"  --base-dtype fp32 --amp off --steps 3
step "fp32 base + 16-mixed (seed MP on)" --base-dtype fp32 --amp fp16 --steps 3
fi
# torch.compile of each block; three warmup steps absorb the compilation.
step "fp16 base + 16-mixed + GC + compile" --base-dtype fp16 --amp fp16 --gc --compile --warmup 3 --steps "$STEPS"
step "fp16 base + 16-mixed + compile"      --base-dtype fp16 --amp fp16 --compile --warmup 3 --steps "$STEPS"

echo "== fit.py, configs/lora_amp.yaml, random 7B weights, alpaca_5000 with the LLaMA-2 tokenizer"
python3 scripts/fit.py --config configs/lora_amp.yaml --model.model "$SHAPE" --model.checkpoint_dir null \
  --trainer.accelerator "$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)" --trainer.max_steps "$STEPS" \
  --trainer.val_check_interval "$STEPS" --trainer.limit_val_batches 4 --trainer.log_every_n_steps 1 \
  --data.data_path "$ASSETS/alpaca_5000.json" --data.tokenizer_path "$ASSETS/tokenizer.model" \
  --trainer.logger.init_args.save_dir "$OUT/logs" 2>&1 | grep -v "^\s*$" | tail -25
