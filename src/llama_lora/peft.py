"""HF PEFT's LoRA format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT writes them for a
LLaMA model, from and to this project's tensors in Meta names. PEFT is not a dependency: the format is written with
safetensors and plain JSON."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import LlamaConfig
from .layout import BY_TARGET, LORA_TARGETS, permute_from_hf, rope_heads, to_hf_layout
from .lora import LoRASettings
from .prompts import PromptFormat
from .tokenizer import CHAT_TEMPLATE_FILE
from .weights import hf_key_to_meta, meta_key_to_hf
from .weights.tensors import publish

_TARGET_OF_HF = {layer.hf_module_name: target for target, layer in BY_TARGET.items()}  # PEFT's target_modules -> ours

log = logging.getLogger(__name__)




def is_peft(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def _peft_name(meta_module: str) -> str:
    """'layers.3.attention.wq' -> 'base_model.model.model.layers.3.self_attn.q_proj' (PEFT on LlamaForCausalLM)."""
    return "base_model.model." + meta_key_to_hf(meta_module + ".weight").removesuffix(".weight")


# Our LoRA tensor kinds and the suffix PEFT saves each under (save_pretrained drops the adapter name ".default").
_PEFT_SUFFIX = {"lora_a": ".lora_A.weight", "lora_b": ".lora_B.weight", "lora_magnitude": ".lora_magnitude_vector"}
_KIND_OF_PEFT = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "lora_magnitude"}


def export_peft(lora_tensors: dict[str, torch.Tensor], config: LlamaConfig, lora: LoRASettings,
                out_dir: str | Path, base_model: str | None, prompt_format: PromptFormat | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as HF PEFT does for a LLaMA model, from the
    LoRA tensors in Meta names (``lora_state_dict(model)`` or ``TrainedRun.tensors``): no base weight needed. The
    prompt format the adapter trained in goes beside them as ``chat_template.jinja`` (where transformers' tokenizers
    and this project's scripts find it).

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
        "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(BY_TARGET[t].hf_module_name for t in lora.targets), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": lora.use_rslora, "use_dora": lora.use_dora, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    if prompt_format is not None:
        (out_dir / CHAT_TEMPLATE_FILE).write_text(prompt_format.jinja)
    return out_dir


def import_peft(path: str | Path, config: LlamaConfig) -> tuple[dict[str, torch.Tensor], LoRASettings]:
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
    lora = LoRASettings(targets=[t for t in LORA_TARGETS if t in ours], r=int(cfg["r"]),
                        alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                        use_rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)))
    if lora.use_dora and not any(k.endswith("lora_magnitude") for k in sd):
        raise ValueError(f"{cfg_file}: use_dora is set but {weights.name} holds no lora_magnitude_vector tensors")
    return sd, lora
