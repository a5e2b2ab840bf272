"""generate.py, merge.py and export_adapter.py on a real fit.py checkpoint of the tiny preset."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, fit, run_on_meta_base, write_tiny_config

from llama_lora.prompts import format_prompt
from llama_lora.trained_run import open_run
from llama_lora.weights import build_model


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
    run = open_run(ckpt)
    loaded, tok = run.build(run.plan_for()), run.tokenizer()
    ids = tok.encode(format_prompt({"instruction": "Name a color.", "input": ""}), bos=True)
    out = loaded.generate(ids, 12, temperature=1.0, top_p=1.0, eos_id=tok.eos_id,
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
    unmerged = open_run(ckpt).build(torch.float32)
    torch.testing.assert_close(merged(tokens), unmerged(tokens), rtol=1e-4, atol=1e-4)


def test_export_script_round_trip(run_dir, tmp_path, tokens):
    ckpt = run_dir / "ckpt" / "last.ckpt"
    proc = script("export_adapter.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_ckpt = open_run(ckpt).build(torch.float32)(tokens)
    from_peft = open_run(tmp_path, model="tiny").build(torch.float32)(tokens)
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

    from llama_lora import export, trained_run
    from llama_lora.model import Llama
    from llama_lora.module import LlamaLoRAModule

    sys.path.insert(0, str(ROOT / "benchmarks" / "ablation"))
    from study import StudySettings

    library = {"generate": [(Llama, "generate_stream"), trained_run.open_run, LlamaLoRAModule],
               "evaluate": [trained_run.open_run, LlamaLoRAModule], "merge": [export.merge_adapter],
               "export": [export.export_adapter], "ablate": [StudySettings]}[sources]
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


# ----- a merged folder is a model a user can pick up -----

@pytest.fixture(scope="module")
def based_run(tmp_path_factory):
    """A tiny LoRA run on a bf16 Meta base folder (with its tokenizer beside it, as Meta ships it)."""
    return run_on_meta_base(tmp_path_factory, "based", seed=2)


@pytest.mark.parametrize("fmt, dtype, written", [
    ("hf", None, "bfloat16"), pytest.param("hf", "fp32", "float32", marks=pytest.mark.slow),
    pytest.param("meta", None, None, marks=pytest.mark.slow)])
def test_a_merged_folder_runs_with_no_extra_flags(based_run, tmp_path, fmt, dtype, written):
    """Merge, then generate, evaluate and fit on the merged folder as it is: the tokenizer is beside the weights, and
    config.json names the dtype the shards hold (under "dtype" and "torch_dtype"); files get the user's umask."""
    import json
    import os
    import stat

    out = tmp_path / "merged"
    proc = script("merge.py", "--adapter", str(based_run / "ckpt" / "last.ckpt"), "--out_dir", str(out), "--format",
                  fmt, *(["--base_dtype", dtype] if dtype else []))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "tokenizer.model").is_file()
    if written:
        config = json.loads((out / "config.json").read_text())
        assert config["dtype"] == config["torch_dtype"] == written
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name
    proc = script("generate.py", "--checkpoint_dir", str(out), "--greedy", "--max_new_tokens", "3", "Hi")
    assert proc.returncode == 0 and "tokens/s" in proc.stderr, proc.stderr[-2000:]
    records = tmp_path / "data.json"
    records.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(12)]))
    proc = script("evaluate.py", "--checkpoint_dir", str(out), "--data_path", str(records), "--val_size", "4",
                  "--out", str(tmp_path / "e.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (tmp_path / "fit").mkdir()
    fit(write_tiny_config(tmp_path / "fit", tmp_path / "cache", trainer={"max_steps": 1, "limit_val_batches": 0}),
        "--model.checkpoint_dir", str(out), "--model.model", "null", "--data.data_path", str(records),
        "--data.tokenizer_path", str(out / "tokenizer.model"))


def test_merge_into_the_bases_own_folder_is_refused(based_run):
    before = sorted(p.name for p in (based_run / "base").iterdir())
    proc = script("merge.py", "--adapter", str(based_run / "ckpt" / "last.ckpt"), "--out_dir",
                  str(based_run / "base" / "."), "--format", "meta")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "is the base's own folder" in errors[0]
    assert sorted(p.name for p in (based_run / "base").iterdir()) == before


def test_export_names_the_base_the_adapter_was_trained_on(based_run, tmp_path):
    import json

    proc = script("export_adapter.py", "--adapter", str(based_run / "ckpt" / "last.ckpt"), "--out_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((based_run / "base").resolve())


# ----- configs that round-trip, and runs found by their folder -----

@pytest.mark.parametrize("name", ["generate", "evaluate", "merge", "export_adapter"])
def test_every_scripts_printed_config_runs_as_it_is(run_dir, tmp_path, name):
    """`X.py ARGS --print_config > x.yaml`, then `X.py --config x.yaml`: the same run (fit.py: test_fit)."""
    ckpt = str(run_dir / "ckpt" / "last.ckpt")
    args = {"generate": ["--adapter", ckpt, "--greedy", "--max_new_tokens", "2", "Hi"],
            "evaluate": ["--adapter", ckpt, "--out", str(tmp_path / "e.json")],
            "merge": ["--adapter", ckpt, "--out_dir", str(tmp_path / "m")],
            "export_adapter": ["--adapter", ckpt, "--out_dir", str(tmp_path / "p")]}[name]
    printed = script(f"{name}.py", *args, "--print_config")
    assert printed.returncode == 0, printed.stderr[-2000:]
    (tmp_path / "x.yaml").write_text(printed.stdout)
    proc = script(f"{name}.py", "--config", str(tmp_path / "x.yaml"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    if name == "generate":
        assert "tokens/s" in proc.stderr  # the prompt came from the config


def test_generate_on_a_terminal_with_no_prompt_says_it_reads_the_terminal(run_dir):
    import os
    import pty

    main, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "generate.py"), "--adapter",
                             str(run_dir / "ckpt" / "last.ckpt"), "--greedy", "--max_new_tokens", "2"],
                            stdin=secondary, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.write(main, b"Hi\n\x04")
    _, stderr = proc.communicate(timeout=300)
    os.close(main), os.close(secondary)
    assert proc.returncode == 0 and "Reading prompts from the terminal" in stderr and "tokens/s" in stderr, stderr


def test_runs_keep_their_own_checkpoints_and_the_scripts_take_the_newest(tmp_path, cache_dir):
    """Without a dirpath, each run writes into its own version folder (no last-v1.ckpt beside an earlier run's
    last.ckpt); `--adapter <run folder>` and `--ckpt_path last` take the newest run's checkpoint."""
    import yaml

    config = write_tiny_config(tmp_path, cache_dir, trainer={"max_steps": 2, "limit_val_batches": 0})
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"][0]["init_args"].pop("dirpath")
    config.write_text(yaml.safe_dump(cfg))
    fit(config)
    fit(config, "--model.lora.r", "2")  # a second, different run of the same name
    runs = tmp_path / "logs" / "tiny"
    assert sorted(p.name for p in runs.glob("version_*/checkpoints/*.ckpt")) == sorted(
        ["last.ckpt", "step00002.ckpt"] * 2)
    adapter = open_run(runs)
    assert adapter.lora.r == 2 and adapter.source.parent.parent.name == "version_1"
    proc = script("generate.py", "--adapter", str(runs), "--greedy", "--max_new_tokens", "2", "Hi")
    assert proc.returncode == 0, proc.stderr[-2000:]
    fit(config, "--model.lora.r", "2", "--ckpt_path", "last", "--trainer.max_steps", "3")  # resumes version_1
    resumed = open_run(runs).source
    assert resumed.parent.parent.name == "version_2" and torch.load(resumed, weights_only=True)["global_step"] == 3


def test_evaluate_takes_a_peft_adapter_with_its_base_folder_alone(based_run, tmp_path):
    """No --model: the preset is the base's own config (it was "Unknown model preset None")."""
    peft = tmp_path / "peft"
    assert script("export_adapter.py", "--adapter", str(based_run / "ckpt" / "last.ckpt"), "--out_dir",
                  str(peft)).returncode == 0
    records = tmp_path / "data.json"
    records.write_text(__import__("json").dumps([{"instruction": f"Say {i}.", "output": str(i)} for i in range(12)]))
    proc = script("evaluate.py", "--adapter", str(peft), "--checkpoint_dir", str(based_run / "base"), "--data_path",
                  str(records), "--val_size", "4", "--out", str(tmp_path / "e.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
