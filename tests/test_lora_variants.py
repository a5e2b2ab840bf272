"""rsLoRA and LoRA+: rsLoRA's scale, its merge and export, and LoRA+'s optimizer groups. (DoRA is not built yet.)"""

import math

import pytest
import torch
from conftest import fit, write_tiny_config

from llama_lora.adapters import Adapter, merged_weights
from llama_lora.lora import LoRALinear, LoRASettings, apply_lora, lora_state_dict, merge_lora


def test_rslora_scales_the_update_by_alpha_over_the_root_of_r():
    torch.manual_seed(0)
    layer = LoRALinear(32, 24, r=16, alpha=8.0, dropout=0.0, use_rslora=True)
    torch.nn.init.normal_(layer.lora_b)
    assert layer.scaling == 8.0 / math.sqrt(16) == 2.0
    assert LoRALinear(32, 24, r=16, alpha=8.0, dropout=0.0).scaling == 0.5
    x = torch.randn(3, 32)
    direct = x @ layer.weight.T + 2.0 * (x @ layer.lora_a.T @ layer.lora_b.T)
    torch.testing.assert_close(layer(x), direct, rtol=1e-5, atol=1e-5)


def test_an_rslora_model_merges_exactly_both_ways(tiny_model, tokens):
    """merge_lora (the layers) and merged_weights (merge.py, from the adapter's settings) fold alpha / sqrt(r)."""
    settings = LoRASettings(targets=["wq", "wv", "w2"], r=4, alpha=3.0, dropout=0.0, use_rslora=True)
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    apply_lora(tiny_model, settings)
    with torch.no_grad():
        for name, p in tiny_model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.2)
    tiny_model.eval()
    with torch.no_grad():
        unmerged = tiny_model(tokens)
    lora = {"targets": settings.targets, "r": 4, "alpha": 3.0, "dropout": 0.0, "use_rslora": True}
    folded = dict(merged_weights(base, Adapter(lora_state_dict(tiny_model), lora, source="test")))
    merge_lora(tiny_model, unload=True)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(tokens), unmerged, rtol=1e-5, atol=1e-5)
    own = tiny_model.state_dict()
    assert all(torch.allclose(folded[k], own[k], rtol=1e-6, atol=1e-6) for k in own)


def test_lora_plus_puts_the_b_matrices_alone_in_a_group_at_lr_times_ratio(tmp_path, cache_dir):
    """LoRA+: two parameter groups, the second holding every lora_b and nothing else, its lr ratio times the first's
    all along the schedule (LearningRateMonitor logs both)."""
    from conftest import scalars

    lora = {"targets": ["wq", "wv", "w2"], "r": 4, "alpha": 8, "dropout": 0.0, "lr_ratio": 16.0}
    fit(write_tiny_config(tmp_path, cache_dir, model={"lora": lora}, trainer={"max_steps": 3, "limit_val_batches": 0}))
    a, b = scalars(tmp_path / "logs", "lr-AdamW/pg1"), scalars(tmp_path / "logs", "lr-AdamW/pg2")
    assert a.keys() == b.keys() and all(b[s] == pytest.approx(16 * a[s]) for s in a) and max(a.values()) > 0
    optimizer = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["optimizer_states"][0]
    groups, state = optimizer["param_groups"], optimizer["state"]
    # r = 4: every A is (4, in), every B (out, 4), and no out or in is 4 here; 2 layers x 3 targets of each
    shapes = [[tuple(state[i]["exp_avg"].shape) for i in g["params"]] for g in groups]
    assert len(groups) == 2 and len(shapes[0]) == len(shapes[1]) == 2 * 3
    assert all(s[0] == 4 for s in shapes[0]) and all(s[1] == 4 and s[0] != 4 for s in shapes[1])


def test_a_bad_lr_ratio_is_refused():
    with pytest.raises(ValueError, match="lr_ratio must be > 0"):
        LoRASettings(lr_ratio=0.0)


def test_an_rslora_run_exports_its_scale_to_peft_and_to_llama_cpp(tmp_path, cache_dir):
    """A run with use_rslora: PEFT's adapter_config says use_rslora; llama.cpp's LoRA GGUF (which scales by
    alpha / r) carries the alpha that gives alpha / sqrt(r)."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    gguf = pytest.importorskip("gguf")
    lora = {"targets": ["wq", "wv"], "r": 4, "alpha": 8, "dropout": 0.0, "use_rslora": True}
    fit(write_tiny_config(tmp_path, cache_dir, model={"lora": lora}, trainer={"max_steps": 1, "limit_val_batches": 0}))
    for fmt in ("peft", "gguf"):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_adapter.py"), "--adapter",
                               str(tmp_path / "ckpt" / "last.ckpt"), "--out_dir", str(tmp_path / fmt), "--format",
                               fmt], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_rslora"] is True
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "adapter.gguf"))
    assert reader.fields["adapter.lora.alpha"].contents() / 4 == pytest.approx(8 / math.sqrt(4))
