"""Time the LoRA training step: r=8 on wq and wv (--lora-r, --lora-targets), random weights, the run plan of
--precision and --base-dtype (auto: the device's native precision; NF4: --base-dtype nf4), fp32 LoRA.

    python benchmarks/bench_step.py                       # shapes small and llama2-7b, each in its own process
    python benchmarks/bench_step.py --shape small --steps 10
    python benchmarks/bench_step.py --shape small --steps 10 --dora   # DoRA at the same rank: against the line above
    python benchmarks/bench_step.py --write-meta /tmp/llama7b   # write a random bf16 7B Meta checkpoint (13 GB)
    python benchmarks/bench_step.py --shape llama2-7b --checkpoint /tmp/llama7b   # time load-to-ready too
    python benchmarks/bench_step.py --checkpoint /tmp/llama7b --load-only --base-dtype bf16   # peak RSS of loading

Prints one JSON object per shape: tokens/s, step time and peak RSS (and CUDA peak memory on GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from llama_lora.config import LlamaConfig
from llama_lora.lora import LoRASettings, apply_lora, mark_only_lora_as_trainable, trainable_summary
from llama_lora.loss import token_loss_sum
from llama_lora.memory import GIB, peak_rss_bytes
from llama_lora.memory import matmul_params as _matmul_params
from llama_lora.plan import DTYPES, make_plan, native_precision
from llama_lora.weights import build_model, save_meta

SHAPES = {"small": (4, 256), "llama2-7b": (1, 128), "llama2-70b": (1, 512),  # (micro-batch, tokens)
          "mistral-7b-v0.3": (1, 128), "qwen2.5-7b": (1, 128), "qwen3-8b": (1, 128), "qwen3-0.6b": (1, 128)}
DEFAULT_SHAPES = ("small", "llama2-7b")  # without --shape; 70B only when asked for (QLoRA on a GPU)


def lora_step_flops(config: LlamaConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one LoRA step (frozen base): forward 2N and input-gradient backward 2N per token for the matmul
    weights (no weight gradients), plus attention scores and values (12 * layers * dim * seq per token, PaLM's count).
    Recomputation from gradient checkpointing is not counted, so this gives MFU, not hardware utilisation."""
    return batch * seq * (4 * _matmul_params(config) + 12 * config.n_layers * config.dim * seq)


def recompute_flops(config: LlamaConfig, batch: int, seq: int, layers: int) -> float:
    """The forward FLOPs gradient checkpointing repeats: ``layers`` blocks' matmuls and attention, once more."""
    block = (_matmul_params(config) - config.vocab_size * config.dim) // config.n_layers
    return batch * seq * layers * (2 * block + 4 * config.dim * seq)


def matmul_gflops(dtype: torch.dtype, tokens: int, device: torch.device, seconds: float = 1.0) -> float:
    """The rate of a 4096 x 4096 weight times ``tokens`` rows in ``dtype`` on this machine, now, over at least
    ``seconds`` of repeated matmuls: the roofline the step is compared with. ``run_shape`` measures it after every step
    of the run, so a machine whose speed drifts (a shared VM: 62-110 GFLOP/s within a minute on 2 AVX2 EPYC cores) is
    compared with itself at the same time, not with one short sample."""
    w, x = torch.randn(4096, 4096, dtype=dtype, device=device), torch.randn(tokens, 4096, dtype=dtype, device=device)
    x @ w.T
    n, t = 0, time.perf_counter()
    while True:
        x @ w.T
        n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        if time.perf_counter() - t >= seconds:
            return 2 * 4096 * 4096 * tokens * n / (time.perf_counter() - t) / 1e9


def peak_rss_gib() -> float:
    return peak_rss_bytes() / GIB


def run_shape(args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = LlamaConfig.from_name(args.shape)
    plan = make_plan(device, args.precision, args.base_dtype)
    plan.log()
    batch, seq = (args.batch, args.seq) if args.batch else SHAPES[args.shape]
    t0 = time.perf_counter()
    model = build_model(config, checkpoint=args.checkpoint, plan=plan, device=device, seed=0,
                        gradient_checkpointing=args.gc or args.gc_layers is not None,
                        checkpoint_layers=args.gc_layers)
    apply_lora(model, LoRASettings(args.lora_targets.split(","), args.lora_r, 2 * args.lora_r, 0.0,
                                   use_dora=args.dora), plan.lora_dtype)
    mark_only_lora_as_trainable(model)
    if args.compile:
        model.compile_blocks()
    ready_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, config.vocab_size, (args.steps + args.warmup, batch, seq), generator=g).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=plan.precision == "16-mixed")
    times, rates = [], []
    roofline = args.gc or args.gc_layers is not None
    before = [matmul_gflops(plan.compute_dtype, batch * seq, device) for _ in range(3)] if roofline else []
    for i in range(args.warmup + args.steps):
        x = data[i]
        labels = x.clone()
        labels[:, 0] = -100  # every later position is a target: (B, T) labels predict from positions < t
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with plan.autocast_context():
            # The training loss of the project: output layer and fp32 cross-entropy in chunks, recomputed in backward.
            loss_sum, n = token_loss_sum(model, x, labels)
            loss = loss_sum / n
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            if roofline:  # the matmul's rate right after each step: the same machine state as the step's
                rates.append(matmul_gflops(plan.compute_dtype, batch * seq, device))
        if i == 0:
            first_step_s = time.perf_counter() - t
    step_s = sorted(times)[len(times) // 2]
    result = {
        "shape": args.shape, "micro_batch": batch, "seq_len": seq, "device": str(device),
        "base_dtype": plan.quantization or str(plan.linear_dtype).removeprefix("torch."), "precision": plan.precision,
        "plan": plan.to_dict(), "cpu_native_bf16": native_precision("cpu")[0] == "bf16-mixed",
        "gradient_checkpointing": args.gc or args.gc_layers is not None, "checkpoint_layers": args.gc_layers,
        "compile": args.compile, "dora": args.dora,
        "lora": trainable_summary(model), "steps": args.steps, "median_step_s": round(step_s, 4),
        "tokens_per_s": round(batch * seq / step_s, 1), "peak_rss_gib": round(peak_rss_gib(), 3),
        "model_tflops_per_s": round(lora_step_flops(config, batch, seq) / step_s / 1e12, 2),
        "ready_s": round(ready_s, 2), "first_step_s": round(first_step_s, 2), "final_loss": round(loss.item(), 4),
        "checkpoint": str(args.checkpoint) if args.checkpoint else "random init",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
    }
    if roofline:  # what the step computes, recomputation included, against a matmul's rate
        layers = config.n_layers if args.gc_layers is None else args.gc_layers
        done = lora_step_flops(config, batch, seq) + recompute_flops(config, batch, seq, layers)
        # Each step against the matmul timed right after it, and the best step against the best matmul window (those
        # and three before the first step): a shared machine's noise only ever slows either, so the best of each is
        # its truest rate.
        shares = [done / s / 1e9 / r for s, r in zip(times, rates)]
        result.update(step_gflops_with_recompute=round(done / step_s / 1e9, 1),
                      matmul_gflops=round(statistics.median(rates), 1),
                      matmul_gflops_each=[round(r, 1) for r in rates],
                      fraction_of_matmul_rate=round(statistics.median(shares), 3),
                      fraction_each=[round(f, 3) for f in shares],
                      matmul_gflops_before=[round(r, 1) for r in before],
                      fraction_best_of_best=round(done / min(times) / 1e9 / max(rates + before), 3))
    if device.type == "cuda":
        result["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["cuda_max_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        result["gpu"] = torch.cuda.get_device_name()
        result["mfu"] = round(result["model_tflops_per_s"] / args.peak_tflops, 4)
        result["peak_tflops"] = args.peak_tflops
    return result


def load_only(args) -> dict:
    """Load a checkpoint and read every weight once (as the first step does): the peak RSS of loading, split into
    anonymous memory (copies) and file pages (the memory-mapped checkpoint)."""
    t0 = time.perf_counter()
    plan = make_plan("cpu", args.precision, args.base_dtype)
    model = build_model(checkpoint=args.checkpoint, plan=plan)
    ready_s, ready_peak = time.perf_counter() - t0, peak_rss_gib()
    with torch.no_grad():  # then read every weight (dequantizing an NF4 one whole: a transient the step never has)
        for p in model.parameters():
            (p.dequantize() if hasattr(p, "dequantize") else p).float().sum()
    status = {line.split(":")[0]: int(line.split()[1]) / 2**20 for line in open("/proc/self/status")
              if line.startswith(("RssAnon", "RssFile"))}
    return {"checkpoint": str(args.checkpoint), "ready_s": round(ready_s, 2),
            "ready_peak_rss_gib": round(ready_peak, 2), "peak_rss_gib": round(peak_rss_gib(), 2),
            "rss_anon_gib": round(status["RssAnon"], 2), "rss_file_gib": round(status["RssFile"], 2),
            "base_dtype": plan.quantization or str(plan.linear_dtype), "torch": torch.__version__}


def write_meta(out_dir: Path) -> None:
    t0 = time.perf_counter()
    config = LlamaConfig.from_name("llama2-7b")
    model = build_model(config, plan=torch.bfloat16, seed=0)
    save_meta(model.state_dict(), config, out_dir)
    print(json.dumps({"wrote": str(out_dir), "seconds": round(time.perf_counter() - t0, 1),
                      "peak_rss_gib": round(peak_rss_gib(), 3)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), help="one shape in this process (default: all, one process each)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 small, 3 for 7B)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=None, help="override the shape's micro-batch")
    p.add_argument("--seq", type=int, default=None, help="override the shape's sequence length")
    p.add_argument("--base-dtype", choices=["auto", *DTYPES, "nf4"], default="auto",
                   help="model.base_dtype: auto is the dtype the compute runs in; nf4: QLoRA's 4-bit base")
    p.add_argument("--precision", default="auto",
                   help="trainer.precision: auto (bf16-mixed where native, 16-mixed on older GPUs, 32-true on "
                        "AVX2-only CPUs), 32-true, bf16-mixed, 16-mixed, bf16-true, 16-true")
    p.add_argument("--gc", action="store_true", help="gradient checkpointing")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-targets", default="wq,wv", help="comma-separated LoRA targets")
    p.add_argument("--dora", action="store_true", help="DoRA instead of LoRA, at the same rank and targets")
    p.add_argument("--gc-layers", type=int, default=None, help="checkpoint only the first N blocks (implies --gc)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (warmup steps absorb compile time)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint", type=Path, default=None, help="load this checkpoint instead of random weights")
    p.add_argument("--write-meta", type=Path, default=None, help="write a random bf16 llama2-7b Meta checkpoint here")
    p.add_argument("--load-only", action="store_true", help="with --checkpoint: the peak memory of loading it")
    p.add_argument("--json", type=Path, default=None, help="also append results to this JSON-lines file")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense fp16/bf16 peak for MFU (H100/H200 SXM)")
    args = p.parse_args()
    if args.batch and not args.seq or args.seq and not args.batch:
        p.error("--batch and --seq go together")
    if args.write_meta:
        return write_meta(args.write_meta)
    if args.load_only:
        return print(json.dumps(load_only(args)))
    if args.shape is None:  # each shape in a fresh process, so that peak RSS is its own
        for shape in DEFAULT_SHAPES:
            cmd = [sys.executable, __file__, "--shape", shape, *sys.argv[1:]]
            subprocess.run(cmd, check=True)
        return
    args.steps = args.steps or (10 if args.shape == "small" else 3)
    result = run_shape(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
