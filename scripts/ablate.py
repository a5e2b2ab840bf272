"""The GA x MP x LoRA x GC grid (16 cells), each cell in its own process so that its peak memory is its own.

    python scripts/ablate.py --model small --data_path ../shared/assets/alpaca_5000.json \
        --tokenizer_path ../shared/assets/tokenizer.model --out ablation/small-cpu
    python scripts/ablate.py --model llama2-7b --device cuda ...     # on a GPU (random weights)
    python scripts/ablate.py --model llama2-7b --predict --seq_len 512 --global_batch 4   # analytic tables only
    python scripts/ablate.py --dry-run --out /tmp/ablate   # two cells of the tiny preset on the demo data

Writes results.json, table2.md (measured), table1.md (analytic breakdown beside the measured peak, and the
corrected TABLE1) and, with matplotlib installed (the [plot] extra), chart.png.
"""

import argparse
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from llama_lora.ablation import GIB, Cell, StudySettings, grid, memory_breakdown, run_cell, table1, table2
from llama_lora.cli import configure_logging, main_guard
from llama_lora.config import LlamaConfig


def chart(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    done = [r for r in results if "wall_s" in r]
    names = [r["cell"] for r in done]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax1.bar(names, [r.get("max_allocated_gib", r.get("peak_rss_gib")) for r in done], color="tab:blue")
    ax1.set_ylabel("peak memory (GiB)")
    ax2.bar(names, [r["wall_s"] for r in done], color="tab:orange")
    ax2.set_ylabel("time (s)")
    ax2.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return True


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = StudySettings()
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--device", choices=["cpu", "cuda"], default=defaults.device)
    p.add_argument("--global_batch", type=int, default=defaults.global_batch)
    p.add_argument("--accumulate", type=int, default=defaults.accumulate, help="micro-batches per step with GA on")
    p.add_argument("--seq_len", type=int, default=defaults.seq_len)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--data_path", default="demo")
    p.add_argument("--tokenizer_path", default=None)
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("ablation"))
    p.add_argument("--predict", action="store_true", help="analytic tables only, no training")
    p.add_argument("--dry-run", action="store_true", help="two cells of the tiny preset on the demo data")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one cell, in this process (used by the grid)
    args = p.parse_args(argv)
    if args.dry_run:
        args.model, args.seq_len, args.steps, args.data_path, args.tokenizer_path = "tiny", 128, 2, "demo", None
    settings = StudySettings(model=args.model, global_batch=args.global_batch, accumulate=args.accumulate,
                             seq_len=args.seq_len, steps=args.steps, device=args.device)
    if args.global_batch % args.accumulate:
        raise ValueError(f"--global_batch {args.global_batch} must be a multiple of --accumulate {args.accumulate}")
    config = LlamaConfig.from_name(args.model)
    if args.worker:
        cell = Cell(**json.loads(args.worker))
        print(json.dumps(run_cell(cell, settings, args.data_path, args.tokenizer_path, args.num_samples,
                                  exit_on_train_end=True)))  # an OOM returns; a finished cell exits in there
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.predict:
        (args.out / "table1.md").write_text(table1(config, settings) + "\n")
        print(table1(config, settings))
        return
    cells = [Cell(False, False, True, False), Cell(True, True, True, True)] if args.dry_run else grid()
    meta = {"settings": asdict(settings), "data_path": args.data_path, "num_samples": args.num_samples}
    results = []
    for i, cell in enumerate(cells, 1):
        cmd = [sys.executable, __file__, *argv, "--worker", json.dumps(asdict(cell))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            result = json.loads(lines[-1])
        else:  # killed by the OOM killer, or a crash: recorded, not fatal
            oom = proc.returncode in (-9, 137) or "out of memory" in proc.stderr.lower()
            result = {"cell": cell.name, **asdict(cell), "oom": oom, "error": proc.stderr.strip()[-300:]}
        result["predicted_gib"] = memory_breakdown(config, cell, settings)["total"] / GIB
        results.append(result)
        peak = result.get("max_allocated_gib", result.get("peak_rss_gib"))
        status = "OOM" if result.get("oom") else "failed" if peak is None else \
            f"peak {peak:.2f} GiB (predicted {result['predicted_gib']:.2f}), {result['wall_s']:.1f} s"
        print(f"[{i}/{len(cells)}] {cell.name}: {status}", flush=True)
        # Written after every cell, so that an interrupted grid keeps what it measured.
        (args.out / "results.json").write_text(json.dumps({**meta, "cells": results}, indent=2))
    (args.out / "table2.md").write_text(table2(results, args.device) + "\n")
    (args.out / "table1.md").write_text(table1(config, settings, results) + "\n")
    print(table2(results, args.device))
    if chart(results, args.out / "chart.png"):
        print(f"chart: {args.out / 'chart.png'}")


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
