"""Adapters after training: load a base + adapter for inference, export and import HF PEFT's LoRA format.

An adapter is a ``fit.py`` Lightning checkpoint (``.ckpt``) or a PEFT folder (``adapter_config.json`` +
``adapter_model.safetensors``). PEFT is not a dependency: the format is written with safetensors and plain JSON.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import run_checkpoint
from .config import LlamaConfig
from .demo import demo_tokenizer_file
from .gguf_files import CHAT_JINJA, GGUFType, alpaca_chat_template, write_lora, write_model, write_modelfile
from .layout import BY_TARGET, LORA_TARGETS, is_block_linear, permute_from_hf, rope_heads, to_hf_layout
from .lora import LoRASettings, apply_lora, lora_scale, merged_weight
from .model import Llama
from .plan import DTYPES, RunPlan, make_plan
from .prompts import default_chat_template
from .tokenizer import Tokenizer
from .weights import build_model, hf_key_to_meta, meta_key_to_hf, open_checkpoint, save_hf, save_meta
from .weights.tensors import LazyStateDict, publish

_TARGET_OF_HF = {layer.hf_module_name: target for target, layer in BY_TARGET.items()}  # PEFT's target_modules -> ours

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Llama
    config: LlamaConfig
    lora: dict[str, Any] | None = None  # targets, r, alpha, dropout of the adapter, if any
    datamodule_hparams: dict[str, Any] = field(default_factory=dict)  # from a fit.py checkpoint


@dataclass
class Adapter:
    """What training changed, in Meta names: LoRA's ``lora_a``/``lora_b`` (or, for full fine-tuning, the weights),
    the LoRA settings (None for full fine-tuning), and a fit.py checkpoint's hyperparameters ({} for PEFT)."""

    tensors: dict[str, torch.Tensor]
    lora: dict[str, Any] | None
    source: Path
    hparams: dict[str, Any] = field(default_factory=dict)
    datamodule_hparams: dict[str, Any] = field(default_factory=dict)
    plan: RunPlan | None = None  # the run plan it was trained with (fit.py checkpoints)

    @property
    def preset(self) -> str | None:
        return self.hparams.get("model")

    @property
    def checkpoint_dir(self) -> str | None:
        return self.hparams.get("checkpoint_dir")


def _is_peft(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def read_adapter(path: str | Path, config: LlamaConfig | None = None) -> Adapter:
    """A fit.py checkpoint (``.ckpt``), a fit.py run folder (its newest checkpoint: ``lightning_logs/demo``) or a PEFT
    folder, without reading any base weight. A PEFT adapter needs the model's ``config`` (its q/k rows are in HF's
    permuted order)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Adapter not found: {path}; give a fit.py .ckpt or run folder, or a PEFT adapter "
                                "folder")
    if path.is_dir() and not _is_peft(path):
        newest = run_checkpoint.newest_first([path])
        if not newest and list(path.glob("*.safetensors")):
            raise FileNotFoundError(f"{path / 'adapter_config.json'} is missing; a PEFT adapter folder holds "
                                    "adapter_config.json and adapter_model.safetensors")
        path = run_checkpoint.newest_readable(path)
        log.info("Adapter: %s (the newest checkpoint of the run)", path)
    if path.is_dir():
        if config is None:
            raise ValueError(f"{path}: a PEFT adapter needs its base model: give --checkpoint_dir (or --model)")
        tensors, lora = import_peft(path, config)
        return Adapter(tensors, lora, path)
    record = run_checkpoint.read(path)
    return Adapter(record.tensors, record.hparams.get("lora"), path, record.hparams, record.datamodule_hparams,
                   record.plan)


def open_adapter(adapter: str | Path | None, checkpoint_dir: str | Path | None = None, model: str | None = None
                 ) -> Adapter | None:
    """``read_adapter`` for either kind; a PEFT folder takes its model config from ``model`` or ``checkpoint_dir``."""
    if adapter is None:
        return None
    path = Path(adapter)
    if not _is_peft(path):
        return read_adapter(path)
    config = LlamaConfig.from_name(model) if model else None
    if config is None and checkpoint_dir is not None:
        _, _, config = open_checkpoint(checkpoint_dir)
    return read_adapter(path, config)


def adapter_config(adapter: Adapter | None, checkpoint_dir: str | Path | None, model: str | None
                   ) -> tuple[str | Path | None, LlamaConfig | None]:
    """The base checkpoint and preset to use: the ones given, else those the adapter was trained with."""
    hp = adapter.hparams if adapter is not None else {}
    checkpoint_dir = checkpoint_dir if checkpoint_dir is not None else hp.get("checkpoint_dir")
    preset = model or hp.get("model")
    return checkpoint_dir, LlamaConfig.from_name(preset) if preset else None


def adapter_plan(trained: Adapter | None, device: str | torch.device, precision: str = "auto",
                 base_dtype: str = "auto") -> RunPlan:
    """The run plan to compute a base + adapter with. base_dtype auto quantizes the base as the adapter's was: an
    adapter trained on an NF4 base computes on the same 4-bit weights. Nothing trains: every weight is frozen."""
    trained_base = trained.plan.quantization if trained is not None and trained.plan is not None else None
    return make_plan(device, precision, base_dtype, lora=True, trained_base=trained_base)


def load_model(
    checkpoint_dir: str | Path | None = None,
    adapter: str | Path | None = None,
    model: str | None = None,
    plan: RunPlan | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """The base (from ``checkpoint_dir``, or the random init a fit.py run started from) with the adapter applied,
    stored and computed as ``plan`` says (None: ``adapter_plan`` with "auto" for this device; a dtype: every tensor
    in it, unquantized).

    With a fit.py checkpoint, the preset, LoRA settings and ``checkpoint_dir`` default to those it was trained with.
    """
    trained = open_adapter(adapter, checkpoint_dir, model)
    checkpoint_dir, config = adapter_config(trained, checkpoint_dir, model)
    plan = adapter_plan(trained, device) if plan is None else plan
    base = build_model(config, checkpoint_dir, plan, device, seed=(trained.hparams if trained else {}).get(
        "init_seed", 0))
    if trained is not None:
        if trained.lora:
            apply_lora(base, LoRASettings(**trained.lora), base.plan.lora_dtype)
        _load_partial(base, trained.tensors, trained.source)
    base.eval()
    return LoadedModel(base, base.config, trained.lora if trained else None,
                       trained.datamodule_hparams if trained else {})


def _load_partial(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None:
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


# ----- HF PEFT format -----

def _peft_name(meta_module: str) -> str:
    """'layers.3.attention.wq' -> 'base_model.model.model.layers.3.self_attn.q_proj' (PEFT on LlamaForCausalLM)."""
    return "base_model.model." + meta_key_to_hf(meta_module + ".weight").removesuffix(".weight")


# Our LoRA tensor kinds and the suffix PEFT saves each under (save_pretrained drops the adapter name ".default").
_PEFT_SUFFIX = {"lora_a": ".lora_A.weight", "lora_b": ".lora_B.weight", "lora_magnitude": ".lora_magnitude_vector"}
_KIND_OF_PEFT = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "lora_magnitude"}


def export_peft(lora_tensors: dict[str, torch.Tensor], config: LlamaConfig, lora: dict[str, Any],
                out_dir: str | Path, base_model: str | None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as HF PEFT does for a LLaMA model, from the
    LoRA tensors in Meta names (``lora_state_dict(model)`` or ``read_adapter(...).tensors``): no base weight needed.

    HF's q_proj/k_proj rows are permuted relative to Meta's (rotate-half RoPE); since delta W = B A, the same row
    permutation applies to lora_B of q and k (and to DoRA's magnitude, one per row), and lora_A is unchanged.
    """
    out_dir = Path(out_dir)
    tensors = {}
    for key, t in lora_tensors.items():
        module, _, kind = key.rpartition(".")
        if kind in _PEFT_SUFFIX:
            t = to_hf_layout(key, t.detach().float(), config)
            tensors[_peft_name(module) + _PEFT_SUFFIX[kind]] = t.contiguous()
    if not tensors:
        raise ValueError("export_peft: no LoRA tensors (was the adapter trained with lora: null?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    publish(tmp, out_dir / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
        "target_modules": sorted(BY_TARGET[t].hf_module_name for t in lora["targets"]), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": bool(lora.get("use_rslora")), "use_dora": bool(lora.get("use_dora")), "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out_dir


def import_peft(path: str | Path, config: LlamaConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A PEFT LoRA adapter as a state dict in this project's names, and its LoRA settings."""
    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; a PEFT adapter folder holds adapter_config.json and "
                                    "adapter_model.safetensors")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_file}: only LoRA adapters (peft_type LORA, with use_rslora or use_dora or neither) are "
                         f"supported, not {cfg.get('peft_type')}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{cfg_file}: per-module rank_pattern/alpha_pattern are not supported")
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    unknown = sorted(set(targets) - set(_TARGET_OF_HF))
    if unknown:
        raise ValueError(f"{cfg_file}: target_modules {unknown} have no LLaMA counterpart here")
    sd: dict[str, torch.Tensor] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if key.endswith(".base_layer.weight"):
                # PEFT saves the full lm_head/embedding weights when they are targeted (save_embedding_layers):
                # those are the base model's, which comes from checkpoint_dir here.
                log.info("import_peft: ignoring base weight %s saved beside the adapter", key)
                continue
            m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B|lora_magnitude_vector)(?:\.default)?"
                             r"(?:\.weight)?", key)
            if not m:
                raise ValueError(f"{weights}: unexpected tensor {key!r} in a LoRA adapter")
            name = hf_key_to_meta(m.group(1) + ".weight").removesuffix("weight") + _KIND_OF_PEFT[m.group(2)]
            t = f.get_tensor(key)
            heads = rope_heads(name, config)
            sd[name] = t if heads is None else permute_from_hf(t, heads)
    ours = {_TARGET_OF_HF[t] for t in targets}
    lora = {"targets": [t for t in LORA_TARGETS if t in ours], "r": int(cfg["r"]), "alpha": float(cfg["lora_alpha"]),
            "dropout": float(cfg.get("lora_dropout", 0.0)), "use_rslora": bool(cfg.get("use_rslora", False)),
            "use_dora": bool(cfg.get("use_dora", False))}
    if lora["use_dora"] and not any(k.endswith("lora_magnitude") for k in sd):
        raise ValueError(f"{cfg_file}: use_dora is set but {weights.name} holds no lora_magnitude_vector tensors")
    return sd, lora


def adapter_scale(lora: dict[str, Any]) -> float:
    """The scale of an adapter's update from its settings (``lora.lora_scale``; adapters saved before rsLoRA have
    no use_rslora)."""
    return lora_scale(lora["alpha"], lora["r"], bool(lora.get("use_rslora")))


def merged_weights(base: Mapping[str, torch.Tensor], adapter: Adapter | None, dtype: torch.dtype | None = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's tensors with the adapter folded in (None: the base as it is), one at a time, in ``dtype`` (None:
    each tensor's own).

    Each LoRA update is computed in fp32, added to the fp32 upcast of its weight and cast once, as
    ``LoRALinear.merge`` does. A tensor whose dtype stays is rewritten in place: a memory-mapped checkpoint's mapping
    is private (copy-on-write), so merging 7B holds the base in its dtype plus one layer, never a second copy.
    An adapter trained on an NF4 base is folded into the dequantized NF4 weights it was trained on.
    """
    from .quant import NF4Weight, quantize

    trained = adapter.tensors if adapter is not None else {}
    scaling = adapter_scale(adapter.lora) if adapter is not None and adapter.lora else None
    unknown = sorted({k.rsplit(".", 1)[0] + ".weight" for k in trained} - set(base)) if scaling is not None else sorted(
        set(trained) - set(base))
    if unknown:
        raise ValueError(f"{adapter.source}: the adapter changes {unknown[0]!r} ({len(unknown)} in all), which the "
                         "base does not have; was it trained on another model?")
    for key in base:
        t = base[key]
        module = key.removesuffix(".weight")
        nf4 = isinstance(t, NF4Weight) or (adapter is not None and adapter.plan is not None
                                           and adapter.plan.quantization == "nf4" and is_block_linear(key))
        if nf4:  # the 4-bit weights the adapter trained on (a random NF4 base is rebuilt quantized already)
            full = (t if isinstance(t, NF4Weight) else quantize(t)).dequantize(torch.float32)
        else:
            full = t.float()
        if scaling is not None and f"{module}.lora_a" in trained:
            a, b = trained[f"{module}.lora_a"].float(), trained[f"{module}.lora_b"].float()
            if (b.shape[0], a.shape[1]) != tuple(t.shape):
                raise ValueError(f"{adapter.source}: LoRA of {module!r} is for a ({b.shape[0]}, {a.shape[1]}) weight, "
                                 f"the base's is {tuple(t.shape)}")
            merged = merged_weight(full, a, b, scaling, trained.get(f"{module}.lora_magnitude")).to(dtype or t.dtype)
        elif scaling is None and key in trained:  # full fine-tuning: the trained weight replaces the base's
            merged = trained[key].to(dtype or t.dtype)
        elif nf4:  # not adapted, but what the adapter was trained with
            merged = full.to(dtype or t.dtype)
        else:
            yield key, t.to(dtype or t.dtype)
            continue
        if merged.dtype == t.dtype and not isinstance(t, NF4Weight):
            merged = t.copy_(merged)
        yield key, merged


def merge_adapter(adapter: str | None = None, *, out_dir: str, format: Literal["hf", "meta", "gguf"] = "hf",
                  checkpoint_dir: str | None = None, model: str | None = None,
                  base_dtype: Literal["bf16", "fp16", "fp32"] | None = None, gguf_type: GGUFType = "f16",
                  max_shard_bytes: int = 5 * 10**9, tokenizer_path: str | None = None) -> Path:
    """Fold an adapter into its base and write a plain checkpoint, tensor by tensor from the memory-mapped base: the
    peak is the base in its dtype plus one layer. Each update is computed in fp32 and folded in before one cast. The
    tokenizer goes beside the weights, so the folder is a model the scripts (and HF loaders) take as it is. With no
    adapter, the base alone is converted (a base GGUF for llama.cpp's --lora, say).

    Args:
        adapter: a fit.py .ckpt, a run folder or a PEFT adapter folder (null: convert checkpoint_dir as it is).
        out_dir: the folder to write.
        format: hf (safetensors shards + config.json), meta (consolidated.00.pth + params.json) or gguf (one
            model-<gguf_type>.gguf with the tokenizer inside, for llama.cpp, and an Ollama Modelfile beside it).
        checkpoint_dir: the base (default: the one the adapter was trained on).
        model: the preset (default: the adapter's).
        base_dtype: the dtype of the written weights (default: the base's own); hf and meta.
        gguf_type: the GGUF's type: f32, f16, bf16, q8_0, or q5_1, q5_0, q4_1, q4_0 (llama.cpp's llama-quantize
            makes the k-quants, e.g. Q4_K_M, from the f16 file).
        max_shard_bytes: the largest HF shard.
        tokenizer_path: the tokenizer.model to copy beside the weights (default: the adapter's, or the base's).
    """
    if adapter is None and checkpoint_dir is None:
        raise ValueError("merge: give --adapter (a fit.py checkpoint or a PEFT folder), or --checkpoint_dir alone to "
                         "convert a base")
    if format == "gguf" and base_dtype is not None:
        raise ValueError(f"merge: --base_dtype is for the hf and meta formats; a GGUF's type is --gguf_type "
                         f"(f32, f16, bf16, q8_0, ...), not --base_dtype {base_dtype}")
    trained = open_adapter(adapter, checkpoint_dir, model)
    checkpoint_dir, config = adapter_config(trained, checkpoint_dir, model)
    if checkpoint_dir is not None:
        base_folder = Path(checkpoint_dir) if Path(checkpoint_dir).is_dir() else Path(checkpoint_dir).parent
        if Path(out_dir).resolve() == base_folder.resolve():
            raise ValueError(f"merge: --out_dir {out_dir} is the base's own folder: the merged weights would replace "
                             "the base (and an adapter pointing at it would be applied twice); write them elsewhere")
    try:
        tokenizer = resolve_tokenizer(tokenizer_path, trained, checkpoint_dir)
    except (ValueError, FileNotFoundError) as e:
        if tokenizer_path is not None:
            raise
        if format == "gguf":
            raise ValueError(f"merge --format gguf embeds the tokenizer and found none ({e}); pass --tokenizer_path"
                             ) from None
        tokenizer = None
        log.warning("merge: no tokenizer to copy beside the weights (%s); pass --tokenizer_path", e)
    if checkpoint_dir is None:  # the random init a fit.py run started from (demo and test presets)
        if config is None:
            raise ValueError("merge: the base is unknown; give checkpoint_dir (or a model preset)")
        hp = trained.hparams if trained else {}
        plan = trained.plan if trained is not None and trained.plan is not None else torch.float32
        base: Mapping[str, torch.Tensor] = build_model(config, None, plan, seed=hp.get("init_seed", 0)).state_dict()
    else:
        base, _, config = open_checkpoint(checkpoint_dir, config)
    if format == "gguf":  # streamed: each merged tensor is encoded and written before the next is made
        lazy = isinstance(base, LazyStateDict)
        shapes = {k: tuple(base.shape(k) if lazy else base[k].shape) for k in base}

        def written_once() -> Iterator[tuple[str, torch.Tensor]]:
            for key, t in merged_weights(base, trained, torch.float32):
                yield key, t
                if lazy:  # written by now: its pages of the mapped base can go, and RSS stays near one layer
                    base.release(key)

        path = Path(out_dir) / f"model-{gguf_type}.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_model(path, config, shapes, written_once(), tokenizer, gguf_type, name=Path(out_dir).name,
                    chat_template=gguf_chat_template(trained, tokenizer))
        if trained is not None:  # a base converted alone was trained on no prompt
            write_modelfile(path, resolve_chat_template(None, trained, tokenizer))
        return Path(out_dir)
    merged = dict(merged_weights(base, trained, DTYPES[base_dtype] if base_dtype else None))
    if format == "meta":
        save_meta(merged, config, out_dir)
    else:
        save_hf(merged, config, out_dir, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        shutil.copyfile(tokenizer.path, Path(out_dir) / "tokenizer.model")
    return Path(out_dir)


def export_adapter(adapter: str, out_dir: str, base_model: str | None = None,
                   format: Literal["peft", "gguf"] = "peft") -> Path:
    """Write a fit.py LoRA checkpoint in HF PEFT's format, or as a llama.cpp LoRA GGUF, reading the adapter only (no
    base weight).

    Args:
        adapter: a fit.py .ckpt trained with LoRA.
        out_dir: the folder to write (adapter_config.json + adapter_model.safetensors; or adapter.gguf, which
            `llama-cli -m base.gguf --lora adapter.gguf` applies to the base's own GGUF).
        base_model: base_model_name_or_path in adapter_config.json (default: the folder of the base the adapter was
            trained on, as an absolute path; null for a random base).
    """
    if _is_peft(Path(adapter)):
        raise ValueError(f"{adapter} is already a PEFT adapter; export_adapter takes a fit.py .ckpt or run folder")
    trained = read_adapter(adapter)
    if not trained.lora:
        raise ValueError(f"{adapter} was trained without LoRA (lora: null); merge it instead (scripts/merge.py)")
    if base_model is None and trained.checkpoint_dir is not None:
        base_model = str(Path(trained.checkpoint_dir).resolve())
    # The model's shape (HF's q/k permutation needs its head counts): the preset, or the base folder's own config
    # for a run with model: null (its header only; no weight is read).
    checkpoint_dir, config = adapter_config(trained, None, None)
    if config is None:
        if checkpoint_dir is None:
            raise ValueError(f"{adapter}: the run names neither a preset nor a base folder to take the model's shape "
                             "from")
        _, _, config = open_checkpoint(checkpoint_dir)
    if format == "gguf":
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_lora(Path(out_dir) / "adapter.gguf", config, trained.lora, trained.tensors)
        return Path(out_dir)
    return export_peft(trained.tensors, config, trained.lora, out_dir, base_model)


def gguf_chat_template(trained: Adapter | None, tokenizer: Tokenizer) -> str | None:
    """The Jinja chat template a merged GGUF carries: the template the run trained in, Alpaca's prompt for Alpaca
    data, none for a base converted alone."""
    if trained is None:
        return None
    template = resolve_chat_template(None, trained, tokenizer)
    return CHAT_JINJA[template] if template else alpaca_chat_template()


def resolve_chat_template(chat_template: str | None, adapter: Adapter | None, tokenizer: Tokenizer) -> str | None:
    """The chat template to prompt in: the one given, else the one the adapter's run trained in (its
    data.chat_template, or for chat data its tokenizer family's), else None: Alpaca's prompt."""
    data = adapter.datamodule_hparams if adapter is not None else {}
    chosen = chat_template or data.get("chat_template")
    if chosen is None and data.get("format") == "chat":
        chosen = default_chat_template(tokenizer)
    return chosen


def resolve_tokenizer(tokenizer_path: str | Path | None = None, adapter: Adapter | None = None,
                      checkpoint_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer: the one given, else the one the adapter's run used (the demo's own is found again in the
    cache), else ``tokenizer.model`` beside the base weights."""
    data = adapter.datamodule_hparams if adapter is not None else {}
    path = tokenizer_path or data.get("tokenizer_path")
    if path is None and data.get("data_path") == "demo":
        path = demo_tokenizer_file(data["demo_vocab_size"], data.get("cache_dir"))
    checkpoint_dir = checkpoint_dir or (adapter.checkpoint_dir if adapter is not None else None)
    if path is None and checkpoint_dir is not None:
        folder = Path(checkpoint_dir)
        path = (folder.parent if folder.is_file() else folder) / "tokenizer.model"
    if path is None:
        raise ValueError("Say which tokenizer to use: --tokenizer_path path/to/tokenizer.model")
    return Tokenizer(path)
