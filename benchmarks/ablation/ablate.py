"""The GA x MP x LoRA x GC grid (16 cells, and the 8 LoRA cells again on an NF4 base), each cell in its own process so
that its peak memory is its own.

    python benchmarks/ablation/ablate.py --model small --data_path ../shared/assets/alpaca_5000.json \
        --tokenizer_path ../shared/assets/tokenizer.model
    python benchmarks/ablation/ablate.py --model llama2-7b --device cuda ...     # on a GPU (random weights)
    python benchmarks/ablation/ablate.py --model llama2-7b --predict --seq_len 512 --global_batch 4   # analytic only
    python benchmarks/ablation/ablate.py --dry_run --out_dir /tmp/ablate   # three cells of the tiny preset, demo data

Writes results.json, table2.md (measured), table1.md (analytic breakdown beside the measured peak, and the
corrected TABLE1) and, with matplotlib installed (the [plot] extra), chart.png, into --out_dir (default:
benchmarks/results/ablation/<model>-<device>). On a CPU without native bf16 the MP cells are skipped.
"""

import json
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

from study import GIB, Cell, StudySettings, grid, memory_breakdown, run_cell, table1, table2

from llama_lora.cli import configure_logging, main_guard, script_arguments
from llama_lora.config import LlamaConfig

RESULTS = Path(__file__).resolve().parent.parent / "results" / "ablation"
DRY_RUN = dict(model="tiny", seq_len=128, steps=2, half="bf16")  # checks the pipeline on any CPU, not speed


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


def ablate(out_dir: str | None = None, data_path: str = "demo", tokenizer_path: str | None = None,
           predict: bool = False, dry_run: bool = False, worker: str | None = None,
           settings: StudySettings | None = None) -> None:
    """Run the grid (or one cell of it) and write its tables.

    Args:
        out_dir: where the results go (default: benchmarks/results/ablation/<model>-<device>).
        data_path: Alpaca data for every cell ("demo": the offline synthetic set).
        tokenizer_path: the tokenizer of that data (none with the demo data).
        predict: analytic tables only, no training.
        dry_run: four cells of the tiny preset on the demo data (one of them NF4, one DoRA).
        worker: one cell, in this process (used by the grid).
    """
    settings = settings or StudySettings()
    if dry_run:
        settings = StudySettings(**{**asdict(settings), **DRY_RUN})
        data_path, tokenizer_path = "demo", None
    if settings.global_batch % settings.accumulate:
        raise ValueError(f"--global_batch {settings.global_batch} must be a multiple of --accumulate "
                         f"{settings.accumulate}")
    config = LlamaConfig.from_name(settings.model)
    if worker:
        print(json.dumps(run_cell(Cell(**json.loads(worker)), settings, data_path, tokenizer_path)), flush=True)
        return
    out = Path(out_dir) if out_dir else RESULTS / f"{settings.model}-{settings.device}"
    out.mkdir(parents=True, exist_ok=True)
    if predict:
        (out / "table1.md").write_text(table1(config, settings) + "\n")
        print(table1(config, settings))
        return
    cells = [Cell(False, False, True, False), Cell(True, True, True, True), Cell(True, True, True, True, nf4=True),
             Cell(True, True, True, True, dora=True)] if dry_run else grid()
    meta = {"settings": asdict(settings), "data_path": data_path}
    results = []
    for i, cell in enumerate(cells, 1):
        if cell.mp and settings.half_dtype() is None:
            result = {"cell": cell.name, **asdict(cell), "skipped": "no native half precision on this CPU"}
        else:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", json.dumps(asdict(cell))]
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
        status = result.get("skipped") or ("OOM" if result.get("oom") else "failed" if peak is None else
                                           f"peak {peak:.2f} GiB (predicted {result['predicted_gib']:.2f}), "
                                           f"{result['wall_s']:.1f} s")
        print(f"[{i}/{len(cells)}] {cell.name}: {status}", flush=True)
        # Written after every cell, so that an interrupted grid keeps what it measured.
        (out / "results.json").write_text(json.dumps({**meta, "cells": results}, indent=2))
    (out / "table2.md").write_text(table2(results, settings.device) + "\n")
    (out / "table1.md").write_text(table1(config, settings, results) + "\n")
    print(table2(results, settings.device))
    if chart(results, out / "chart.png"):
        print(f"chart: {out / 'chart.png'}")


def main(argv: list[str]) -> None:
    names = [f.name for f in fields(StudySettings)]
    args = script_arguments(ablate, argv, __doc__, skip=["settings"], borrowed=[(StudySettings, names)])
    settings = StudySettings(**{k: args.pop(k) for k in names})
    ablate(**args, settings=settings)


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
