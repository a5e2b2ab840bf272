"""The preference step against the SFT step on the same sequences: time (alternating rounds in one process) and peak
RSS (each kind in a fresh process).

P pairs make 2P rows of --seq tokens, each row a prompt (the first half, masked) and a completion. The kinds:

- sft: the project's SFT step (fused loss) on those 2P rows, the completions as targets;
- dpo: the DPO step: the reference pass without autograd (adapters off), then the policy's forward and backward
  over the 2P rows in one batch;
- dpo-precomputed: the DPO step with the reference's log-probabilities given (precompute_reference);
- simpo: the reference-free step;
- reference (not a step): the dpo step's reference pass alone, what it adds to an SFT step.

    python benchmarks/preference_step.py                          # shape small, 2 pairs x 256 tokens, fp32
    python benchmarks/preference_step.py --shape llama2-7b --pairs 1 --seq 128 --base-dtype nf4 --gc --rounds 2

Prints one JSON object: the median step time of each kind, its ratio to sft (goals: dpo <= 1.4, dpo-precomputed
<= 1.1), each kind's peak RSS (CUDA: allocated memory) above the model's, and the memory model's prediction
(memory.memory_breakdown).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch

from llama_lora.config import LlamaConfig
from llama_lora.lora import LoRASettings, apply_lora, mark_only_lora_as_trainable, reference_model
from llama_lora.loss import IGNORE_INDEX, default_loss_chunk, sequence_logps, token_loss_sum
from llama_lora.memory import GIB, memory_breakdown, peak_rss_bytes, reset_peak_rss
from llama_lora.plan import make_plan, native_precision
from llama_lora.preference import PreferenceSettings, score_pairs
from llama_lora.weights import build_model

KINDS = ("sft", "dpo", "dpo-precomputed", "simpo")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(args):
    torch.manual_seed(0)
    config = LlamaConfig.from_name(args.shape)
    plan = make_plan(args.device, args.precision, args.base_dtype)
    model = build_model(config, plan=plan, device=args.device, seed=0, gradient_checkpointing=args.gc)
    apply_lora(model, LoRASettings(args.lora_targets.split(","), args.lora_r, 2 * args.lora_r, 0.0), plan.lora_dtype)
    mark_only_lora_as_trainable(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (2 * args.pairs, args.seq), generator=g)
    ids[args.pairs :, : args.seq // 2] = ids[: args.pairs, : args.seq // 2]  # a pair shares its prompt
    labels = ids.clone()
    labels[:, : args.seq // 2] = IGNORE_INDEX
    return config, plan, model, ids.to(args.device), labels.to(args.device)


def make_step(kind: str, model, plan, ids, labels):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    dpo, simpo = PreferenceSettings(), PreferenceSettings(loss="simpo", beta=2.0)
    with torch.no_grad(), plan.autocast_context():
        reference = sequence_logps(model, ids, labels)[0] if kind == "dpo-precomputed" else None

    def step() -> float:
        if kind == "reference":  # not a step: the reference pass alone, as the dpo step runs it
            with torch.no_grad(), plan.autocast_context(), reference_model(model):
                return sequence_logps(model, ids, labels)[0].sum().item()
        with plan.autocast_context():
            if kind == "sft":
                loss_sum, n = token_loss_sum(model, ids, labels)
                loss = loss_sum / n
            else:
                scores = score_pairs(model, ids, labels, simpo if kind == "simpo" else dpo, reference=reference)
                loss = scores.losses.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def memory_of(args) -> dict:
    """One kind in this fresh process: the peak RSS of its steps above the RSS once the model is built."""
    config, plan, model, ids, labels = build(args)
    step = make_step(args.memory_of, model, plan, ids, labels)
    cuda = args.device.startswith("cuda")
    if cuda:  # device memory: the allocator's peak above the model's
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = peak_rss_bytes()
    for _ in range(2):
        step()
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    return {"kind": args.memory_of, "step_peak_above_model_gib": round((peak - base) / GIB, 4),
            "peak_gib": round(peak / GIB, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; each times one step of every kind in turn")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--base-dtype", default="auto")
    p.add_argument("--gc", action="store_true", help="gradient checkpointing")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-targets", default="wq,wv")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (peaks: the CUDA allocator's)")
    p.add_argument("--memory-of", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_of:
        print(json.dumps(memory_of(args)))
        return
    config, plan, model, ids, labels = build(args)
    steps = {kind: make_step(kind, model, plan, ids, labels) for kind in (*KINDS, "reference")}
    for step in steps.values():  # warm-up: one of each
        step()
    times: dict[str, list[float]] = {kind: [] for kind in steps}
    order = list(steps)
    for r in range(args.rounds):  # each round in another order: no kind always follows the same one
        for kind in order[r % len(order):] + order[: r % len(order)]:
            sync(args.device)
            t = time.perf_counter()
            steps[kind]()
            sync(args.device)
            times[kind].append(time.perf_counter() - t)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    flags = [a for a in sys.argv[1:] if a != "--memory-of"]
    memory = {}
    for kind in KINDS:
        out = subprocess.run([sys.executable, __file__, *flags, "--memory-of", kind], capture_output=True, text=True,
                             check=True).stdout
        memory[kind] = json.loads(out.strip().splitlines()[-1])["step_peak_above_model_gib"]
    chunk = default_loss_chunk(torch.device(args.device))
    predicted = {name: memory_breakdown(config, plan=plan, lora_targets=args.lora_targets.split(","),
                                        lora_r=args.lora_r, micro_batch=micro, seq_len=args.seq,
                                        gradient_checkpointing=args.gc, loss_chunk=chunk, pairs=pairs)["total"] / GIB
                 for name, micro, pairs in (("sft", 2 * args.pairs, False), ("dpo", args.pairs, True))}
    one_row_logits = args.seq * config.vocab_size * 4 / GIB
    print(json.dumps({
        "shape": args.shape, "pairs": args.pairs, "seq_len": args.seq, "precision": plan.precision,
        "base_dtype": plan.quantization or str(plan.linear_dtype).removeprefix("torch."), "gc": args.gc,
        "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "ratio_to_sft": {k: round(v / median["sft"], 3) for k, v in median.items()},
        "step_peak_above_model_gib": memory,
        "dpo_peak_minus_sft_gib": round(memory["dpo"] - memory["sft"], 4),
        "one_sequence_fp32_logits_gib": round(one_row_logits, 4),
        "predicted_total_gib": {k: round(v, 3) for k, v in predicted.items()},
        "device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "cpu_native_bf16": native_precision("cpu")[0] == "bf16-mixed", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(), "rounds": args.rounds}))


if __name__ == "__main__":
    main()
