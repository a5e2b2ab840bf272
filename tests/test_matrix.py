"""The combination matrix: a pairwise covering set over the knobs a user turns, each combination run end to end
through the scripts as a user runs them: fit (validation, sample generations, held-out accuracy, checkpoints), a
one-step resume, generate, evaluate, merge (Meta's and HF's formats by turns), export, and generate on the merged
folder. Each
combination passes every step, or is refused at start-up in one line.

A fast slice runs in the default suite; the whole set is marked slow (``pytest -m slow tests/test_matrix.py``).
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, tiny_family, write_tiny_config

from llama_lora.weights import build_model, save_hf, save_llama2c, save_meta

KNOBS: dict[str, tuple] = {
    "precision": ("32-true", "bf16-mixed", "bf16-true"),
    "base_dtype": ("auto", "fp32", "bf16", "nf4"),
    "source": ("random", "meta-bf16", "hf-fp16", "llama2c"),
    "targets": ("attention", "all", "full"),
    "packing": (False, True),
    "gc": (False, True),
    "accumulate": (1, 2),
    "processes": (1, 2),
}
TARGETS = {"attention": ["wq", "wk", "wv", "wo"], "all": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"], "full": None}


def pairwise(knobs: dict[str, tuple], seed: int = 0, candidates: int = 50) -> list[dict]:
    """A covering set of combinations in which every pair of values of every two knobs occurs at least once
    (greedy, as AETG: each new combination is the best of ``candidates`` seeded draws at covering pairs not yet
    covered). Deterministic for a seed."""
    names = list(knobs)
    uncovered = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2) for x in knobs[a] for y in knobs[b]}
    rng = random.Random(seed)
    rows = []

    def pairs(row: dict) -> set:
        return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}

    while uncovered:
        (a, x), (b, y) = min(uncovered, key=repr)  # start from a pair still uncovered: every row makes progress
        best = None
        for _ in range(candidates):
            row = {n: rng.choice(knobs[n]) for n in names} | {a: x, b: y}
            if best is None or len(pairs(row) & uncovered) > len(pairs(best) & uncovered):
                best = row
        rows.append(best)
        uncovered -= pairs(best)
    return rows


# Two rows beyond the pairwise set, for the bases a user brings with their own tokenizer: a GGUF file (its
# SentencePiece tokenizer inside) trained into NF4, and an HF folder with only a tokenizer.json (and its ChatML
# template) trained in two processes; both with packing.
OWN_TOKENIZER = [
    {"precision": "bf16-mixed", "base_dtype": "nf4", "source": "gguf-q8_0", "targets": "all", "packing": True,
     "gc": True, "accumulate": 2, "processes": 1},
    {"precision": "32-true", "base_dtype": "auto", "source": "hf-tokenizer.json", "targets": "attention",
     "packing": True, "gc": False, "accumulate": 1, "processes": 2}]
# And a row for each Qwen family, as users bring them: an HF folder with a Qwen-style tokenizer.json (ChatML, the
# embedding padded beyond the tokenizer), one QDoRA with packing and accumulation, one DoRA in two processes.
FAMILIES = [
    {"precision": "bf16-mixed", "base_dtype": "nf4", "source": "hf-qwen2.5", "targets": "all", "packing": True,
     "gc": True, "accumulate": 2, "processes": 1, "dora": True},
    {"precision": "32-true", "base_dtype": "auto", "source": "hf-qwen3", "targets": "all", "packing": False,
     "gc": False, "accumulate": 1, "processes": 2, "dora": True}]
# And preference tuning (data.format preference), as users follow SFT with it: DPO on an NF4 base with DoRA under
# bf16-mixed with checkpointing and accumulation; SimPO (no reference) and IPO (its reference precomputed) in two
# processes on HF fp16 and Meta bf16 bases.
PREFERENCE = [
    {"precision": "bf16-mixed", "base_dtype": "nf4", "source": "meta-bf16", "targets": "all", "packing": False,
     "gc": True, "accumulate": 2, "processes": 1, "dora": True, "preference": {"loss": "dpo", "beta": 0.1}},
    {"precision": "32-true", "base_dtype": "auto", "source": "hf-fp16", "targets": "attention", "packing": False,
     "gc": False, "accumulate": 1, "processes": 2, "preference": {"loss": "simpo", "beta": 2.0}},
    {"precision": "bf16-true", "base_dtype": "bf16", "source": "meta-bf16", "targets": "all", "packing": False,
     "gc": True, "accumulate": 1, "processes": 2,
     "preference": {"loss": "ipo", "beta": 0.1, "precompute_reference": True}}]
# And QLoRA sharded: QDoRA on an NF4 base under FSDP2 in two processes (each quantizing its own rows), with packing,
# checkpointing and accumulation, from a Meta bf16 base whose FFN is 192 wide (rows of whole NF4 blocks).
SHARDED = [
    {"precision": "bf16-mixed", "base_dtype": "nf4", "source": "meta-bf16-ffn192", "targets": "all", "packing": True,
     "gc": True, "accumulate": 2, "processes": 2, "dora": True, "strategy": "fsdp2"}]
COMBINATIONS = pairwise(KNOBS) + OWN_TOKENIZER + FAMILIES + PREFERENCE + SHARDED
STRATEGIES = {"ddp": "ddp",
              "fsdp2": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1,
                                      "save_distributed_checkpoint": False}}}
FAST = [0]  # the slice in the default suite (NF4, bf16-mixed, packing, checkpointing)


def test_the_combinations_cover_every_pair():
    names = list(KNOBS)
    for a, b in itertools.combinations(names, 2):
        for x, y in itertools.product(KNOBS[a], KNOBS[b]):
            assert any(row[a] == x and row[b] == y for row in COMBINATIONS), (a, x, b, y)
    assert len(COMBINATIONS) <= 24 + len(OWN_TOKENIZER) + len(FAMILIES) + len(PREFERENCE) + len(SHARDED)


def source_checkpoint(kind: str, folder: Path, cache_dir: Path) -> tuple[str | None, str | None]:
    """The base as users download it, and the tokenizer the run reads (None: the demo's own): Meta's bf16
    consolidated.00.pth, HF's fp16 safetensors, a llama2.c .bin (fp32, shared classifier), a q8_0 GGUF with its
    SentencePiece tokenizer inside, or an HF folder whose tokenizer is a byte-level BPE tokenizer.json with a ChatML
    chat template in its tokenizer_config.json."""
    if kind == "random":
        return None, None
    family = {"hf-qwen2.5": "qwen2", "hf-qwen3": "qwen3"}.get(kind, "llama")
    config = tiny_family(family, tie_embeddings=kind == "llama2c" or family == "qwen2",
                         **({"hidden_dim": 192} if kind.endswith("-ffn192") else {}))
    dtype = {"meta-bf16": torch.bfloat16, "meta-bf16-ffn192": torch.bfloat16, "hf-fp16": torch.float16,
             "llama2c": torch.float32, "gguf-q8_0": torch.float32, "hf-tokenizer.json": torch.bfloat16,
             "hf-qwen2.5": torch.bfloat16, "hf-qwen3": torch.bfloat16}[kind]
    sd = build_model(config, plan=dtype, seed=11).state_dict()
    if kind == "llama2c":
        return str(save_llama2c(sd, config, folder / "base.bin")), None
    if kind == "gguf-q8_0":
        from llama_lora.demo import demo_tokenizer_file
        from llama_lora.gguf_files import write_model
        from llama_lora.tokenizer import Tokenizer

        path = write_model(folder / "base.gguf", config, {k: tuple(v.shape) for k, v in sd.items()}, sd.items(),
                           Tokenizer(demo_tokenizer_file(512, cache_dir)), "q8_0")
        return str(path), str(path)
    base = (save_meta if kind.startswith("meta-bf16") else save_hf)(sd, config, folder / "base")
    if kind == "hf-tokenizer.json":
        return str(base), str(bpe_tokenizer_json(Path(base), config.vocab_size))
    if family != "llama":  # Qwen's embedding has rows beyond its tokenizer's tokens
        return str(base), str(bpe_tokenizer_json(Path(base), config.vocab_size - 4, bos=None))
    return str(base), None


def bpe_tokenizer_json(folder: Path, vocab_size: int, bos: str | None = "<|im_start|>") -> Path:
    """A byte-level BPE of ``vocab_size`` tokens trained by HF's tokenizers on the demo's prose, with ChatML's tokens,
    as an HF folder ships it: tokenizer.json and a tokenizer_config.json with its BOS (Qwen's: none)/EOS and chat
    template."""
    import json

    import tokenizers

    from llama_lora.demo import prose
    from llama_lora.prompts import FORMATS

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    tk.train_from_iterator(prose(200), tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    assert tk.get_vocab_size() == vocab_size
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": FORMATS["chatml"].jinja}))
    return folder / "tokenizer.json"


def run(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "PYTHONWARNINGS": "ignore"})


def passed(proc: subprocess.CompletedProcess, step: str, combination: dict) -> None:
    assert proc.returncode == 0, f"{step} failed for {combination}:\n{proc.stderr[-4000:]}"


def refused_in_one_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return errors[0]


def run_combination(index: int, tmp_path: Path, cache_dir: Path) -> None:
    """Combination ``index`` end to end. Merged into one format each, Meta's or HF's by turns (every script start
    costs seconds: the two formats' own tests are in test_adapters.py and test_weights.py)."""
    c = COMBINATIONS[index]
    fmt = ("meta", "hf")[index % 2]
    base, own_tokenizer = source_checkpoint(c["source"], tmp_path, cache_dir)
    lora = {"targets": TARGETS[c["targets"]], "r": 4, "alpha": 8, "dropout": 0.0,
            "use_dora": c.get("dora", False)} if TARGETS[c["targets"]] else None
    config = write_tiny_config(
        tmp_path, cache_dir,
        trainer={"precision": c["precision"], "max_steps": 2, "val_check_interval": 2 * c["accumulate"],
                 "limit_val_batches": 1, "accumulate_grad_batches": c["accumulate"], "devices": c["processes"],
                 **({"strategy": STRATEGIES[c.get("strategy", "ddp")]} if c["processes"] > 1 else {})},
        model={"base_dtype": c["base_dtype"], "checkpoint_dir": base, "lora": lora, "gradient_checkpointing": c["gc"],
               # a base of another shape than the tiny preset's: its own config
               **({"model": None} if c["source"].startswith("hf-qwen") or "ffn192" in c["source"] else {}),
               **({"preference": c["preference"]} if "preference" in c else {})},
        data={"packing": c["packing"], "micro_batch_size": 2, "tokenizer_path": own_tokenizer,
              **({"format": "preference"} if "preference" in c else {}),
              # a tokenizer.json base's own (ChatML) template: the demo's instructions as two-turn conversations
              "chat_template": "model" if c["source"].startswith("hf-") and own_tokenizer else None})
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["scheduler"]["init_args"].pop("max_steps")  # the run's length, so the resume below stretches it
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1
    cfg["trainer"]["callbacks"] += [
        {"class_path": "llama_lora.callbacks.SampleGenerations",
         "init_args": {"prompts": ["Name a colour. Café, naïve, 東京 🚀"], "max_new_tokens": 4}},
        {"class_path": "llama_lora.callbacks.InstructionAccuracy", "init_args": {"max_new_tokens": 2, "show": 1}}]
    config.write_text(yaml.safe_dump(cfg))
    fit = run(str(ROOT / "scripts" / "fit.py"), "--config", str(config))
    if c["base_dtype"] == "nf4" and lora is None:  # a 4-bit base cannot be trained: refused before anything runs
        assert "needs model.lora" in refused_in_one_line(fit)
        return
    passed(fit, "fit", c)
    assert "Tuned model (after)" in fit.stdout and "Plan: cpu" in " ".join(fit.stderr.split())
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    passed(run(str(ROOT / "scripts" / "fit.py"), "--config", str(config), "--ckpt_path", "last",
               "--trainer.max_steps", "3"), "resume", c)
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    if own_tokenizer is not None:  # the run reads back with the base's own tokenizer (and template)
        from llama_lora.trained_run import open_run

        run_back = open_run(ckpt)
        assert str(run_back.tokenizer_path) == own_tokenizer
        assert run_back.prompt_format.name == ("chatml" if c["source"].startswith("hf-") else "alpaca")
    tokenizer = own_tokenizer or str(next(cache_dir.glob("demo-tokenizer-512-*.model")))
    scripts = ROOT / "scripts"
    prompt = "What colour is a lemon? Café 東京"
    passed(run(str(scripts / "generate.py"), "--adapter", str(ckpt), "--greedy", "--max_new_tokens", "4",
               "--precision", c["precision"], prompt), "generate", c)
    passed(run(str(scripts / "evaluate.py"), "--adapter", str(ckpt), "--precision", c["precision"], "--out",
               str(tmp_path / "eval.json")), "evaluate", c)
    passed(run(str(scripts / "merge.py"), "--adapter", str(ckpt), "--out_dir", str(tmp_path / f"merged-{fmt}"),
               "--format", fmt), f"merge {fmt}", c)
    export = run(str(scripts / "export_adapter.py"), "--adapter", str(ckpt), "--out_dir", str(tmp_path / "peft"))
    if lora is None:  # a fully fine-tuned model has no adapter to export: refused in one line, merge is the way
        assert "merge it instead" in refused_in_one_line(export)
    else:
        passed(export, "export", c)
    passed(run(str(scripts / "generate.py"), "--checkpoint_dir", str(tmp_path / f"merged-{fmt}"),
               "--tokenizer_path", tokenizer, "--greedy", "--max_new_tokens", "4", prompt),
           f"generate on the merged {fmt}", c)


def _id(c: dict) -> str:
    return "-".join(v["loss"] if isinstance(v, dict) else str(v) if not isinstance(v, bool) else (k if v else f"no{k}")
                    for k, v in c.items())


@pytest.mark.parametrize("index", FAST, ids=lambda i: _id(COMBINATIONS[i]))
def test_a_fast_slice_of_the_matrix(index, tmp_path, cache_dir):
    run_combination(index, tmp_path, cache_dir)


SLOW = [i for i in range(len(COMBINATIONS)) if i not in FAST]


@pytest.mark.slow
@pytest.mark.parametrize("index", SLOW[::2], ids=lambda i: _id(COMBINATIONS[i]))
def test_the_combination_matrix(index, tmp_path, cache_dir):
    run_combination(index, tmp_path, cache_dir)


class TestTheOtherHalf:
    """The other half of the matrix: `make test` (pytest-xdist, --dist loadscope) hands each module, and each class,
    to one worker, and the matrix alone is a third of the suite's time, so it is two units of work, not one."""

    @pytest.mark.slow
    @pytest.mark.parametrize("index", SLOW[1::2], ids=lambda i: _id(COMBINATIONS[i]))
    def test_the_combination_matrix(self, index, tmp_path, cache_dir):
        run_combination(index, tmp_path, cache_dir)
