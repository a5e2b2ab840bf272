"""What a .ckpt holds, and the resume policy: what a resume must match, what it may change (docs/robustness.md)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import fit, lora_weights, scalars, write_tiny_config

# The runs below: the tiny config, the schedule's length from the Trainer (scheduler max_steps null), no validation.
BASE = dict(trainer={"max_steps": 8, "val_check_interval": 1000, "limit_val_batches": 0},
            data={"micro_batch_size": 4})


def config_for(d: Path, cache_dir: Path, **overrides) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    settings = {k: {**BASE.get(k, {}), **overrides.get(k, {})} for k in {*BASE, *overrides}}
    config = write_tiny_config(d, cache_dir, **settings)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["scheduler"]["init_args"].pop("max_steps")  # the run's length: trainer.max_steps
    config.write_text(yaml.safe_dump(cfg))
    return config


class StopAt(L.Callback):
    """Stops the run after optimizer step ``step``, as a preemption would: the run's settings stay the same."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, cache_dir) -> Path:
    """A run of 8 steps stopped after step 4 (its checkpoint folder holds step 2, step 4 and last)."""
    d = tmp_path_factory.mktemp("stopped")
    config = config_for(d, cache_dir)
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "test_run_checkpoint.StopAt", "init_args": {"step": 4}})
    config.write_text(yaml.safe_dump(cfg))
    fit(config)
    assert torch.load(d / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4
    return d


def resume_copy(stopped: Path, tmp_path: Path, cache_dir: Path, **overrides) -> Path:
    """A copy of the stopped run's checkpoints in tmp_path, and the config that resumes them."""
    shutil.copytree(stopped / "ckpt", tmp_path / "ckpt")
    return config_for(tmp_path, cache_dir, **overrides)


def factor(step: int, warmup: int, total: int, floor: float = 0.05) -> float:
    """WarmupCosineLR's multiplier of the peak lr (the tiny config: min_lr_ratio 0.05)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def one_error_line(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_a_lower_learning_rate_on_resume_applies_from_the_restored_step(stopped, tmp_path, cache_dir):
    """docs/robustness.md advises a lower lr after a NaN stop: the new peak is applied from step 4 with the restored
    AdamW moments, and logged in one line."""
    config = resume_copy(stopped, tmp_path, cache_dir)
    proc = fit(config, "--ckpt_path", "last", "--model.optimizer.init_args.lr", "0.001")
    lr = scalars(tmp_path / "logs", "lr-AdamW")
    assert sorted(lr) == [4, 5, 6, 7]
    for step in range(4, 8):
        assert lr[step] == pytest.approx(0.001 * factor(step, 2, 8), rel=1e-5), step
    assert "lr 0.01 -> 0.001 from step 4" in " ".join(proc.stderr.split())
    # (a copied folder's last.ckpt points to the original: ModelCheckpoint writes last-v1.ckpt; the step file is exact)
    optimizer = torch.load(tmp_path / "ckpt" / "step00008.ckpt", weights_only=True)["optimizer_states"][0]
    assert all(s["step"] == 8 for s in optimizer["state"].values())  # the moments went on from step 4


def test_more_steps_on_resume_stretch_the_schedule_from_the_restored_step(tmp_path, cache_dir):
    """A run of 6 steps, resumed to train until step 12: the cosine now ends at step 12, not at the floor."""
    config = config_for(tmp_path, cache_dir, trainer={"max_steps": 6})
    fit(config)
    proc = fit(config, "--ckpt_path", "last", "--trainer.max_steps", "12")
    lr = scalars(tmp_path / "logs", "lr-AdamW")
    assert sorted(lr) == list(range(12))
    for step in range(6, 12):
        assert lr[step] == pytest.approx(0.01 * factor(step, 2, 12), rel=1e-5), step
    assert lr[6] > 0.5 * 0.01 and lr[11] < lr[6]  # on the new cosine, not the old floor of 0.0005
    assert "the schedule now ends at step 12" in " ".join(proc.stderr.split())


def test_an_unchanged_resume_continues_the_schedule_silently(stopped, tmp_path, cache_dir):
    config = resume_copy(stopped, tmp_path, cache_dir)
    proc = fit(config, "--ckpt_path", "last")
    lr = scalars(tmp_path / "logs", "lr-AdamW")
    assert all(lr[s] == pytest.approx(0.01 * factor(s, 2, 8), rel=1e-5) for s in range(4, 8))
    assert "from step 4" not in proc.stderr


@pytest.mark.parametrize("args, setting, old, new", [
    (["--model.lora.r", "8"], "model.lora.r", "4", "8"),
    (["--model.lora.targets", "[wq, wk]"], "model.lora.targets", "[wq, wv, w2]", "[wq, wk]"),
    (["--model.lora", "null"], "model.lora", "LoRA", "null (full fine-tuning)"),
    (["--model.base_dtype", "nf4"], "model.base_dtype", "fp32", "nf4"),
    (["--model.lora.alpha", "16"], "model.lora.alpha", "8.0", "16.0"),
    (["--model.lora.use_dora", "true"], "model.lora.use_dora", "false", "true"),
    (["--model.lora.use_rslora", "true"], "model.lora.use_rslora", "false", "true"),
    (["--data.max_seq_len", "64"], "data.max_seq_len", "128", "64"),
    (["--data.micro_batch_size", "2"], "data.micro_batch_size", "4", "2"),
    (["--trainer.accumulate_grad_batches", "2"], "trainer.accumulate_grad_batches", "1", "2"),
    (["--data.num_samples", "50"], "data.num_samples", "null", "50"),
    (["--data.packing", "true"], "data.packing", "false", "true"),
    (["--model.model", "demo"], "model.model", "tiny", "demo"),
    (["--model.lora.lr_ratio", "16"], "model.lora.lr_ratio", "null", "16.0"),
])
def test_a_resume_that_cannot_continue_the_run_is_refused_in_one_line(stopped, tmp_path, cache_dir, args, setting,
                                                                      old, new):
    """What the trainable state is, and what a step computes, must match: one line names the setting, its value in
    the checkpoint and the new value, before anything is built."""
    config = resume_copy(stopped, tmp_path, cache_dir)
    error = one_error_line(fit(config, "--ckpt_path", "last", *args, check=False))
    assert f"{setting}: {old} in the checkpoint, {new} now" in error, error
    assert "--model.init_adapter" in error  # the way to start a new run from these weights
    # what is refused is said truly (failed before for lr_ratio: "trainable weights of another kind or shape")
    assert ("parameter groups" in error) == (setting == "model.lora.lr_ratio"), error
    assert not (tmp_path / "logs").exists()  # refused at start-up: no run was started


def test_another_data_file_on_resume_is_refused(stopped, tmp_path, cache_dir):
    records = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(40)]
    (tmp_path / "data.json").write_text(__import__("json").dumps(records))
    config = resume_copy(stopped, tmp_path, cache_dir)
    tokenizer = next(cache_dir.glob("demo-tokenizer-512-*.model"))
    error = one_error_line(fit(config, "--ckpt_path", "last", "--data.data_path", str(tmp_path / "data.json"),
                               "--data.tokenizer_path", str(tokenizer), check=False))
    assert "data.data_path: demo in the checkpoint" in error


@pytest.mark.slow
def test_the_same_global_batch_on_two_devices_continues_the_run(stopped, tmp_path, cache_dir):
    """Micro-batch 4 on one process, resumed as micro-batch 2 on 2 DDP processes: the same examples per step, so the
    run continues, and ends with the weights of the uninterrupted single process."""
    config = resume_copy(stopped, tmp_path, cache_dir)
    fit(config, "--ckpt_path", "last", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--data.micro_batch_size", "2")
    full = tmp_path / "full"
    fit(config_for(full, cache_dir))
    a, b = lora_weights(tmp_path / "ckpt" / "step00008.ckpt"), lora_weights(full / "ckpt" / "last.ckpt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_a_new_run_starts_from_an_adapters_weights(stopped, tmp_path, cache_dir):
    """--model.init_adapter starts a new run (new batch size, new schedule, step 0) from a .ckpt's LoRA weights, or a
    PEFT folder's: with lr 0 it keeps them exactly."""
    import subprocess
    import sys

    from conftest import ROOT

    ckpt = stopped / "ckpt" / "last.ckpt"
    peft = tmp_path / "peft"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_adapter.py"), "--adapter", str(ckpt),
                           "--out_dir", str(peft)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for source in (ckpt, peft):
        d = tmp_path / source.name
        config = config_for(d, cache_dir, trainer={"max_steps": 2}, data={"micro_batch_size": 2})
        fit(config, "--model.init_adapter", str(source), "--model.optimizer.init_args.lr", "0.0")
        assert min(scalars(d / "logs", "train/loss_step")) == 0  # a new run: from step 0
        a, b = lora_weights(ckpt), lora_weights(d / "ckpt" / "last.ckpt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_dora_run_starts_from_a_lora_adapter_at_its_model(stopped, tmp_path, cache_dir, tokens):
    """--model.init_adapter of a LoRA adapter into a DoRA run: A and B copied, each magnitude set to ||W + s B A||, so
    the new run starts at the adapter's model exactly (lr 0 keeps it); the reverse is refused in one line."""
    from llama_lora.trained_run import open_run

    ckpt = stopped / "ckpt" / "last.ckpt"
    config = config_for(tmp_path, cache_dir, trainer={"max_steps": 1})
    fit(config, "--model.init_adapter", str(ckpt), "--model.optimizer.init_args.lr", "0.0",
        "--model.lora.use_dora", "true")
    dora = tmp_path / "ckpt" / "last.ckpt"
    assert any(k.endswith("lora_magnitude") for k in lora_weights(dora))
    with torch.no_grad():
        torch.testing.assert_close(open_run(dora).build(torch.float32)(tokens),
                                   open_run(ckpt).build(torch.float32)(tokens), rtol=1e-5, atol=1e-5)
    again = config_for(tmp_path / "back", cache_dir, trainer={"max_steps": 1})
    error = one_error_line(fit(again, "--model.init_adapter", str(dora), check=False))
    assert "is a DoRA adapter; set model.lora.use_dora: true" in error
    # Resuming the DoRA run without DoRA is refused without advising init_adapter, which refuses it too (failed
    # before: the refusal pointed at --model.init_adapter).
    error = one_error_line(fit(config, "--ckpt_path", str(dora), "--trainer.max_steps", "2", check=False))
    assert "model.lora.use_dora: true in the checkpoint" in error and "init_adapter" not in error, error


def test_the_module_refuses_trainable_weights_that_are_not_its_own():
    """A checkpoint loaded without fit.py's start-up check (a library user's own Trainer): Lightning's strict=False
    alone would accept the wrong adapter silently; the module checks the keys."""
    from llama_lora.lora import LoRASettings
    from llama_lora.module import LlamaLoRAModule

    module = LlamaLoRAModule(model="tiny", lora=LoRASettings(["wq"], r=2, alpha=4, dropout=0.0))
    module.configure_model()
    wrong = {"state_dict": {"model.layers.0.attention.wk.lora_a": torch.zeros(2, 64)}}
    with pytest.raises(ValueError, match="does not match this model's trainable weights"):
        module.on_load_checkpoint(wrong)


# ----- what the paths point at: the base, the data and the tokenizer -----

def _chat_records(seed: int) -> str:
    import json
    import random

    rng = random.Random(seed)
    return "\n".join(json.dumps({"messages": [{"role": "user", "content": f"Say {rng.randint(0, 99)}."},
                                              {"role": "assistant", "content": str(rng.randint(0, 99))}]})
                     for _ in range(40)) + "\n"


@pytest.fixture(scope="module")
def on_files(tmp_path_factory, cache_dir) -> Path:
    """A chat run of 2 steps on a Meta base folder, a relative data path (``chat.jsonl`` in its working directory)
    and a tokenizer file, with the chat template left to its default (llama2, the SentencePiece family's)."""
    from conftest import build_model

    from llama_lora.config import LlamaConfig
    from llama_lora.weights import save_meta

    d = tmp_path_factory.mktemp("on_files")
    config = LlamaConfig.from_name("tiny")
    for name, seed in (("base", 0), ("other_base", 1)):
        save_meta(build_model(config, plan=torch.bfloat16, seed=seed).state_dict(), config, d / name)
    (d / "chat.jsonl").write_text(_chat_records(0))
    fit(config_for(d, cache_dir, trainer={"max_steps": 2}, data={"val_size": 4}))  # trains the demo tokenizer
    shutil.copyfile(next(cache_dir.glob("demo-tokenizer-512-*.model")), d / "tokenizer.model")
    shutil.rmtree(d / "ckpt")
    cfg = config_for(d, cache_dir, trainer={"max_steps": 2},
                     model={"checkpoint_dir": str(d / "base"), "base_dtype": "auto"},
                     data={"data_path": "chat.jsonl", "format": "chat", "tokenizer_path": str(d / "tokenizer.model"),
                           "val_size": 4})
    fit(cfg, cwd=d)
    return d


def _resume(on_files: Path, tmp_path: Path, cache_dir: Path, *args: str, cwd: Path | None = None):
    shutil.copytree(on_files / "ckpt", tmp_path / "ckpt")
    config = config_for(tmp_path, cache_dir, trainer={"max_steps": 4},
                        model={"checkpoint_dir": str(on_files / "base"), "base_dtype": "auto"},
                        data={"data_path": "chat.jsonl", "format": "chat",
                              "tokenizer_path": str(on_files / "tokenizer.model"), "val_size": 4})
    return fit(config, "--ckpt_path", "last", *args, check=False, cwd=cwd or on_files)


@pytest.mark.slow
def test_a_resume_on_another_base_folder_is_refused(on_files, tmp_path, cache_dir):
    """Failed before: other weights of the same shape resumed silently (the base was not compared)."""
    error = one_error_line(_resume(on_files, tmp_path, cache_dir, "--model.checkpoint_dir",
                                   str(on_files / "other_base")))
    assert "model.checkpoint_dir" in error and "--model.init_adapter" in error, error


@pytest.mark.slow
def test_a_relative_data_path_pointing_at_another_file_is_refused(on_files, tmp_path, cache_dir):
    """Failed before: the same name in another working directory continued on other records."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "chat.jsonl").write_text(_chat_records(1))
    error = one_error_line(_resume(on_files, tmp_path, cache_dir, cwd=elsewhere))
    assert "data.data_path" in error and "another file" in error, error


@pytest.mark.slow
def test_another_tokenizer_file_on_resume_is_refused(on_files, tmp_path, cache_dir):
    other = tmp_path / "tokenizer.model"
    shutil.copyfile(next(cache_dir.glob("demo-tokenizer-1024-*.model"), None) or _train_other(tmp_path), other)
    error = one_error_line(_resume(on_files, tmp_path, cache_dir, "--data.tokenizer_path", str(other)))
    assert "data.tokenizer_path" in error, error


def _train_other(tmp_path: Path) -> Path:
    from llama_lora.demo import demo_tokenizer_file

    return demo_tokenizer_file(1024, tmp_path / "cache")


@pytest.mark.slow
@pytest.mark.parametrize("args", [("--data.data_path", "ABS"), ("--data.chat_template", "llama2")],
                         ids=["absolute-data-path", "explicit-default-template"])
def test_the_same_file_or_template_said_another_way_resumes(on_files, tmp_path, cache_dir, args):
    """Failed before: the data file by its absolute path, and an explicit chat template equal to the run's default,
    were refused as "computing something else"."""
    args = tuple(str(on_files / "chat.jsonl") if a == "ABS" else a for a in args)
    proc = _resume(on_files, tmp_path, cache_dir, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ckpt" / "step00004.ckpt").is_file(), proc.stderr[-3000:]
