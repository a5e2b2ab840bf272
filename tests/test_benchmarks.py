"""The benchmark and study scripts run as documented (tiny shapes): their numbers are measured elsewhere."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_ablate_dry_run_writes_json_and_markdown(tmp_path):
    ablate = ROOT / "benchmarks" / "ablation" / "ablate.py"
    proc = subprocess.run([sys.executable, str(ablate), "--dry_run", "--out_dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["cells"]) == 4 and all(not c["oom"] and c["wall_s"] > 0 for c in results["cells"])
    assert all(c["train_loss"] > 0 and c["val_loss"] > 0 and c["predicted_gib"] > 0 for c in results["cells"])
    # Same examples, same optimizer steps: GA, MP and GC change memory and time, not what is learned (up to bf16).
    a, b, nf4, dora = results["cells"]
    assert abs(a["train_loss"] - b["train_loss"]) < 0.02 and abs(a["val_loss"] - b["val_loss"]) < 0.02
    assert nf4["nf4"] and nf4["base_dtype"] == "nf4" and abs(nf4["train_loss"] - b["train_loss"]) < 0.1
    # DoRA starts at the same model as LoRA: its first steps' loss is LoRA's, nearly
    assert dora["dora"] and dora["cell"].endswith("DORA+") and abs(dora["train_loss"] - b["train_loss"]) < 0.05
    table2 = (tmp_path / "table2.md").read_text().splitlines()
    assert table2[0].startswith("| GA | MP (bf16-mixed) | LoRA | GC | NF4 | DoRA | peak (peak RSS)")
    assert len(table2) == 6
    table1 = (tmp_path / "table1.md").read_text()
    assert "\n| GA | " in table1 and "| technique |" in table1 and "\n| NF4 | " in table1 and "[1/4]" in proc.stdout
    assert "\n| DORA | " in table1


@pytest.mark.slow
def test_preference_step_benchmark_prints_its_ratios(tmp_path):
    """benchmarks/preference_step.py on the tiny shape: every kind timed and its peak measured in its own process;
    the memory model counts P pairs as an SFT step on 2P sequences."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "preference_step.py"), "--shape", "tiny",
                           "--pairs", "1", "--seq", "32", "--rounds", "1"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["ratio_to_sft"]) == {"sft", "dpo", "dpo-precomputed", "simpo", "reference"}
    assert result["ratio_to_sft"]["sft"] == 1.0 and all(v > 0 for v in result["median_step_s"].values())
    assert set(result["step_peak_above_model_gib"]) == {"sft", "dpo", "dpo-precomputed", "simpo"}
    assert result["predicted_total_gib"]["sft"] == result["predicted_total_gib"]["dpo"]
