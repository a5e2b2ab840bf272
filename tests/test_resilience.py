"""When things go wrong: non-finite losses, fp16 overflow, signals, damaged checkpoints (in-process Lightning runs)."""

from __future__ import annotations

import math
import os
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import scalars
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision

from llama_lora.data import AlpacaDataModule
from llama_lora.module import LlamaLoRAModule, LoRASettings, WarmupCosineLR
from llama_lora.resilience import (
    GracefulStop,
    NumericsGuard,
    RunFailed,
    TrainingDiverged,
    checkpoint_problem,
    oom_advice,
    resolve_resume_checkpoint,
)


class Poisoned(LlamaLoRAModule):
    """The tiny LoRA module whose training loss is NaN in the optimizer steps listed in ``bad_steps`` (1-based)."""

    def __init__(self, bad_steps: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad_steps = set(bad_steps)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step + 1 in self.bad_steps else loss


def tiny_module(bad_steps=(), cls=None, **kwargs) -> Poisoned:
    settings = dict(model="tiny", base_dtype="fp32", max_seq_len=128,
                    lora=LoRASettings(targets=["wq", "wv"], r=4, alpha=8, dropout=0.0),
                    optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
                    scheduler=lambda opt: WarmupCosineLR(opt, warmup_steps=2))
    return (cls or Poisoned)(bad_steps, **{**settings, **kwargs})


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_data(cache: Path) -> AlpacaDataModule:
    return AlpacaDataModule(data_path="demo", tokenizer_path=None, val_size=8, max_seq_len=128, micro_batch_size=4,
                            cache_dir=str(cache), demo_records=120, demo_vocab_size=512)


def trainer(tmp_path: Path, callbacks=(), every=2, **kwargs) -> L.Trainer:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="step{step:05d}", auto_insert_metric_name=False,
                                  every_n_train_steps=every, save_top_k=-1, save_last=True)
    settings = dict(accelerator="cpu", devices=1, max_steps=6, limit_val_batches=0, log_every_n_steps=1,
                    logger=TensorBoardLogger(tmp_path / "logs", name="t"), enable_progress_bar=False,
                    enable_model_summary=False, use_distributed_sampler=False)
    return L.Trainer(callbacks=[*callbacks, checkpoints], **{**settings, **kwargs})


class Recorder(L.Callback):
    """The trainable weights after every optimizer step, keyed by global step."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights[trainer.global_step] = {n.removeprefix("model."): p.detach().clone()
                                             for n, p in pl_module.named_parameters() if p.requires_grad}


def ckpt_weights(path: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in torch.load(path, weights_only=True)["state_dict"].items()}


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data_cache):
    """NaN from step 5 on, patience 3: stopped at step 7 naming steps 5-7. No update was applied in those steps, the
    step-6 checkpoint was never written and last.ckpt still holds step 4."""
    module = tiny_module(bad_steps=tuple(range(5, 20)), max_nonfinite_steps=3)
    rec = Recorder()
    t = trainer(tmp_path, callbacks=[rec], max_steps=12)
    with pytest.raises(TrainingDiverged) as e:
        t.fit(module, tiny_data(data_cache))
    message = str(e.value)
    assert "3 optimizer steps in a row (steps 5-7)" in message and "learning rate" in message
    assert isinstance(e.value, RunFailed) and "\n" not in message
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt", "step00002.ckpt", "step00004.ckpt"]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    for name, value in ckpt_weights(tmp_path / "ckpt" / "step00004.ckpt").items():
        assert torch.equal(last["state_dict"][f"model.{name}"], value)
        assert torch.equal(rec.weights[4][name], value)  # the checkpoint is step 4's weights
        assert torch.equal(rec.weights[7][name], value)  # steps 5-7 were skipped
        assert torch.isfinite(rec.weights[7][name]).all()


def test_one_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, data_cache):
    """A single NaN step: its update is dropped (weights and AdamW moments untouched), the run completes."""
    module = tiny_module(bad_steps=(3,), max_nonfinite_steps=2)
    rec = Recorder()
    t = trainer(tmp_path, callbacks=[rec], every=1)
    t.fit(module, tiny_data(data_cache))
    assert t.global_step == 6
    guard = next(cb for cb in t.callbacks if isinstance(cb, NumericsGuard))
    assert guard.skipped_steps == 1 and guard.streak == 0
    assert all(torch.equal(rec.weights[3][k], rec.weights[2][k]) for k in rec.weights[2])
    assert any(not torch.equal(rec.weights[4][k], rec.weights[3][k]) for k in rec.weights[3])
    optimizer = t.optimizers[0]
    assert all(float(optimizer.state[p]["step"]) == 5 for group in optimizer.param_groups for p in group["params"])
    # the bad step saved nothing; the steps around it did
    assert not (tmp_path / "ckpt" / "step00003.ckpt").exists() and (tmp_path / "ckpt" / "step00004.ckpt").exists()


def test_fp16_overflow_steps_are_skipped_by_the_scaler_and_logged(tmp_path, data_cache):
    """16-mixed with a GradScaler starting at 2**40: every step overflows in fp16, the scaler skips it and halves the
    scale, and amp/loss_scale and amp/skipped_steps reach TensorBoard. The weights never move."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    module = tiny_module(base_dtype="fp16")
    rec = Recorder()
    t = trainer(tmp_path, callbacks=[rec], max_steps=3, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    t.fit(module, tiny_data(data_cache))
    scale = scalars(tmp_path / "logs", "amp/loss_scale")
    assert [scale[s] for s in sorted(scale)] == [2.0**39, 2.0**38, 2.0**37]
    skipped = scalars(tmp_path / "logs", "amp/skipped_steps")
    assert [skipped[s] for s in sorted(skipped)] == [1.0, 2.0, 3.0]
    assert all(torch.equal(rec.weights[3][k], rec.weights[1][k]) for k in rec.weights[1])
    assert all(not v.any() for k, v in rec.weights[3].items() if k.endswith("lora_b"))


class SendSignal(L.Callback):
    """Sends ``sig`` to this process after micro-batch ``at`` (mid-way through an accumulation window)."""

    def __init__(self, sig: int, at: int) -> None:
        self.sig, self.at = sig, at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.at:
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_at_the_step_boundary_and_stops(tmp_path, data_cache, sig):
    """The signal arrives after micro-batch 4, the first half of step 3 (accumulation 2): the step is finished,
    last.ckpt is written at step 3, the run stops there and the original handlers are back."""
    before = signal.getsignal(sig)
    t = trainer(tmp_path, callbacks=[SendSignal(sig, at=4)], max_steps=10, accumulate_grad_batches=2)
    t.fit(tiny_module(), tiny_data(data_cache))
    stop = next(cb for cb in t.callbacks if isinstance(cb, GracefulStop))
    assert stop.stopped_by == sig and t.global_step == 3
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert signal.getsignal(sig) == before


# ----- damaged checkpoints -----


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache) -> Path:
    """Checkpoints of a 4-step tiny run: step00002, step00004, last."""
    d = tmp_path_factory.mktemp("trained")
    trainer(d, max_steps=4).fit(tiny_module(), tiny_data(data_cache))
    return d / "ckpt"


def test_intact_checkpoint_has_no_problem(trained):
    assert checkpoint_problem(trained / "last.ckpt") is None


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5, -1], ids=["empty", "1B", "100B", "half", "all-but-1B"])
def test_truncated_checkpoints_are_detected(trained, tmp_path, keep):
    data = (trained / "last.ckpt").read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[:n])
    problem = checkpoint_problem(path)
    assert problem is not None and ("truncated" in problem or "empty" in problem)


def test_foreign_files_are_not_checkpoints(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    assert "not a training checkpoint" in checkpoint_problem(tmp_path / "tensor.ckpt")
    (tmp_path / "noise.ckpt").write_bytes(os.urandom(4096))
    assert "truncated or corrupt" in checkpoint_problem(tmp_path / "noise.ckpt")
    assert checkpoint_problem(tmp_path / "missing.ckpt") == "no such file"


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"loops": {}, "global_step": 1, "state_dict": {}, "x": _Exploit(marker)}, tmp_path / "evil.ckpt")
    assert "truncated or corrupt" in checkpoint_problem(tmp_path / "evil.ckpt")
    assert not marker.exists()


def _trainer_for(folder: Path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[ModelCheckpoint(dirpath=folder)])


def test_last_falls_back_to_the_newest_intact_checkpoint(trained, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(trained, folder)
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # torn: and now the newest file
    t = _trainer_for(folder)
    assert resolve_resume_checkpoint(t, "last") == str(folder / "step00004.ckpt")
    with pytest.raises(ValueError, match=r"truncated or corrupt .*; the newest intact one is .*step00004.ckpt"):
        resolve_resume_checkpoint(t, str(last))
    for p in folder.glob("step*.ckpt"):
        p.write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 3 checkpoints"):
        resolve_resume_checkpoint(t, "last")


def test_last_without_checkpoints_starts_over(tmp_path):
    assert resolve_resume_checkpoint(_trainer_for(tmp_path / "none"), "last") is None
    assert resolve_resume_checkpoint(_trainer_for(tmp_path / "none"), None) is None


def test_oom_advice_lists_the_levers_not_yet_used():
    from llama_lora.plan import make_plan

    advice = oom_advice(make_plan("cuda", "32-true", "fp32"), gradient_checkpointing=False, micro_batch_size=4,
                        lora_targets=["wq", "wk", "wv"], max_seq_len=512)
    for lever in ("gradient_checkpointing: true", "micro_batch_size", "16-mixed", "fewer model.lora.targets",
                  "max_seq_len"):
        assert lever in advice
    used = oom_advice(make_plan("cuda", "16-mixed", "fp16"), gradient_checkpointing=True, micro_batch_size=1,
                      lora_targets=["wq", "wv"], max_seq_len=512)
    assert "gradient_checkpointing" not in used and "micro_batch_size" not in used and "16-mixed" not in used


def test_the_frozen_base_is_released_before_lightnings_teardown_copies_it_to_the_cpu(tmp_path, data_cache,
                                                                                    monkeypatch):
    """Lightning's teardown moves the module to the CPU after fit: for a 7B GPU run, 13 GB into host RAM. The frozen
    base is released first (the adapter is in the checkpoints), so that move copies only the LoRA weights. A later
    trainer.validate rebuilds the base and keeps the trained adapter."""
    module = tiny_module()
    t = trainer(tmp_path, max_steps=2)
    moved = []
    original_cpu = torch.Tensor.cpu

    def spy(self, *args, **kwargs):
        moved.append(self.numel())
        return original_cpu(self, *args, **kwargs)

    class WatchTeardown(L.Callback):
        def on_train_end(self, trainer, pl_module):
            monkeypatch.setattr(torch.Tensor, "cpu", spy)

    t.callbacks.insert(0, WatchTeardown())
    base_numel = LlamaLoRAModule(model="tiny").config.n_params
    t.fit(module, tiny_data(data_cache))
    monkeypatch.undo()
    frozen = [p for p in module.model.parameters() if not p.requires_grad]
    trained = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    assert frozen and all(p.numel() == 0 for p in frozen)
    # What teardown moved: the LoRA weights and AdamW's two moments (and metric scalars), none of the base.
    assert sum(moved) <= 3 * sum(v.numel() for v in trained.values()) + 64 < base_numel
    result = trainer(tmp_path / "val", limit_val_batches=2).validate(module, tiny_data(data_cache), verbose=False)
    assert math.isfinite(result[0]["val/loss"])
    assert all(p.numel() > 0 for p in module.model.parameters())
    assert all(torch.equal(p, trained[n]) for n, p in module.model.named_parameters() if p.requires_grad)


class Allocating(Poisoned):
    """Touches 256 MB in optimizer step 3 and 512 MB in every validation step."""

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step + 1 == 3:
            torch.ones(64 * 2**20).sum()
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        torch.ones(128 * 2**20).sum()
        return super().validation_step(batch, batch_idx)


def test_peak_memory_is_each_steps_own(tmp_path, data_cache, capsys):
    """memory/peak_rss_mb is reset at each optimizer step's first micro-batch: step 3's 256 MB shows in step 3 only,
    validation's 512 MB in none, and the summary prints the maximum over steps."""
    from llama_lora.callbacks import PeakMemoryMonitor

    monitor = PeakMemoryMonitor()
    t = trainer(tmp_path, callbacks=[monitor], max_steps=5, accumulate_grad_batches=2, limit_val_batches=2,
                val_check_interval=4, check_val_every_n_epoch=None)
    t.fit(tiny_module(cls=Allocating), tiny_data(data_cache))
    peaks = scalars(tmp_path / "logs", "memory/peak_rss_mb")
    assert sorted(peaks) == [0, 1, 2, 3, 4]  # one per optimizer step, not per micro-batch
    quiet = [peaks[s] for s in (0, 1, 3, 4)]
    assert peaks[2] - max(quiet) > 200 and max(quiet) - min(quiet) < 100  # validation (after step 2) never shows
    assert monitor.run_max["memory/peak_rss_mb"] == pytest.approx(peaks[2], abs=1)
    assert f"Peak RSS: {monitor.run_max['memory/peak_rss_mb']:.2f} MB" in capsys.readouterr().out
