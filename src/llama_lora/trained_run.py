"""The trained run, read once: what a later command (generate, evaluate, merge, export, a new run's init_adapter) needs
to know of a run, resolved in one place from a fit.py checkpoint (``.ckpt``), a run folder (its newest checkpoint), a
PEFT adapter folder or a bare base, with the command line's overrides applied once.

``open_run`` reads the adapter's file once; ``TrainedRun.build`` makes the model it describes.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import run_checkpoint
from .config import LlamaConfig
from .demo import demo_tokenizer_file
from .lora import LoRASettings, apply_lora
from .model import Llama
from .peft import import_peft, is_peft
from .plan import RunPlan, make_plan, resolve_device
from .prompts import ModelChat, PromptFormat, format_of_jinja, resolve_format
from .tokenizer import CHAT_TEMPLATE_FILE, BPETokenizer, Tokenizer, read_chat_template, tokenizer_class
from .weights import build_model, checkpoint_config
from .weights.gguf import is_gguf_file

log = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    """What a run trained, as later commands use it.

    ``tensors``: what training changed, in Meta names (LoRA's ``lora_a``/``lora_b``/``lora_magnitude``, or every
    weight for full fine-tuning; {} for a bare base). ``lora``: None for full fine-tuning or a bare base.
    ``plan``: the run plan it trained with (None for PEFT and bare bases). ``data``: the data module's settings
    (fit.py checkpoints). ``tokenizer_path``: None where none was found (``tokenizer()`` then says what to give).
    """

    config: LlamaConfig | None
    checkpoint_dir: str | None
    prompt_format: PromptFormat
    tokenizer_path: Path | None
    format_source: str | None = None  # what chose the prompt format (None: nothing did, Alpaca's is the default)
    preset: str | None = None
    source: Path | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    lora: LoRASettings | None = None
    plan: RunPlan | None = None
    init_seed: int = 0  # a bare base or a PEFT adapter: the random init of a preset starts from seed 0, as fit's
    data: dict[str, Any] = field(default_factory=dict)
    preference: dict[str, Any] | None = None  # a preference run's model.preference (its objective, beta)
    init_adapter: str | None = None  # the adapter the run started from: a preference run's reference

    @property
    def adapted(self) -> bool:
        """Whether anything was trained (False: a bare base)."""
        return self.source is not None

    @property
    def quantization(self) -> str | None:
        """The base's quantization in training ("nf4" or None): later commands compute on the same weights."""
        return self.plan.quantization if self.plan is not None else None

    def tokenizer(self) -> Tokenizer:
        if self.tokenizer_path is None:
            raise ValueError("Say which tokenizer to use: --tokenizer_path path/to/tokenizer.model")
        return Tokenizer(self.tokenizer_path)

    def plan_for(self, device: str | torch.device | None = None, precision: str = "auto", base_dtype: str = "auto"
                 ) -> RunPlan:
        """The plan to compute this run with on ``device`` (None: the default device). base_dtype auto quantizes the
        base as training did: an adapter trained on an NF4 base computes on the same 4-bit weights. Nothing trains."""
        return make_plan(resolve_device(device), precision, base_dtype, lora=True, trained_base=self.quantization)

    def build(self, plan: RunPlan | torch.dtype, device: str | torch.device = "cpu") -> Llama:
        """The base (from ``checkpoint_dir``, or the random init the run started from) with the trained tensors in,
        stored and computed as ``plan`` says (a dtype: every tensor in it, unquantized), in eval mode."""
        model = build_model(self.config, self.checkpoint_dir, plan, device, seed=self.init_seed)
        if self.lora is not None:
            apply_lora(model, self.lora, model.plan.lora_dtype)
        if self.tensors:
            _load_partial(model, self.tensors, self.source)
        return model.eval()


def _load_partial(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: Path | None) -> None:
    own = model.state_dict()
    unknown = sorted(set(sd) - set(own))
    if unknown:
        raise ValueError(f"{source}: tensor {unknown[0]!r} ({len(unknown)} in all) does not exist in this model; "
                         "was the adapter trained on another preset or LoRA setting?")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)


def checkpoint_file(path: str | Path) -> Path:
    """The ``.ckpt`` an adapter path names: itself, or a run folder's newest readable checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Adapter not found: {path}; give a fit.py .ckpt or run folder, or a PEFT adapter "
                                "folder")
    if path.is_dir():
        if not run_checkpoint.newest_first([path]) and list(path.glob("*.safetensors")):
            raise FileNotFoundError(f"{path / 'adapter_config.json'} is missing; a PEFT adapter folder holds "
                                    "adapter_config.json and adapter_model.safetensors")
        path = run_checkpoint.newest_readable(path)
        log.info("Adapter: %s (the newest checkpoint of the run)", path)
    return path


def open_run(adapter: str | Path | None = None, checkpoint_dir: str | Path | None = None, model: str | None = None,
             tokenizer_path: str | Path | None = None, chat_template: str | None = None) -> TrainedRun:
    """The run an adapter holds (a fit.py .ckpt or run folder, or a PEFT folder; None: the base alone), with the
    command line's overrides: the base ``checkpoint_dir``, the preset ``model``, the tokenizer and the prompt format.
    Without them, each is what the run trained with. The adapter's file is read here, once; no base weight is read."""
    record = None
    if adapter is not None and not is_peft(Path(adapter)):
        record = run_checkpoint.read(checkpoint_file(adapter))
    if record is not None:
        checkpoint_dir = checkpoint_dir if checkpoint_dir is not None else record.checkpoint_dir
        model = model or record.preset
    config = LlamaConfig.from_name(model) if model else None
    if config is None and checkpoint_dir is not None:
        config = checkpoint_config(checkpoint_dir)  # the model's shape, no weight read
    tokenizer = _tokenizer_file(tokenizer_path, record, checkpoint_dir)
    # The prompt format, in this order: the one given; the run's (as recorded, or from its data settings, for a
    # chat run written before checkpoints recorded it by its tokenizer's family); the one an exported adapter or a
    # merged base carries beside its files; else Alpaca's.
    carried = None
    if chat_template is not None:
        name, source = chat_template, "--chat_template"
    elif record is not None:
        name, source = record.prompt_format or record.chat_template, "the run"
    else:
        name, source = None, None
        carried = next(((fmt, str(path)) for path in _template_files(adapter, checkpoint_dir)
                        if (fmt := _carried_format(path)) is not None), None)
    if carried is not None and isinstance(carried[0], ModelChat) and not _renders_templates(tokenizer):
        log.info("%s: the model's own chat template needs its tokenizer.json (or GGUF) tokenizer, not %s; prompting "
                 "in Alpaca's unless --chat_template or --tokenizer_path says otherwise", carried[1], tokenizer)
        carried = None
    if carried is not None:
        fmt, source = carried
    else:
        legacy = name is None and record is not None and record.data_format == "chat"
        tok = Tokenizer(tokenizer) if (legacy or name == "model") and tokenizer is not None else None
        fmt = resolve_format(record.data_format if record is not None else None, name, tok)
    run = TrainedRun(config, None if checkpoint_dir is None else str(checkpoint_dir), fmt, tokenizer, source,
                     preset=model)
    if record is not None:
        return dataclasses.replace(run, source=record.path, tensors=record.tensors, lora=record.lora,
                                   plan=record.plan, init_seed=record.init_seed, data=record.datamodule_hparams,
                                   preference=record.hparams.get("preference"),
                                   init_adapter=record.hparams.get("init_adapter"))
    if adapter is not None:  # a PEFT folder: its q/k rows are in HF's order, which the model's head counts undo
        if config is None:
            raise ValueError(f"{adapter}: a PEFT adapter needs its base model: give --checkpoint_dir (or --model)")
        tensors, lora = import_peft(adapter, config)
        return dataclasses.replace(run, source=Path(adapter), tensors=tensors, lora=lora)
    return run


def _tokenizer_file(given: str | Path | None, record: run_checkpoint.RunRecord | None,
                    checkpoint_dir: str | Path | None) -> Path | None:
    """The tokenizer: the one given, else the one the run used (the demo's own is found again in the cache), else
    ``tokenizer.model`` beside the base weights (None: nothing says where)."""
    path = given or (record.tokenizer_path if record is not None else None)
    demo = record.demo_tokenizer if record is not None else None
    if path is None and demo is not None:
        path = demo_tokenizer_file(*demo)
    if path is None and checkpoint_dir is not None:
        path = base_tokenizer(Path(checkpoint_dir))
    return None if path is None else Path(path)


def _renders_templates(tokenizer: Path | None) -> bool:
    """Whether a tokenizer file can tokenize a Jinja template's output (its special tokens written as text)."""
    return tokenizer is not None and tokenizer.is_file() and tokenizer_class(tokenizer) is BPETokenizer


def base_tokenizer(checkpoint: Path) -> Path:
    """The tokenizer a base ships: a GGUF's own; in a folder, tokenizer.model (SentencePiece, or Llama 3's tiktoken
    file under original/), else tokenizer.json."""
    if checkpoint.is_file():
        return checkpoint if is_gguf_file(checkpoint) else checkpoint.parent / "tokenizer.model"
    for name in ("tokenizer.model", "original/tokenizer.model", "tokenizer.json"):
        if (checkpoint / name).is_file():
            return checkpoint / name
    return checkpoint / "tokenizer.model"


def _template_files(adapter: str | Path | None, checkpoint_dir: str | Path | None) -> list[Path]:
    """Where a chat template is carried: beside a PEFT adapter, then beside the base's weights, or inside its GGUF."""
    found = []
    for f in (Path(p) for p in (adapter, checkpoint_dir) if p is not None):
        if f.is_file() and is_gguf_file(f):
            found.append(f)
            continue
        folder = f if f.is_dir() else f.parent
        found += [folder / n for n in (CHAT_TEMPLATE_FILE, "tokenizer_config.json") if (folder / n).is_file()]
    return found


def _carried_format(path: Path) -> PromptFormat | None:
    """The prompt format a chat_template.jinja, tokenizer_config.json's chat_template or a GGUF's
    tokenizer.chat_template holds: one of this project's by name where it wrote it, else the model's own."""
    text = read_chat_template(path)
    return None if text is None else format_of_jinja(text) or ModelChat(text, str(path))
