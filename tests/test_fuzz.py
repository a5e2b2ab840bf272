"""Malformed inputs everywhere a user supplies them: datasets, configs, base checkpoints, resume checkpoints, prompts.

Each case is generated here, run through the script's own ``main`` and then through ``main_guard`` exactly as the
command line does. Each must raise the expected error class, print one ``error:`` line that names the problem, exit
with code 2, and leave the earlier run's checkpoints byte-identical.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import ROOT, fit, write_tiny_config

from llama_lora.cli import main_guard
from llama_lora.config import LlamaConfig
from llama_lora.weights import build_model, save_hf, save_meta


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run (4 steps, checkpoints at 2 and 4) whose checkpoints every case must leave untouched."""
    d = tmp_path_factory.mktemp("run")
    fit(write_tiny_config(d, tmp_path_factory.mktemp("cache"), trainer={"max_steps": 4, "limit_val_batches": 0}))
    return d


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def tiny_state() -> tuple[dict[str, torch.Tensor], LlamaConfig]:
    config = LlamaConfig.from_name("tiny")
    return build_model(config, plan=torch.float32, seed=0).state_dict(), config


class Exploit:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do, if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ----- the malformed inputs: name -> (script, builder(run_dir, tmp) -> argv, error class, message fragment) -----

def data_case(content: bytes | str, suffix: str = ".json", format: str = "alpaca") -> Callable[[Path, Path], list[str]]:
    def build(run: Path, tmp: Path) -> list[str]:
        path = tmp / f"data{suffix}"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["--data.data_path", str(path), "--data.tokenizer_path", str(demo_tokenizer(run)), "--data.format",
                format]
    return build


def demo_tokenizer(run: Path) -> Path:
    cache = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["cache_dir"])
    return next(cache.glob("demo-tokenizer-512-*.model"))


def peft_folder(run: Path, tmp: Path) -> Path:
    from llama_lora.export import export_adapter

    return export_adapter(str(run / "ckpt" / "last.ckpt"), str(tmp / "peft"))


def config_file(text: str) -> Callable[[Path, Path], list[str]]:
    def build(run: Path, tmp: Path) -> list[str]:
        (tmp / "extra.yaml").write_text(text)
        return ["--config", str(tmp / "extra.yaml")]
    return build


def base_checkpoint(damage: Callable[[Path], None], fmt: str = "meta") -> Callable[[Path, Path], list[str]]:
    def build(run: Path, tmp: Path) -> list[str]:
        sd, config = tiny_state()
        folder = tmp / "base"
        (save_meta if fmt == "meta" else lambda s, c, d: save_hf(s, c, d, max_shard_bytes=100_000))(sd, config, folder)
        damage(folder)
        return ["--model.checkpoint_dir", str(folder)]
    return build


def edit_params(**changes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        params = json.loads((folder / "params.json").read_text())
        (folder / "params.json").write_text(json.dumps({**params, **changes}))
    return damage


def reshaped_tensor(folder: Path) -> None:
    sd = torch.load(folder / "consolidated.00.pth", weights_only=True)
    sd["layers.1.feed_forward.w2.weight"] = sd["layers.1.feed_forward.w2.weight"][:, :100]
    torch.save(sd, folder / "consolidated.00.pth")


def truncated(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return damage


def missing_shard(folder: Path) -> None:
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()


def pickled_code(folder: Path) -> None:
    torch.save({"x": Exploit(folder / "pwned")}, folder / "consolidated.00.pth")


def resume_from(damage: Callable[[bytes, Path], bytes] | None, name: str = "resume.ckpt"):
    def build(run: Path, tmp: Path) -> list[str]:
        path = tmp / name
        if damage is not None:
            path.write_bytes(damage((run / "ckpt" / "last.ckpt").read_bytes(), tmp))
        return ["--ckpt_path", str(path)]
    return build


def evil_checkpoint(_: bytes, tmp: Path) -> bytes:
    torch.save({"loops": {}, "global_step": 1, "state_dict": {}, "x": Exploit(tmp / "pwned")}, tmp / "evil")
    return (tmp / "evil").read_bytes()


def prompt_args(*args: str) -> Callable[[Path, Path], list[str]]:
    def build(run: Path, tmp: Path) -> list[str]:
        return ["--adapter", str(run / "ckpt" / "last.ckpt"), *args]
    return build


def prompt_file(content: str, suffix: str) -> Callable[[Path, Path], list[str]]:
    def build(run: Path, tmp: Path) -> list[str]:
        (tmp / f"prompts{suffix}").write_text(content)
        return ["--adapter", str(run / "ckpt" / "last.ckpt"), "--file", str(tmp / f"prompts{suffix}")]
    return build


def adapter(damage: Callable[[bytes, Path], bytes], *rest: str) -> Callable[[Path, Path], list[str]]:
    def build(run: Path, tmp: Path) -> list[str]:
        (tmp / "adapter.ckpt").write_bytes(damage((run / "ckpt" / "last.ckpt").read_bytes(), tmp))
        return ["--adapter", str(tmp / "adapter.ckpt"), *rest]
    return build


def other_base(tmp: Path) -> Path:
    """A Meta checkpoint of another shape (the small preset's head count on tiny's size)."""
    sd, config = tiny_state()
    save_meta(sd, config, tmp / "other")
    edit_params(n_heads=8)(tmp / "other")
    return tmp / "other"


def full_fine_tune(run: Path, tmp: Path) -> Path:
    ckpt = torch.load(run / "ckpt" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["lora"] = None
    torch.save(ckpt, tmp / "full.ckpt")
    return tmp / "full.ckpt"


GOOD = '{"instruction": "Say hi.", "input": "", "output": "hi"}'
CASES = {
    # datasets
    "data-invalid-json": ("fit", data_case(f"[{GOOD},"), ValueError, "invalid JSON at line 1"),
    "data-top-level-object": ("fit", data_case('{"instruction": "x"}'), ValueError, "the top level is a JSON dict"),
    "data-record-not-object": ("fit", data_case(f"[{GOOD}, 7]"), ValueError, "record 1 is a int"),
    "data-missing-output": ("fit", data_case('[{"instruction": "x"}]'), ValueError, "record 0 has no 'output'"),
    "data-non-string-field": ("fit", data_case('[{"instruction": 3, "output": "x"}]'), ValueError,
                              "field 'instruction' is a int"),
    "data-empty-list": ("fit", data_case("[]"), ValueError, "no records"),
    "data-binary": ("fit", data_case(bytes(range(256)) * 4), ValueError, "not UTF-8 text"),
    "data-jsonl-bad-line": ("fit", data_case(f"{GOOD}\n{{oops\n", ".jsonl"), ValueError, "invalid JSON on line 2"),
    "data-missing-file": ("fit", lambda run, tmp: ["--data.data_path", str(tmp / "nope.json"), "--data.tokenizer_path",
                                                   str(demo_tokenizer(run))], FileNotFoundError, "Data file not found"),
    "data-http-url": ("fit", lambda run, tmp: ["--data.data_path", "http://example.com/alpaca.json",
                                               "--data.tokenizer_path", str(demo_tokenizer(run))],
                      ValueError, "Only https URLs"),
    "text-record-without-text": ("fit", data_case('[{"body": "x"}]', ".json", "text"), ValueError,
                                 "record 0 has no 'text' field"),
    "text-binary": ("fit", data_case(bytes(range(256)) * 4, ".txt", "text"), ValueError, "text data is UTF-8"),
    "text-empty": ("fit", data_case("\n\n\n", ".txt", "text"), ValueError, "no text to train on"),
    # configs
    "config-unknown-key": ("fit", lambda run, tmp: ["--model.lora_rank", "8"], argparse.ArgumentError,
                           "unrecognized arguments: --model.lora_rank"),
    "config-wrong-type": ("fit", lambda run, tmp: ["--trainer.max_steps", "ten"], argparse.ArgumentError,
                          "trainer.max_steps: Expected a <class 'int'>"),
    "config-bad-yaml": ("fit", config_file("trainer: [max_steps: 3\n"), ValueError,
                        "extra.yaml: invalid YAML at line 2"),
    "config-bad-yaml-script": ("generate", lambda run, tmp: (tmp / "g.yaml").write_text("prompts: [a\nb: c: d\n")
                               and ["--config", str(tmp / "g.yaml")], ValueError, "g.yaml: invalid YAML at line"),
    "prompt-no-new-tokens": ("generate", lambda run, tmp: ["--adapter", str(run / "ckpt" / "last.ckpt"),
                                                           "--max_new_tokens", "0", "Hi"], ValueError,
                             "max_new_tokens must be >= 1"),
    "prompt-negative-temperature": ("generate", lambda run, tmp: ["--temperature", "-1", "Hi"], ValueError,
                                    "temperature must be >= 0 (0: greedy)"),
    "prompt-empty-nucleus": ("generate", lambda run, tmp: ["--top_p", "0", "Hi"], ValueError,
                             "top_p must be in (0, 1]"),
    "data-relative-missing": ("fit", lambda run, tmp: ["--data.data_path", "no/such.json", "--data.tokenizer_path",
                                                       str(demo_tokenizer(run))], FileNotFoundError,
                              "a relative path is read from the working directory"),
    "config-unknown-lora-target": ("fit", config_file("model:\n  lora:\n    targets: [wz]\n"), ValueError,
                                   "model.lora.targets: unknown ['wz']"),
    "config-lora-rank-zero": ("fit", lambda run, tmp: ["--model.lora.r", "0"], ValueError,
                              "model.lora.r must be a positive integer"),
    "config-lora-dropout": ("fit", lambda run, tmp: ["--model.lora.dropout", "1.5"], ValueError,
                            "model.lora.dropout must be in [0, 1)"),
    "config-unknown-preset": ("fit", lambda run, tmp: ["--model.model", "llama3-8b"], ValueError,
                              "Unknown model preset 'llama3-8b'"),
    "config-code-as-value": ("fit", lambda run, tmp: ["--model.model", f"__import__('os').mkdir('{tmp}/pwned')"],
                             ValueError, "Unknown model preset"),
    "config-bad-dtype": ("fit", lambda run, tmp: ["--model.base_dtype", "fp8"], argparse.ArgumentError,
                         "model.base_dtype"),
    "config-zero-batch": ("fit", lambda run, tmp: ["--data.micro_batch_size", "0"], ValueError,
                          "data.micro_batch_size must be positive"),
    "config-nonfinite-patience": ("fit", lambda run, tmp: ["--model.max_nonfinite_steps", "0"], ValueError,
                                  "model.max_nonfinite_steps must be >= 1"),
    "config-tokenizer-vocab": ("fit", lambda run, tmp: ["--data.demo_vocab_size", "600"], ValueError,
                               "has 600 pieces, the model 512: give the tokenizer"),
    # base checkpoints
    "base-empty-dir": ("fit", lambda run, tmp: ["--model.checkpoint_dir", str(Path(tmp / "empty").mkdir() or
                                                                              tmp / "empty")],
                       FileNotFoundError, "holds no LLaMA weights"),
    "base-wrong-layout": ("fit", base_checkpoint(lambda f: (f / "consolidated.00.pth").rename(f / "weights.pt")),
                          FileNotFoundError, "holds no LLaMA weights"),
    "base-heads-not-dividing-dim": ("fit", base_checkpoint(edit_params(n_heads=5)), ValueError,
                                    "n_heads=5 must divide dim=64"),
    "base-other-head-count": ("fit", base_checkpoint(edit_params(n_heads=8)), ValueError, "n_heads=8 (preset: 4)"),
    "base-shape-mismatch": ("fit", base_checkpoint(reshaped_tensor), ValueError,
                            "'layers.1.feed_forward.w2.weight' has shape (64, 100)"),
    "base-truncated-pth": ("fit", base_checkpoint(truncated("consolidated.00.pth")), ValueError,
                           "not a readable"),
    "base-missing-hf-shard": ("fit", base_checkpoint(missing_shard, fmt="hf"), FileNotFoundError,
                              "names shard(s) that are missing"),
    "base-pickled-code": ("fit", base_checkpoint(pickled_code), ValueError, "not a readable weights-only"),
    # resume checkpoints
    "resume-truncated": ("fit", resume_from(lambda b, t: b[: len(b) // 3]), ValueError, "truncated or corrupt"),
    "resume-empty": ("fit", resume_from(lambda b, t: b""), ValueError, "empty file"),
    "resume-noise": ("fit", resume_from(lambda b, t: os.urandom(len(b))), ValueError, "truncated or corrupt"),
    "resume-missing": ("fit", resume_from(None), ValueError, "no such file"),
    "resume-pickled-code": ("fit", resume_from(evil_checkpoint), ValueError, "truncated or corrupt"),
    "resume-other-lora": ("fit", lambda run, tmp: ["--ckpt_path", "last", "--model.lora.targets", "[wq, wk]"],
                          ValueError, "model.lora.targets: [wq, wv, w2] in the checkpoint, [wq, wk] now"),
    # prompts and adapters
    "prompt-empty": ("generate", prompt_args("  "), ValueError, "Prompt 0 is empty"),
    "prompt-too-long": ("generate", prompt_args("count " * 400), ValueError, "the model's context holds 128"),
    "prompt-file-invalid-json": ("generate", prompt_file('["a",', ".json"), ValueError, "invalid JSON at line 1"),
    "prompt-file-object": ("generate", prompt_file('{"instruction": "a"}', ".json"), ValueError,
                           "expected a JSON list"),
    "prompt-file-non-string": ("generate", prompt_file('[{"instruction": 5}]', ".json"), ValueError,
                               "instruction and input must be strings"),
    "adapter-truncated": ("generate", adapter(lambda b, t: b[:100], "hello"), ValueError,
                          "not a readable fit.py checkpoint"),
    "adapter-pickled-code": ("generate", adapter(evil_checkpoint, "hello"), ValueError,
                             "not a readable fit.py checkpoint"),
    "generate-bad-sampling-type": ("generate", prompt_args("--top_p", "most", "hi"), argparse.ArgumentError,
                                   "top_p"),
    # evaluate
    "evaluate-truncated-adapter": ("evaluate", adapter(lambda b, t: b[:100]), ValueError,
                                   "not a readable fit.py checkpoint"),
    "evaluate-missing-adapter": ("evaluate", lambda run, tmp: ["--adapter", str(tmp / "nope.ckpt")],
                                 FileNotFoundError, "Adapter not found"),
    "evaluate-negative-val-size": ("evaluate", lambda run, tmp: ["--adapter", str(run / "ckpt" / "last.ckpt"),
                                                                 "--val_size", "-3"], ValueError,
                                   "data.val_size must be >= 0"),
    "evaluate-peft-without-model": ("evaluate", lambda run, tmp: ["--adapter", str(peft_folder(run, tmp))],
                                    ValueError, "a PEFT adapter needs its base model: give --checkpoint_dir"),
    # merge
    "merge-missing-adapter": ("merge", lambda run, tmp: ["--adapter", str(tmp / "nope"), "--out_dir", str(tmp / "o")],
                              FileNotFoundError, "Adapter not found"),
    "merge-bad-format": ("merge", lambda run, tmp: ["--adapter", str(run / "ckpt" / "last.ckpt"), "--out_dir",
                                                    str(tmp / "o"), "--format", "onnx"], argparse.ArgumentError,
                         "format"),
    "merge-adapter-of-another-model": ("merge", lambda run, tmp: ["--adapter", str(run / "ckpt" / "last.ckpt"),
                                                                  "--out_dir", str(tmp / "o"), "--checkpoint_dir",
                                                                  str(other_base(tmp))], ValueError,
                                       "the checkpoint's config has"),
    "merge-pickled-adapter": ("merge", adapter(evil_checkpoint, "--out_dir", "unused"), ValueError,
                              "not a readable fit.py checkpoint"),
    # export
    "export-missing-adapter": ("export_adapter", lambda run, tmp: ["--adapter", str(tmp / "nope.ckpt"), "--out_dir",
                                                                   str(tmp / "o")], FileNotFoundError,
                               "Adapter not found"),
    "export-full-fine-tune": ("export_adapter", lambda run, tmp: ["--adapter", str(full_fine_tune(run, tmp)),
                                                                  "--out_dir", str(tmp / "o")], ValueError,
                              "trained without LoRA"),
    # what a new user hit (each failed before its fix: a traceback, or no error at all)
    "generate-llama3-template-sentencepiece": ("generate", prompt_args("--chat_template", "llama3", "Hi"), ValueError,
                                               "needs Llama 3's tokenizer"),
    "merge-out-dir-is-a-file": ("merge", lambda run, tmp: (tmp / "f").write_text("x") and [
        "--adapter", str(run / "ckpt" / "last.ckpt"), "--out_dir", str(tmp / "f")], ValueError, "is a file"),
    "merge-out-dir-unwritable": ("merge", lambda run, tmp: (tmp / "f").write_text("x") and [
        "--adapter", str(run / "ckpt" / "last.ckpt"), "--out_dir", str(tmp / "f" / "m")], ValueError,
                                 "cannot be written"),
    "export-out-dir-unwritable": ("export_adapter", lambda run, tmp: (tmp / "f").write_text("x") and [
        "--adapter", str(run / "ckpt" / "last.ckpt"), "--out_dir", str(tmp / "f" / "p")], ValueError,
                                  "cannot be written"),
    "evaluate-out-unwritable": ("evaluate", lambda run, tmp: (tmp / "f").write_text("x") and [
        "--adapter", str(run / "ckpt" / "last.ckpt"), "--out", str(tmp / "f" / "e.json")], ValueError,
                                "evaluate --out"),
    "fit-log-dir-unwritable": ("fit", lambda run, tmp: (tmp / "f").write_text("x") and [
        "--trainer.logger.init_args.save_dir", str(tmp / "f" / "logs")], ValueError, "cannot be written"),
    "resume-nothing-to-train": ("fit", lambda run, tmp: ["--ckpt_path", "last", "--trainer.max_steps", "2"],
                                ValueError, "nothing is left to train"),
    "config-circular-extends": ("fit", lambda run, tmp: (tmp / "a.yaml").write_text("extends: b.yaml\n") and (
        tmp / "b.yaml").write_text("extends: a.yaml\n") and ["--config", str(tmp / "a.yaml")], ValueError,
                                "already in its chain"),
    "export-peft-folder": ("export_adapter", lambda run, tmp: ["--adapter", str(peft_folder(run, tmp)), "--out_dir",
                                                               str(tmp / "o")], ValueError,
                           "is already a PEFT adapter; export_adapter takes a fit.py .ckpt"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input(name, run, tmp_path):
    script, build, error, fragment = CASES[name]
    before = snapshot(run / "ckpt")
    argv = build(run, tmp_path)
    if script == "fit":  # the finished run's config (a case's own --config is layered on top), in its folder
        argv = ["--config", str(run / "config.yaml"), *argv]
    main = load_script(script).main
    with pytest.raises(error) as caught:
        main(argv)

    def reraise() -> None:
        raise caught.value

    stderr = io.StringIO()
    with pytest.raises(SystemExit) as code, contextlib.redirect_stderr(stderr):
        main_guard(reraise)
    err = stderr.getvalue()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert fragment.lower() in lines[0].lower(), lines[0]  # jsonargparse capitalises differently by version
    assert snapshot(run / "ckpt") == before, "an earlier checkpoint changed"
    assert not list(tmp_path.rglob("pwned")), "pickled or config code ran"


def test_at_least_twenty_cases_and_every_script():
    assert len(CASES) >= 20
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    assert {script for script, *_ in CASES.values()} == scripts


def test_no_eval_or_exec_in_the_code():
    """Config values are parsed by jsonargparse (class paths are imported, never evaluated); nothing calls eval/exec."""
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec"), f"{path}:{node.lineno} calls {node.func.id}"
            if isinstance(node, ast.Attribute) and node.attr in ("loads", "load"):
                owner = node.value
                assert not (isinstance(owner, ast.Name) and owner.id in ("pickle", "marshal")), \
                    f"{path}:{node.lineno} unpickles"


def test_every_torch_load_is_weights_only():
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{path}:{node.lineno}: torch.load without weights_only=True"


def test_a_torn_last_checkpoint_resumes_from_the_newest_intact_one(run, tmp_path):
    """Through fit.py: last.ckpt cut in half, --ckpt_path last resumes from step 4, and the run trains to step 6.
    (In this copied folder ModelCheckpoint writes last-v1.ckpt beside the torn file; in place it overwrites it.)"""
    folder = tmp_path / "copy"
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("logs"))
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(folder / "ckpt")
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(folder / "logs")
    cfg["trainer"]["max_steps"] = 6
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    last = folder / "ckpt" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    proc = fit(folder / "config.yaml", "--ckpt_path", "last")
    assert "Skipping" in proc.stderr and "step00004.ckpt" in proc.stderr
    assert torch.load(folder / "ckpt" / "step00006.ckpt", weights_only=True)["global_step"] == 6


class OutOfMemoryAtFirstStep(L.Callback):
    """Raises CUDA's out-of-memory error where a too-big step would (used by class path from the config)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_prints_the_levers_and_exits_1(run, tmp_path):
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    cfg["trainer"]["callbacks"].append({"class_path": "test_fuzz.OutOfMemoryAtFirstStep"})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["--config", str(tmp_path / "config.yaml")]
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as code, contextlib.redirect_stderr(stderr):
        main_guard(load_script("fit").main, argv)
    err = stderr.getvalue()
    assert code.value.code == 1 and "Traceback" not in err, err
    assert err.startswith("error: out of memory at step 1 (CUDA out of memory. Tried to allocate 2.00 GiB)")
    for lever in ("model.gradient_checkpointing: true", "data.micro_batch_size", "16-mixed", "model.lora.targets"):
        assert lever in err
