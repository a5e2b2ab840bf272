"""Adapters after training: load a base + adapter for inference, export and import HF PEFT's LoRA format.

An adapter is a ``fit.py`` Lightning checkpoint (``.ckpt``) or a PEFT folder (``adapter_config.json`` +
``adapter_model.safetensors``). PEFT is not a dependency: the format is written with safetensors and plain JSON.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import LlamaConfig
from .lora import LORA_TARGETS, apply_lora, lora_layers, merge_lora
from .model import Llama
from .weights import build_model, hf_key_to_meta, meta_key_to_hf, permute_from_hf, permute_to_hf

# Meta module name -> HF module name (PEFT target_modules use the last part).
_HF_MODULE = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
              "w3": "up_proj", "output": "lm_head"}
_META_MODULE = {v: k for k, v in _HF_MODULE.items()}

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Llama
    config: LlamaConfig
    lora: dict[str, Any] | None = None  # targets, r, alpha, dropout of the adapter, if any
    datamodule_hparams: dict[str, Any] = field(default_factory=dict)  # from a fit.py checkpoint


def _read_ckpt(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable fit.py checkpoint ({str(e).splitlines()[0]})") from None


def adapter_hparams(adapter: str | Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model and data-module hyperparameters a fit.py checkpoint was trained with ({} for none or PEFT)."""
    if adapter is None or not Path(adapter).is_file():
        return {}, {}
    ckpt = _read_ckpt(Path(adapter))
    return ckpt.get("hyper_parameters", {}), ckpt.get("datamodule_hyper_parameters", {})


def load_model(
    checkpoint_dir: str | Path | None = None,
    adapter: str | Path | None = None,
    model: str | None = None,
    base_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """The base (from ``checkpoint_dir``, or the random init a fit.py run started from) with the adapter applied.

    With a fit.py checkpoint, the preset, LoRA settings and ``checkpoint_dir`` default to those it was trained with.
    """
    adapter = Path(adapter) if adapter is not None else None
    if adapter is not None and not adapter.exists():
        raise FileNotFoundError(f"Adapter not found: {adapter}; give a fit.py .ckpt or a PEFT adapter folder")
    ckpt = _read_ckpt(adapter) if adapter is not None and adapter.is_file() else None
    hp = (ckpt or {}).get("hyper_parameters", {})
    if ckpt is not None and "state_dict" not in ckpt:
        raise ValueError(f"{adapter}: no state_dict; is it a fit.py checkpoint?")
    checkpoint_dir = checkpoint_dir if checkpoint_dir is not None else hp.get("checkpoint_dir")
    preset = model or hp.get("model")
    config = LlamaConfig.from_name(preset) if preset else None
    base = build_model(config, checkpoint_dir, base_dtype, device, seed=hp.get("init_seed", 0))
    lora: dict[str, Any] | None = None
    if ckpt is not None:
        lora = hp.get("lora")
        if lora:
            apply_lora(base, lora["targets"], lora["r"], lora["alpha"], lora["dropout"])
        sd = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
        _load_partial(base, sd, adapter)
    elif adapter is not None:
        sd, lora = import_peft(adapter, base.config)
        apply_lora(base, lora["targets"], lora["r"], lora["alpha"], lora["dropout"])
        _load_partial(base, sd, adapter)
    base.eval()
    return LoadedModel(base, base.config, lora, (ckpt or {}).get("datamodule_hyper_parameters", {}))


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


def export_peft(model: Llama, lora: dict[str, Any], out_dir: str | Path, base_model: str = "meta-llama/Llama-2-7b-hf"
                ) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as HF PEFT does for a LLaMA model.

    HF's q_proj/k_proj rows are permuted relative to Meta's (rotate-half RoPE); since delta W = B A, the same row
    permutation applies to lora_B of q and k, and lora_A is unchanged.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config, tensors = model.config, {}
    for name, layer in lora_layers(model):
        a, b = layer.lora_a.detach().float().contiguous(), layer.lora_b.detach().float()
        if name.endswith("attention.wq"):
            b = permute_to_hf(b, config.n_heads)
        elif name.endswith("attention.wk"):
            b = permute_to_hf(b, config.n_kv_heads)
        peft = _peft_name(name)
        tensors[f"{peft}.lora_A.weight"] = a
        tensors[f"{peft}.lora_B.weight"] = b.contiguous()
    if not tensors:
        raise ValueError("export_peft: the model has no LoRA layers")
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
        "target_modules": sorted(_HF_MODULE[t] for t in lora["targets"]), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
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
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora"):
        raise ValueError(f"{cfg_file}: only plain LoRA adapters are supported (peft_type LORA, no DoRA/rsLoRA)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{cfg_file}: per-module rank_pattern/alpha_pattern are not supported")
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    unknown = sorted(set(targets) - set(_META_MODULE))
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
            m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
            if not m:
                raise ValueError(f"{weights}: unexpected tensor {key!r} in a LoRA adapter")
            module = hf_key_to_meta(m.group(1) + ".weight").removesuffix(".weight")
            t = f.get_tensor(key)
            if m.group(2) == "B" and module.endswith("attention.wq"):
                t = permute_from_hf(t, config.n_heads)
            elif m.group(2) == "B" and module.endswith("attention.wk"):
                t = permute_from_hf(t, config.n_kv_heads)
            sd[f"{module}.lora_{m.group(2).lower()}"] = t
    ours = {_META_MODULE[t] for t in targets}
    lora = {"targets": [t for t in LORA_TARGETS if t in ours], "r": int(cfg["r"]), "alpha": float(cfg["lora_alpha"]),
            "dropout": float(cfg.get("lora_dropout", 0.0))}
    return sd, lora


def merged_state_dict(model: Llama, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fold every LoRA layer into its weight (in the weights' precision: load the base in fp32 to merge in fp32),
    drop the LoRA tensors, and cast to ``dtype``."""
    merge_lora(model, unload=True)
    return {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
