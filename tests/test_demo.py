"""The offline demo: its synthetic world, its base model (pretrained once, cached, deterministic) and the LoRA stage
that reports held-out exact match before and after."""

import contextlib
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, fit, scalars, write_tiny_config

from llama_lora.config import LlamaConfig
from llama_lora.weights import build_model


def test_demo_world_is_deterministic_and_heldout_facts_are_never_asked_in_training():
    import re

    from llama_lora.demo import _INSTRUCTIONS, facts, heldout_records, instruction_records, prose

    assert instruction_records() == instruction_records() and prose(50) == prose(50) != prose(50, seed=1)
    train, held = instruction_records(), heldout_records()
    assert len(held) == 100 and len(train) == 2 * (len(facts()) - 100)
    assert all(set(r) == {"instruction", "input", "output"} and r["output"] for r in train + held)
    assert {bool(r["input"]) for r in train} == {True, False}
    adds = [r for r in train + held if r["instruction"] == "Add the two numbers."]
    assert adds and all(int(r["output"]) == sum(map(int, r["input"].split(" and "))) for r in adds)
    assert all(r["output"] == str(len(r["input"])) for r in train if r["instruction"].startswith("Count the"))

    def asked(r):  # the fact an instruction asks about: (task, item)
        for task, forms in _INSTRUCTIONS.items():
            for instruction, input in forms:
                pattern = re.escape(instruction + "|" + input).replace(r"\{a\}", "(.+)").replace(r"\{b\}", "(.+)")
                m = re.fullmatch(pattern.replace(r"\{w\}", "(.+)"), r["instruction"] + "|" + r["input"])
                if m:
                    return task, m.groups()
        raise AssertionError(f"no task asks {r}")

    assert not {asked(r) for r in held} & {asked(r) for r in train}
    text = " ".join(prose(200))
    assert all(f"{a} plus {b} is {a + b}." in text for a, b in ((7, 5), (0, 9)))


def load_fit():
    spec = importlib.util.spec_from_file_location("fit_script", ROOT / "scripts" / "fit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_base_config(tmp_path_factory):
    """configs/demo_base.yaml on the tiny preset: 4 steps on 100 prose documents."""
    d = tmp_path_factory.mktemp("base_cfg")
    cfg = yaml.safe_load((ROOT / "configs" / "demo_base.yaml").read_text())
    cfg["trainer"].update(max_steps=4, val_check_interval=2, limit_val_batches=1, enable_progress_bar=False,
                          enable_model_summary=False)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(d / "logs")
    cfg["model"]["model"] = "tiny"
    cfg["data"].update(demo_records=100, demo_vocab_size=512, max_seq_len=64, micro_batch_size=4, val_size=4)
    (d / "demo_base.yaml").write_text(yaml.safe_dump(cfg))
    return d / "demo_base.yaml"


def test_demo_base_is_a_cached_deterministic_meta_checkpoint(tmp_path, tiny_base_config, monkeypatch):
    """checkpoint_dir: demo pretrains the base with demo_base.yaml on first use and writes a Meta checkpoint with its
    tokenizer into the cache; the next run takes it from there; a first run in another cache writes the same bytes."""
    fit_script = load_fit()
    monkeypatch.setattr(fit_script, "DEMO_BASE", tiny_base_config)
    first = fit_script.demo_base(str(tmp_path / "a"))
    assert {p.name for p in first.iterdir()} == {"consolidated.00.pth", "params.json", "tokenizer.model",
                                                 "tokenizer_config.json"}  # transformers' tokenizer then adds BOS
    model = build_model(checkpoint=first, plan=torch.float32)
    assert model.config == LlamaConfig.from_name("tiny", max_seq_len=64)
    assert not torch.equal(model.layers[0].attention.wq.weight,
                           build_model(model.config, plan=torch.float32, seed=0).layers[0].attention.wq.weight)
    stamp = (first / "consolidated.00.pth").stat().st_mtime_ns
    assert fit_script.demo_base(str(tmp_path / "a")) == first and (first / "consolidated.00.pth").stat(
        ).st_mtime_ns == stamp  # cached: not trained again
    again = fit_script.demo_base(str(tmp_path / "b"))
    digest = [hashlib.sha256((f / "consolidated.00.pth").read_bytes()).hexdigest() for f in (first, again)]
    assert again.name == first.name and digest[0] == digest[1]


def test_the_demo_base_is_keyed_on_its_code_not_on_comments(tmp_path):
    """Editing a comment or a docstring keeps the cached demo base; changing code that trains it, or the code of a
    module it is trained with, makes a new one; code the base does not depend on (callbacks) does not."""
    import shutil

    import llama_lora

    fit_script = load_fit()
    package = tmp_path / "llama_lora"
    shutil.copytree(Path(llama_lora.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    key = fit_script.demo_base_key(package)
    model = package / "model.py"
    source = model.read_text()
    model.write_text(source.replace('"""LLaMA', '"""A new docstring.\n\nLLaMA', 1) + "\n# a comment\n")
    (package / "callbacks.py").write_text((package / "callbacks.py").read_text() + "\nX = 1\n")
    assert fit_script.demo_base_key(package) == key
    model.write_text(source.replace("self.eps = eps", "self.eps = eps * 1.0", 1))
    assert fit_script.demo_base_key(package) != key
    model.write_text(source)
    batches = package / "data" / "batches.py"
    batches.write_text(batches.read_text().replace("window = size * 50", "window = size * 40", 1))
    assert fit_script.demo_base_key(package) != key


def test_demo_lora_stage_reports_exact_match_before_and_after(tmp_path, tiny_base_config, monkeypatch, cache_dir):
    """The LoRA stage on the demo base (through checkpoint_dir: demo): the base's answers, then the tuned model's, to
    the same held-out instructions, with exact-match accuracy printed and logged to TensorBoard at both ends."""
    fit_script = load_fit()
    monkeypatch.setattr(fit_script, "DEMO_BASE", tiny_base_config)
    config = write_tiny_config(tmp_path, cache_dir, model={"checkpoint_dir": "demo"},
                               trainer={"max_steps": 3, "limit_val_batches": 0})
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "llama_lora.callbacks.InstructionAccuracy",
                                        "init_args": {"records": "demo", "max_new_tokens": 3, "show": 2}})
    cfg["data"]["max_seq_len"] = 64
    config.write_text(yaml.safe_dump(cfg))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fit_script.main(["--config", str(config)])
    text = out.getvalue()
    assert "Base model (before): exact match" in text and "Tuned model (after): exact match" in text
    assert "Held-out exact match" in text and text.count("(expected") == 4
    em = scalars(tmp_path / "logs", "heldout/exact_match")
    assert sorted(em) == [0, 3] and all(0 <= v <= 1 for v in em.values())


def test_explicit_bf16_on_a_cpu_without_it_warns_at_start_up(tmp_path, cache_dir):
    """A user who asks for bf16-mixed on an AVX2-only CPU is told at start-up, with the alternative. The
    environment variables make oneDNN and ATen behave as on an AVX2-only CPU, whatever CPU runs this test."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.ops.mkldnn._is_mkldnn_bf16_supported())"],
                           capture_output=True, text=True, env=env)
    if probe.stdout.strip() != "False":
        pytest.skip("oneDNN ignores ONEDNN_MAX_CPU_ISA here")
    config = write_tiny_config(tmp_path, cache_dir, trainer={"precision": "bf16-mixed", "fast_dev_run": 1})
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fit.py"), "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warning = " ".join(proc.stderr.split())
    assert "bf16-mixed with model.base_dtype fp32 on this CPU: this CPU has no native bf16 (AVX2 only)" in warning
    assert "Use trainer.precision auto and model.base_dtype auto (fp32 here)" in warning
    (tmp_path / "auto").mkdir()
    auto = fit(write_tiny_config(tmp_path / "auto", cache_dir, trainer={"precision": "auto", "fast_dev_run": 1}))
    assert "on this CPU" not in auto.stderr
