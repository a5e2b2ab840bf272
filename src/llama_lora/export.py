"""A trained run written out: merged into its base (HF, Meta or GGUF, tensor by tensor from the memory-mapped base),
or its adapter exported alone (HF PEFT, a llama.cpp LoRA GGUF). Each output carries the prompt format the run trained
in: a GGUF's ``tokenizer.chat_template`` and an Ollama Modelfile, ``chat_template.jinja`` beside HF, Meta and PEFT
folders."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

import torch

from .gguf_files import GGUFType, write_lora, write_model, write_modelfile
from .layout import is_block_linear
from .lora import merged_weight
from .peft import export_peft, is_peft
from .plan import DTYPES
from .quant import NF4Weight, quantize
from .tokenizer import CHAT_TEMPLATE_FILE
from .trained_run import TrainedRun, open_run
from .weights import build_model, open_checkpoint, save_hf, save_meta
from .weights.tensors import LazyStateDict, check_output_dir

log = logging.getLogger(__name__)


def merged_weights(base: Mapping[str, torch.Tensor], run: TrainedRun | None, dtype: torch.dtype | None = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's tensors with the run's trained tensors folded in (None: the base as it is), one at a time, in
    ``dtype`` (None: each tensor's own).

    Each LoRA update is computed in fp32, added to the fp32 upcast of its weight and cast once, as
    ``LoRALinear.merge`` does. A tensor whose dtype stays is rewritten in place: a memory-mapped checkpoint's mapping
    is private (copy-on-write), so merging 7B holds the base in its dtype plus one layer, never a second copy. A
    tied output layer shares the embedding's storage: its merged weight is a copy, and the embedding stays as it was.
    An adapter trained on an NF4 base is folded into the dequantized NF4 weights it was trained on.
    """
    trained = run.tensors if run is not None else {}
    scaling = run.lora.scale if run is not None and run.lora is not None else None
    unknown = sorted({k.rsplit(".", 1)[0] + ".weight" for k in trained} - set(base)) if scaling is not None else sorted(
        set(trained) - set(base))
    if unknown:
        raise ValueError(f"{run.source}: the adapter changes {unknown[0]!r} ({len(unknown)} in all), which the "
                         "base does not have; was it trained on another model?")
    quantized = run is not None and run.quantization == "nf4"
    embedding = base["tok_embeddings.weight"] if "tok_embeddings.weight" in base else None
    for key in base:
        t = base[key]
        module = key.removesuffix(".weight")
        nf4 = isinstance(t, NF4Weight) or (quantized and is_block_linear(key))
        if nf4:  # the 4-bit weights the adapter trained on (a random NF4 base is rebuilt quantized already)
            full = (t if isinstance(t, NF4Weight) else quantize(t)).dequantize(torch.float32)
        else:
            full = t.float()
        if scaling is not None and f"{module}.lora_a" in trained:
            a, b = trained[f"{module}.lora_a"].float(), trained[f"{module}.lora_b"].float()
            if (b.shape[0], a.shape[1]) != tuple(t.shape):
                raise ValueError(f"{run.source}: LoRA of {module!r} is for a ({b.shape[0]}, {a.shape[1]}) weight, "
                                 f"the base's is {tuple(t.shape)}")
            merged = merged_weight(full, a, b, scaling, trained.get(f"{module}.lora_magnitude")).to(dtype or t.dtype)
        elif scaling is None and key in trained:  # full fine-tuning: the trained weight replaces the base's
            merged = trained[key].to(dtype or t.dtype)
        elif nf4:  # not adapted, but what the adapter was trained with
            merged = full.to(dtype or t.dtype)
        else:
            yield key, t.to(dtype or t.dtype)
            continue
        shared = key != "tok_embeddings.weight" and embedding is not None and t.data_ptr() == embedding.data_ptr()
        if merged.dtype == t.dtype and not isinstance(t, NF4Weight) and not shared:
            merged = t.copy_(merged)
        yield key, merged


def untied_if_adapted(config, run: TrainedRun | None):
    """The config of the merged model: a LoRA on a tied output layer gives it weights of its own (the embedding
    stays the base's), so the merged model is untied."""
    if config.tie_embeddings and run is not None and run.lora is not None and "output.lora_a" in run.tensors:
        log.info("merge: the adapter changes the tied output layer: the merged model has an output layer of its own")
        return dataclasses.replace(config, tie_embeddings=False)
    return config


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
        tokenizer_path: the tokenizer to write beside the weights or into the GGUF (default: the adapter's, or the
            base's): tokenizer.model as it is, a tokenizer.json or a GGUF's own as tokenizer.json.
    """
    if adapter is None and checkpoint_dir is None:
        raise ValueError("merge: give --adapter (a fit.py checkpoint or a PEFT folder), or --checkpoint_dir alone to "
                         "convert a base")
    if format == "gguf" and base_dtype is not None:
        raise ValueError(f"merge: --base_dtype is for the hf and meta formats; a GGUF's type is --gguf_type "
                         f"(f32, f16, bf16, q8_0, ...), not --base_dtype {base_dtype}")
    run = open_run(adapter, checkpoint_dir, model, tokenizer_path)
    if run.checkpoint_dir is not None:
        base_folder = Path(run.checkpoint_dir) if Path(run.checkpoint_dir).is_dir() else Path(run.checkpoint_dir).parent
        if Path(out_dir).resolve() == base_folder.resolve():
            raise ValueError(f"merge: --out_dir {out_dir} is the base's own folder: the merged weights would replace "
                             "the base (and an adapter pointing at it would be applied twice); write them elsewhere")
    check_output_dir(out_dir, "merge --out_dir")
    try:
        tokenizer = run.tokenizer()
    except (ValueError, FileNotFoundError) as e:
        if tokenizer_path is not None:
            raise
        if format == "gguf":
            raise ValueError(f"merge --format gguf embeds the tokenizer and found none ({e}); pass --tokenizer_path"
                             ) from None
        tokenizer = None
        log.warning("merge: no tokenizer to copy beside the weights (%s); pass --tokenizer_path", e)
    trained = run if run.adapted else None
    if run.checkpoint_dir is None:  # the random init a fit.py run started from (demo and test presets)
        if run.config is None:
            raise ValueError("merge: the base is unknown; give checkpoint_dir (or a model preset)")
        config = run.config
        base: Mapping[str, torch.Tensor] = build_model(config, None, run.plan or torch.float32,
                                                       seed=run.init_seed).state_dict()
    else:
        base, _, config = open_checkpoint(run.checkpoint_dir, run.config)
    config = untied_if_adapted(config, trained)
    if tokenizer is not None:
        tokenizer.check_fits(config.vocab_size)
    # The prompt the model answers in: the run's, or one the base carries; a base alone, converted, has none.
    fmt = run.prompt_format if run.adapted or run.format_source is not None else None
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
                    chat_template=fmt.jinja if fmt is not None else None)
        if fmt is not None:
            write_modelfile(path, fmt)
        return Path(out_dir)
    merged = dict(merged_weights(base, trained, DTYPES[base_dtype] if base_dtype else None))
    if format == "meta":
        save_meta(merged, config, out_dir)
    else:
        save_hf(merged, config, out_dir, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_to(Path(out_dir))
    if fmt is not None:
        (Path(out_dir) / CHAT_TEMPLATE_FILE).write_text(fmt.jinja)
    return Path(out_dir)


def export_adapter(adapter: str, out_dir: str, base_model: str | None = None,
                   format: Literal["peft", "gguf"] = "peft") -> Path:
    """Write a fit.py LoRA checkpoint in HF PEFT's format, or as a llama.cpp LoRA GGUF, reading the adapter only (no
    base weight). The PEFT folder carries the run's prompt format (chat_template.jinja).

    Args:
        adapter: a fit.py .ckpt trained with LoRA.
        out_dir: the folder to write (adapter_config.json + adapter_model.safetensors; or adapter.gguf, which
            `llama-cli -m base.gguf --lora adapter.gguf` applies to the base's own GGUF).
        base_model: base_model_name_or_path in adapter_config.json (default: the folder of the base the adapter was
            trained on, as an absolute path; null for a random base).
    """
    if is_peft(Path(adapter)):
        raise ValueError(f"{adapter} is already a PEFT adapter; export_adapter takes a fit.py .ckpt or run folder")
    run = open_run(adapter)
    if run.lora is None:
        raise ValueError(f"{adapter} was trained without LoRA (lora: null); merge it instead (scripts/merge.py)")
    if run.config is None:  # HF's q/k permutation needs the model's head counts
        raise ValueError(f"{adapter}: the run names neither a preset nor a base folder to take the model's shape from")
    check_output_dir(out_dir, "export_adapter --out_dir")
    if base_model is None and run.checkpoint_dir is not None:
        base_model = str(Path(run.checkpoint_dir).resolve())
    if format == "gguf":
        if run.config.tie_embeddings and "output.lora_a" in run.tensors:
            raise ValueError(f"{adapter}: the adapter changes the output layer, which this model ties to the embedding "
                             "(a tied GGUF has no output.weight for llama.cpp to apply it to); merge it instead: "
                             "scripts/merge.py --format gguf")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_lora(Path(out_dir) / "adapter.gguf", run.config, run.lora, run.tensors)
        return Path(out_dir)
    return export_peft(run.tensors, run.config, run.lora, out_dir, base_model, run.prompt_format)

