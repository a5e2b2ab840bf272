"""What a fit.py checkpoint (``.ckpt``) holds, in one place: written by the module, read by resume, the adapters and
the scripts; versioned; and what a resume must match (the policy in docs/robustness.md).

A checkpoint is Lightning's dict (loops, optimizer and scheduler states, callbacks, the data module's sampler state,
``hyper_parameters``, ``datamodule_hyper_parameters``, ``global_step``) with:

- ``state_dict``: the trained tensors only, under ``model.`` names (LoRA's, or every weight for full fine-tuning);
- ``trainable_keys``: their names, kept when a strategy pops ``state_dict`` (FSDP2 loads it itself);
- ``rng``: the Python and torch RNG states, restored at the first batch after resuming;
- ``llama_lora``: ``{"version": 2, "plan": RunPlan.to_dict(), "run": the run's settings (``SETTINGS``),
  "prompt_format": the name of the prompt format it trained in}`` (checkpoints of version 2 written before the
  prompt formats lack the last: it is then resolved from the data settings, by the same rule).

Version 1 (checkpoints written before the run plan, 2026-12) has ``base_dtype`` ("nf4" or the resolved dtype name)
instead of ``llama_lora``, and records neither accumulation nor devices: it still loads, and a resume from it checks
what it records.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .lora import LoRASettings
from .plan import RunPlan, make_plan

log = logging.getLogger(__name__)

VERSION = 2
KEY = "llama_lora"

# A run's settings a resume compares, each with its kind:
# - "state": what the trainable state is; a resume with another value cannot load it, and is refused.
# - "step": what a step computes; another value would continue another run, and is refused, except for the number of
#   devices with the same global batch (micro_batch_size x devices) and accumulation, where the sampler hands out the
#   same examples per step and the run continues exactly.
# Schedule settings (lr, warmup, max_steps / max_epochs, the floor) are not here: they may change on resume, and the
# module applies them from the restored step (LlamaLoRAModule.on_train_start).
SETTINGS: dict[str, str] = {
    "model.model": "state", "model.lora": "state", "model.lora.r": "state", "model.lora.targets": "state",
    "model.base_dtype": "state", "model.optimizer": "state", "model.lora.lr_ratio": "state",
    "model.lora.use_dora": "state", "model.lora.use_rslora": "step",
    "model.lora.alpha": "step", "model.lora.dropout": "step", "data.max_seq_len": "step",
    "data.micro_batch_size": "step", "trainer.accumulate_grad_batches": "step", "trainer.devices": "step",
    "data.data_path": "step", "data.format": "step", "data.num_samples": "step", "data.val_size": "step",
    "data.seed": "step", "data.packing": "step", "data.mask_prompt": "step", "data.group_by_length": "step",
    "data.demo_records": "step", "data.chat_template": "step",
    "model.preference.loss": "step", "model.preference.beta": "step", "model.preference.label_smoothing": "step",
    "model.preference.simpo_gamma": "step",
}


# What a path or an unset setting resolves to, compared instead of the setting where a checkpoint recorded it: the
# base's weights and the data and tokenizer files by a fingerprint of their content (the same file by another path
# resumes; another file under the same relative path does not), and the prompt format once resolved (an explicit
# chat template equal to the run's default resumes); and a preference run's reference, the adapter it started from
# (model.init_adapter), by the fingerprint of its file. Their kind is "step".
RESOLVED: dict[str, str] = {"model.base": "model.checkpoint_dir", "data.data_file": "data.data_path",
                            "data.tokenizer": "data.tokenizer_path", "data.prompt_format": "data.chat_template",
                            "model.reference": "model.init_adapter"}
_WHOLE = 64 * 2**20  # files up to this size are hashed whole; larger ones by their size, head and tail


@functools.lru_cache(maxsize=64)
def _file_fingerprint(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= _WHOLE:
            digest.update(f.read())
        else:
            digest.update(f.read(_WHOLE // 2))
            f.seek(size - _WHOLE // 2)
            digest.update(f.read())
    return digest.hexdigest()[:16]


def fingerprint(path: str | Path | None) -> str | None:
    """What a file, or a folder's weight and config files, hold (a short sha256), cheaply; None for no path. A path
    that names no local file (``demo``, a URL) is its own identity."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return _file_fingerprint(path.resolve(), stat.st_size, stat.st_mtime_ns)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in (".pth", ".safetensors", ".bin",
                                                                                  ".gguf", ".json"))
        return hashlib.sha256("".join(f"{f.name}:{fingerprint(f)};" for f in files).encode()).hexdigest()[:16]
    return str(path)


def run_settings(module: Any, datamodule: Any = None, trainer: Any = None) -> dict[str, Any]:
    """The values of ``SETTINGS`` and ``RESOLVED`` for a module (its hyperparameters and plan), data module and
    Trainer."""
    hp, data = dict(module.hparams), dict(getattr(datamodule, "hparams", {}) or {})
    optimizer = type(module.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])).__name__  # its class: AdamW
    values = _settings(hp, data, module.plan.quantization, optimizer,
                       trainer.accumulate_grad_batches if trainer is not None else None,
                       trainer.world_size if trainer is not None else None)
    base, adapter = hp.get("checkpoint_dir"), hp.get("init_adapter")
    values.update({"model.checkpoint_dir": base, "model.base": fingerprint(base)})
    preference = getattr(module, "preference", None)
    if preference is not None and preference.needs_reference:  # SFT starts from it once; DPO keeps it throughout
        values.update({"model.init_adapter": adapter, "model.reference": fingerprint(adapter)})
    if datamodule is not None and hasattr(datamodule, "prompt_format"):
        tokenizer = datamodule.tokenizer_file()
        values.update({"data.tokenizer_path": str(tokenizer), "data.tokenizer": fingerprint(tokenizer),
                       "data.data_file": fingerprint(datamodule.data_path),
                       "data.prompt_format": datamodule.prompt_format.name})
    return values


def _settings(hp: dict, data: dict, quantization: str | None, optimizer: str | None, accumulate: int | None,
              devices: int | None) -> dict[str, Any]:
    lora = hp.get("lora")
    values = {"model.model": hp.get("model"), "model.lora": lora is not None,
              "model.lora.r": lora and lora["r"], "model.lora.targets": lora and list(lora["targets"]),
              "model.base_dtype": hp.get("base_dtype"), "model.optimizer": optimizer,
              "model.lora.alpha": lora and float(lora["alpha"]), "model.lora.dropout": lora and float(lora["dropout"]),
              "model.lora.use_rslora": lora and bool(lora.get("use_rslora")),
              "model.lora.use_dora": lora and bool(lora.get("use_dora")),
              "model.lora.lr_ratio": lora and lora.get("lr_ratio"),
              "trainer.accumulate_grad_batches": accumulate, "trainer.devices": devices}
    preference = hp.get("preference") or {}  # SFT: None for each
    values.update({f"model.preference.{k}": preference.get(k) for k in ("loss", "beta", "label_smoothing",
                                                                        "simpo_gamma")})
    values.update({key: data.get(key.removeprefix("data.")) for key in SETTINGS if key.startswith("data.")})
    values["quantization"] = quantization  # compared for model.base_dtype: another dtype of the same kind resumes
    return values


def trained_names(module: torch.nn.Module) -> set[str]:
    """The parameters a checkpoint holds: the trained ones (LoRA's, or every weight in full fine-tuning)."""
    return {n for n, p in module.named_parameters() if p.requires_grad}


def leave_out_frozen(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """The training module's state_dict hook: every name of a frozen parameter (a tied one's two) is left out."""
    for name, p in module.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            state_dict.pop(prefix + name, None)


def save(checkpoint: dict[str, Any], module: Any, rng: dict[str, Any]) -> None:
    """Write this project's part of a checkpoint (``on_save_checkpoint``): the trained tensors only, the record, and
    the RNG states to restore at the first batch after a resume."""
    keep = trained_names(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
    checkpoint["trainable_keys"] = sorted(checkpoint["state_dict"])
    trainer = module._trainer
    datamodule = getattr(trainer, "datamodule", None)
    checkpoint[KEY] = {"version": VERSION, "plan": module.plan.to_dict(),
                       "run": run_settings(module, datamodule, trainer)}
    if hasattr(datamodule, "prompt_format"):
        checkpoint[KEY]["prompt_format"] = datamodule.prompt_format.name
    checkpoint["rng"] = rng


def rng_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    return checkpoint.get("rng")


def trainable_keys(checkpoint: dict[str, Any]) -> list[str]:
    """The names of the trained tensors a checkpoint holds (ModelParallelStrategy loads and pops its state_dict
    before the module sees it; the key list is kept beside it)."""
    if "state_dict" in checkpoint:
        return list(checkpoint["state_dict"])
    return list(checkpoint.get("trainable_keys", ()))


def load(path: str | Path) -> dict[str, Any]:
    """A .ckpt as a dict: weights only (no pickled code runs) and memory-mapped (no tensor data is read yet)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - whatever the reason, it is not a checkpoint we can read
        raise ValueError(f"{path}: not a readable fit.py checkpoint ({str(e).splitlines()[0]})") from None


@dataclass
class RunRecord:
    """A fit.py checkpoint, as read: the trained tensors (Meta names), the settings and the plan it was trained with."""

    path: Path
    tensors: dict[str, torch.Tensor]
    hparams: dict[str, Any]
    datamodule_hparams: dict[str, Any]
    plan: RunPlan
    run: dict[str, Any] = field(default_factory=dict)  # the run's settings; {} for version 1
    version: int = VERSION
    global_step: int = 0
    prompt_format: str | None = None  # as recorded; None: resolve it from the data settings

    # What a later command reads of the run, typed: nothing outside this module reads the settings by key.
    @property
    def preset(self) -> str | None:
        return self.hparams.get("model")

    @property
    def checkpoint_dir(self) -> str | None:
        return self.hparams.get("checkpoint_dir")

    @property
    def init_seed(self) -> int:
        return self.hparams.get("init_seed", 0)  # checkpoints from before the setting: every run started from 0

    @property
    def lora(self) -> LoRASettings | None:
        return LoRASettings(**self.hparams["lora"]) if self.hparams.get("lora") is not None else None

    @property
    def data_format(self) -> str | None:
        return self.datamodule_hparams.get("format")

    @property
    def chat_template(self) -> str | None:
        return self.datamodule_hparams.get("chat_template")

    @property
    def tokenizer_path(self) -> str | None:
        return self.datamodule_hparams.get("tokenizer_path")

    @property
    def demo_tokenizer(self) -> tuple[int, str | None] | None:
        """(vocabulary size, cache folder) of the demo's own tokenizer, for a run on the demo data without one."""
        data = self.datamodule_hparams
        return (data["demo_vocab_size"], data.get("cache_dir")) if data.get("data_path") == "demo" else None


def read(path: str | Path, checkpoint: dict[str, Any] | None = None) -> RunRecord:
    """A fit.py checkpoint (weights only: no pickled code runs). ``checkpoint``: the dict, when it is already loaded."""
    path = Path(path)
    if checkpoint is None:
        checkpoint = load(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint and "trainable_keys" not in checkpoint:
        raise ValueError(f"{path}: no state_dict; is it a fit.py checkpoint?")
    hp = dict(checkpoint.get("hyper_parameters", {}))
    data = dict(checkpoint.get("datamodule_hyper_parameters", {}))
    tensors = {k.removeprefix("model."): v for k, v in checkpoint.get("state_dict", {}).items()}
    record = checkpoint.get(KEY)
    if record is None:  # version 1: the resolved base dtype only
        base = checkpoint.get("base_dtype") or "fp32"
        plan = make_plan("cpu", "32-true", base, lora=hp.get("lora") is not None)
        run = _settings(hp, data, plan.quantization, None, None, None)
        return RunRecord(path, tensors, hp, data, plan, run, 1, checkpoint.get("global_step", 0))
    if record.get("version", 0) > VERSION:
        raise ValueError(f"{path}: written by a newer llama-lora (checkpoint version {record['version']}, this one "
                         f"reads up to {VERSION}); upgrade llama-lora")
    return RunRecord(path, tensors, hp, data, RunPlan.from_dict(record["plan"]), record["run"], record["version"],
                     checkpoint.get("global_step", 0), record.get("prompt_format"))


def newest_first(folders: list[Path]) -> list[Path]:
    """The ``.ckpt`` files in these folders (and in the ``checkpoints`` folders of a run folder's versions), the newest
    first."""
    found = set()
    for folder in folders:
        if folder.is_dir():
            found |= set(folder.glob("*.ckpt")) | set(folder.glob("*/checkpoints/*.ckpt")) | set(
                folder.glob("checkpoints/*.ckpt"))
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def newest_readable(folder: Path) -> Path:
    """The newest checkpoint of a run folder (or a checkpoints folder) that reads: what ``--adapter FOLDER`` means."""
    for path in newest_first([folder]):
        try:
            read(path)
            return path
        except ValueError as e:
            log.warning("Skipping %s: %s", path, e)
    raise FileNotFoundError(f"{folder} holds no readable fit.py checkpoint (*.ckpt, or version_*/checkpoints/*.ckpt)")


# ----- the resume policy -----

def _shown(key: str, value: Any) -> str:
    """A setting's value in the config's own words."""
    if key == "model.lora":
        return "LoRA" if value else "null (full fine-tuning)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return f"[{', '.join(map(str, value))}]"
    return str(value)


def check_resume(saved: RunRecord, now: dict[str, Any]) -> None:
    """Refuse, in one line, a resume whose settings cannot continue the saved run (see ``SETTINGS``)."""
    then = saved.run
    fresh = ("start a new run from its weights instead: --model.init_adapter "
             f"{saved.path} without --ckpt_path")
    for key, setting in RESOLVED.items():
        if key in then and then[key] != now.get(key):
            old, new = then.get(setting), now.get(setting)
            if key == "data.prompt_format":
                what = f"{setting}: {_shown(key, then[key])} in the checkpoint, {_shown(key, now.get(key))} now"
            else:
                what = (f"{setting}: {_shown(setting, old)} in the checkpoint, {_shown(setting, new)} now, which holds "
                        "another file" + ("s" if key == "model.base" else "") + " (its content differs)")
            raise ValueError(f"cannot resume {saved.path}: {what}; the run would go on computing something else. "
                             f"Resume with the checkpoint's files, or {fresh}")
    superseded = {setting for key, setting in RESOLVED.items() if key in then}
    for key, kind in SETTINGS.items():
        if key in superseded:
            continue  # compared as what it resolves to, above
        if key not in then or then[key] is None and key.startswith(("trainer.", "model.optimizer")):
            continue  # not recorded (version 1)
        old, new = then[key], now.get(key)
        if key == "model.base_dtype":  # the base's quantization is part of what was trained on; its dtype is not
            if then.get("quantization") == now.get("quantization"):
                continue
        if old == new:
            continue
        if key in ("data.micro_batch_size", "trainer.devices") and _same_global_batch(then, now):
            continue
        what = f"{key}: {_shown(key, old)} in the checkpoint, {_shown(key, new)} now"
        if key in ("data.micro_batch_size", "trainer.devices"):
            reason = ("a resume continues only with the same global batch (data.micro_batch_size x devices = "
                      f"{then['data.micro_batch_size']} x {then.get('trainer.devices') or 1})")
        elif key == "model.lora.lr_ratio":
            reason = "the optimizer's state holds the parameter groups the checkpoint's lr_ratio made"
        elif kind == "state":
            reason = "the checkpoint's trainable weights are of another kind or shape"
        else:
            reason = "the run would go on computing something else"
        if key == "model.lora.use_dora" and old:  # a DoRA adapter cannot start a LoRA run: no fresh start to offer
            raise ValueError(f"cannot resume {saved.path}: {what}; {reason}. Resume with model.lora.use_dora: true "
                             "(a DoRA adapter's magnitudes have no LoRA form)")
        raise ValueError(f"cannot resume {saved.path}: {what}; {reason}. Resume with the checkpoint's value, or "
                         f"{fresh}")
    if saved.version == 1:
        log.info("%s was written before checkpoints recorded accumulation and devices: those are not checked",
                 saved.path)


def _same_global_batch(then: dict[str, Any], now: dict[str, Any]) -> bool:
    if then.get("trainer.devices") is None:
        return False
    return then["data.micro_batch_size"] * then["trainer.devices"] == now["data.micro_batch_size"] * now[
        "trainer.devices"]
