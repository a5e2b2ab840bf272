"""Per-rank memory of QLoRA under FSDP2 on CPU processes (gloo), measured beside the analytic model's prediction.

    python benchmarks/sharded_memory.py --checkpoint /tmp/llama7b --tokenizer ../shared/assets/tokenizer.model \
        --data ../shared/assets/alpaca_5000.json --ranks 1 2

Each run is fit.py as a user runs it (configs/qlora.yaml on the CPU: precision auto, gradient checkpointing, LoRA
r=16 on wq, wk, wv), ModelParallelStrategy over W processes for W > 1, one optimizer step on one packed row of
--seq-len tokens. Each rank reports its peak RSS after the sharded load (configure_model) and after the step, and
the NF4 bytes it holds; the prediction is ``llama_lora.memory.sharded_breakdown`` for the same settings. The random
7B: ``python benchmarks/bench_step.py --shape llama2-7b --write-meta /tmp/llama7b`` (13.5 GB, bf16)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent


class RankMemory(L.Callback):
    """Peak RSS after the load and after the first step, and the NF4 bytes this rank holds (rank{r}.json)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.report = Path(out_dir), {}

    def on_fit_start(self, trainer, pl_module) -> None:  # after configure_model: the sharded, quantized load
        from torch.distributed.tensor import DTensor

        from llama_lora.memory import peak_rss_bytes
        from llama_lora.quant import NF4Weight

        local = [p._local_tensor if isinstance(p, DTensor) else p for p in pl_module.model.parameters()]
        self.report.update(load_peak=peak_rss_bytes(), nf4_bytes=sum(t.nbytes_stored for t in local
                                                                     if isinstance(t, NF4Weight)),
                           other_bytes=sum(t.numel() * t.element_size() for t in local
                                           if not isinstance(t, NF4Weight)), start=time.time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from llama_lora.memory import peak_rss_bytes

        self.report.update(step_peak=peak_rss_bytes(), step_s=time.time() - self.report["start"],
                           tokens=int(batch["input_ids"].numel()))
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.report))


def run(args: argparse.Namespace, ranks: int, out: Path) -> list[dict]:
    strategy = ({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                 "init_args": {"data_parallel_size": ranks, "tensor_parallel_size": 1,
                               "save_distributed_checkpoint": False}} if ranks > 1 else "auto")
    config = {"extends": str(ROOT / "configs" / "qlora.yaml"),
              "trainer": {"accelerator": "cpu", "precision": args.precision, "devices": ranks, "strategy": strategy,
                          "max_steps": 1, "accumulate_grad_batches": 1, "limit_val_batches": 0, "logger": False,
                          "default_root_dir": str(out),  # Lightning's config.yaml goes there, not into the cwd
                          "enable_checkpointing": False, "enable_progress_bar": False,
                          "callbacks": [{"class_path": "sharded_memory.RankMemory",
                                         "init_args": {"out_dir": str(out)}}]},
              "model": {"checkpoint_dir": args.checkpoint, "model": None},
              "data": {"data_path": args.data, "tokenizer_path": args.tokenizer, "max_seq_len": args.seq_len,
                       "micro_batch_size": 1, "packing": True, "num_workers": 0, "val_size": 8,
                       "num_samples": 400}}
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks)),  # a core's share each
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "fit.py"), "--config", str(path)], check=True, env=env)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--precision", default="auto")
    args = p.parse_args()

    from llama_lora.memory import GIB, sharded_breakdown
    from llama_lora.plan import make_plan
    from llama_lora.weights import checkpoint_config

    config = checkpoint_config(args.checkpoint)
    plan = make_plan("cpu", args.precision, "nf4")
    rows = []
    for ranks in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            reports = run(args, ranks, Path(tmp))
        predicted = sharded_breakdown(config, ranks, plan=plan, lora_targets=("wq", "wk", "wv"), lora_r=16,
                                      micro_batch=1, seq_len=args.seq_len, gradient_checkpointing=True)
        for r, rep in enumerate(reports):
            row = {"ranks": ranks, "rank": r, "load_peak_gib": round(rep["load_peak"] / GIB, 2),
                   "step_peak_gib": round(rep["step_peak"] / GIB, 2), "nf4_gib": round(rep["nf4_bytes"] / GIB, 3),
                   "other_base_gib": round(rep["other_bytes"] / GIB, 3), "step_s": round(rep["step_s"], 1),
                   "tokens": rep["tokens"], "predicted_step_gib": round(predicted["total"] / GIB, 2),
                   "predicted_params_gib": round(predicted["params"] / GIB, 3),
                   "predicted_gathered_gib": round(predicted["gathered"] / GIB, 3), "plan": plan.describe()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"torch {torch.__version__}")  # the CPU kind: the plan line of each row says how it computes


if __name__ == "__main__":
    main()
