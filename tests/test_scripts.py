"""generate.py, merge.py and export_adapter.py on a real fit.py checkpoint of the tiny preset."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, fit, write_tiny_config

from llama_lora.adapters import load_model, read_adapter, resolve_tokenizer
from llama_lora.checkpoints import build_model
from llama_lora.prompts import format_prompt


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit")
    cache = tmp_path_factory.mktemp("cache")
    fit(write_tiny_config(d, cache, trainer={"max_steps": 4, "limit_val_batches": 0},
                    model={"lora": {"targets": ["wq", "wk", "wv", "output"], "r": 4, "alpha": 8, "dropout": 0.0}}))
    return d


def script(name, *args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_generate_instruction_mode_prints_only_the_response(run_dir):
    """The script's stdout is exactly the sampled response (seeded), nothing of the template."""
    ckpt = run_dir / "ckpt" / "last.ckpt"
    sampling = ["--temperature", "1.0", "--top_p", "1.0", "--seed", "5", "--max_new_tokens", "12"]
    proc = script("generate.py", "--adapter", str(ckpt), *sampling, "Name a color.")
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = load_model(adapter=ckpt)
    tok = resolve_tokenizer(adapter=read_adapter(ckpt))
    ids = tok.encode(format_prompt({"instruction": "Name a color.", "input": ""}), bos=True)
    out = loaded.model.generate(ids, 12, temperature=1.0, top_p=1.0, eos_id=tok.eos_id,
                                generator=torch.Generator().manual_seed(5))
    expected = tok.decode(out).replace("\r\n", "\n").replace("\r", "\n")  # as text-mode stdout reads it
    assert out and proc.stdout == expected + "\n"
    assert "### Response" not in proc.stdout and "Below is" not in proc.stdout
    assert "tokens/s" in proc.stderr


def test_generate_reads_stdin_and_rejects_empty_prompts(run_dir):
    ckpt = str(run_dir / "ckpt" / "last.ckpt")
    proc = script("generate.py", "--adapter", ckpt, "--greedy", "--max_new_tokens", "3", stdin="one\ntwo\n")
    assert proc.returncode == 0 and proc.stderr.count("tokens/s") == 2
    proc = script("generate.py", "--adapter", ckpt, "   ")
    assert proc.returncode == 2 and proc.stderr.strip().endswith("Prompt 0 is empty; give some text to continue or "
                                                                  "an instruction")


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_merge_script_equals_unmerged(run_dir, tmp_path, tokens, fmt):
    ckpt = run_dir / "ckpt" / "last.ckpt"
    proc = script("merge.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path), "--format", fmt, "--base_dtype",
                  "fp32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = build_model(checkpoint=tmp_path, plan=torch.float32)
    unmerged = load_model(adapter=ckpt, plan=torch.float32).model
    torch.testing.assert_close(merged(tokens), unmerged(tokens), rtol=1e-4, atol=1e-4)


def test_export_script_round_trip(run_dir, tmp_path, tokens):
    ckpt = run_dir / "ckpt" / "last.ckpt"
    proc = script("export_adapter.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_ckpt = load_model(adapter=ckpt, plan=torch.float32).model(tokens)
    from_peft = load_model(adapter=tmp_path, model="tiny", plan=torch.float32).model(tokens)
    assert torch.equal(from_ckpt, from_peft)


def test_evaluate_script_on_the_held_out_split(run_dir, tmp_path):
    import json
    import math

    out = tmp_path / "eval.json"
    proc = script("evaluate.py", "--adapter", str(run_dir / "ckpt" / "last.ckpt"), "--precision", "32-true",
                  "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["val_examples"] == 8 and record["data"] == "demo"
    # Token-weighted loss and torchmetrics' perplexity over the same target tokens: ppl = exp(loss).
    assert math.isclose(record["val_ppl"], math.exp(record["val_loss"]), rel_tol=1e-4)
    assert "Held-out evaluation" in proc.stdout


def test_generate_seed_prompts_in_completion_format(run_dir):
    proc = script("generate.py", "--adapter", str(run_dir / "ckpt" / "last.ckpt"), "--seed_prompts", "--greedy",
                  "--max_new_tokens", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("I believe the meaning of life is") and proc.stderr.count("tokens/s") == 4
    for text in ("Simply put, the theory of relativity states that", "Hi everyone,\n\nI just", "cheese =>"):
        assert text in out  # the prompt is printed, then its continuation


def _library_defaults(*sources) -> dict:
    import inspect

    defaults = {}
    for source in sources:
        function = getattr(*source) if isinstance(source, tuple) else source
        for name, p in inspect.signature(function).parameters.items():
            if p.default is not inspect.Parameter.empty:
                defaults[name] = list(p.default) if isinstance(p.default, tuple) else p.default
    return defaults


@pytest.mark.parametrize("script, sources", [
    ("scripts/generate.py", "generate"),
    ("scripts/evaluate.py", "evaluate"),
    ("scripts/merge.py", "merge"),
    ("scripts/export_adapter.py", "export"),
    ("benchmarks/ablation/ablate.py", "ablate"),
])
def test_no_default_is_stated_twice(script, sources):
    """Each script's --print_config shows the defaults of the library signatures it feeds (an option left None
    means: taken from the adapter or the hardware), and no script writes an option by hand."""
    import ast

    import yaml

    from llama_lora import adapters
    from llama_lora.model import Llama
    from llama_lora.module import LlamaLoRAModule

    sys.path.insert(0, str(ROOT / "benchmarks" / "ablation"))
    from study import StudySettings

    library = {"generate": [(Llama, "generate_stream"), adapters.load_model, LlamaLoRAModule],
               "evaluate": [adapters.load_model, LlamaLoRAModule], "merge": [adapters.merge_adapter],
               "export": [adapters.export_adapter], "ablate": [StudySettings]}[sources]
    proc = subprocess.run([sys.executable, str(ROOT / script), "--print_config"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = yaml.safe_load(proc.stdout)
    defaults = _library_defaults(*library)
    shared = {k for k in printed if k in defaults and printed[k] is not None}
    assert all(printed[k] == defaults[k] for k in shared), {k: (printed[k], defaults[k]) for k in shared}
    if sources == "generate":
        assert {"temperature", "top_p", "base_dtype"} <= shared
    for node in ast.walk(ast.parse((ROOT / script).read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            raise AssertionError(f"{script}:{node.lineno} writes an option by hand")
