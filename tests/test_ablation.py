import json
import subprocess
import sys

from test_fit import ROOT  # noqa: I001

from llama_lora.ablation import Cell, StudySettings, memory_breakdown, table1
from llama_lora.config import LlamaConfig

SETTINGS = StudySettings(model="tiny", global_batch=4, accumulate=4, seq_len=128, lora_targets=("wq", "wk", "wv"),
                         lora_r=16, device="cpu")


def test_analytic_breakdown_by_hand_for_tiny():
    """tiny: dim 64, 2 layers, 4 heads / 2 kv heads (kv_dim 32), hidden 176, vocab 512."""
    c = LlamaConfig.from_name("tiny")
    n = 2 * (64 * (2 * 64 + 2 * 32) + 3 * 64 * 176 + 2 * 64) + 2 * 512 * 64 + 64
    assert n == c.n_params == 158_016
    n_lora = 2 * 16 * ((64 + 64) + (64 + 32) + (64 + 32))  # r * (in + out) for wq, wk, wv, per layer
    tokens = 4 * 128  # GA off: the whole global batch in one micro-batch
    # MP + LoRA on CPU: bf16 base (2 B), fp32 LoRA; activations in bf16 (2 B), RMSNorm inputs in fp32.
    per_layer = 2 * 4 * 64 + 2 * (64 + 64 + 2 * 32 + 64 + 64) + 2 * (64 + 4 * 176) + 6 * (64 + 64 + 64)
    assert per_layer == 3840
    b = memory_breakdown(c, Cell(ga=False, mp=True, lora=True, gc=False), SETTINGS)
    assert b["params"] == n * 2 + n_lora * 4 == 356_992
    assert b["grads"] == n_lora * 4 and b["optimizer"] == n_lora * 8 and b["autocast_cache"] == 0
    assert b["activations"] == tokens * 2 * per_layer == 3_932_160
    assert b["loss"] == 512 * 512 * 8 + tokens * 64 * 2
    assert b["total"] == sum(v for k, v in b.items() if k != "total") == 6_574_720
    # Full fine-tuning under MP keeps fp32 weights, and autocast adds a half copy of every matmul weight.
    full = memory_breakdown(c, Cell(ga=False, mp=True, lora=False, gc=False), SETTINGS)
    assert full["params"] == n * 4 and full["grads"] == n * 4 and full["optimizer"] == n * 8
    assert full["autocast_cache"] == (n - 512 * 64 - 64 * 5) * 2
    # Checkpointing keeps each block's input plus one block's activations; GA shrinks the micro-batch 4x.
    gc = memory_breakdown(c, Cell(ga=True, mp=True, lora=True, gc=True), SETTINGS)
    assert gc["activations"] == 128 * (2 * 2 * 64 + per_layer)


def test_corrected_table1_claims():
    """The seed's TABLE1 errors, read off the analytic model: GC lowers activations; GA does not shrink parameter,
    gradient or optimizer memory; MP over fp32 weights adds autocast's copies."""
    rows = {line.split("|")[1].strip(): [x.strip() for x in line.split("|")[2:-1]]
            for line in table1(LlamaConfig.from_name("llama2-7b"), StudySettings(model="llama2-7b")).splitlines()
            if line.startswith("| GA |") or line.startswith("| MP |") or line.startswith("| LORA |")
            or line.startswith("| GC |")}
    params, grads, optimizer, activations, compute = range(5)
    assert rows["GC"][activations] == "↓" and rows["GC"][compute].startswith("↑")
    assert rows["GC"][params] == rows["GC"][grads] == rows["GC"][optimizer] == "="
    assert rows["GA"][params] == rows["GA"][grads] == rows["GA"][optimizer] == "=" and rows["GA"][activations] == "↓"
    assert rows["LORA"][grads] == rows["LORA"][optimizer] == "↓"
    assert "↑" in rows["MP"][activations]  # autocast's weight copies when the weights are fp32 (full fine-tuning)
    c = LlamaConfig.from_name("llama2-7b")
    s = StudySettings(model="llama2-7b", seq_len=512, global_batch=4)
    seed_mp_on = memory_breakdown(c, Cell(ga=False, mp=True, lora=False, gc=False), s)
    assert seed_mp_on["autocast_cache"] > 12 * 2**30  # ~12.5 GiB of fp16 copies of the 7B matmul weights


def test_ablate_dry_run_writes_json_and_markdown(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablate.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["cells"]) == 2 and all(not c["oom"] and c["wall_s"] > 0 for c in results["cells"])
    assert all(c["train_loss"] > 0 and c["val_loss"] > 0 and c["predicted_gib"] > 0 for c in results["cells"])
    # Same examples, same optimizer steps: GA, MP and GC change memory and time, not what is learned (up to bf16).
    a, b = results["cells"]
    assert abs(a["train_loss"] - b["train_loss"]) < 0.02 and abs(a["val_loss"] - b["val_loss"]) < 0.02
    table2 = (tmp_path / "table2.md").read_text().splitlines()
    assert table2[0].startswith("| GA | MP (bf16-mixed) | LoRA | GC | peak (peak RSS)") and len(table2) == 4
    table1 = (tmp_path / "table1.md").read_text()
    assert "\n| GA | " in table1 and "| technique |" in table1 and "[1/2]" in proc.stdout
