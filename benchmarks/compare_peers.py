"""llama-lora against LitGPT and torchtune on the same LoRA work, side by side on this machine.

The peers are never dependencies: install them into a scratch virtual environment and pass its interpreter.

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0 litgpt==0.5.13 torchtune==0.6.1 \
        torchao==0.10.0
    python benchmarks/compare_peers.py step --peer-python /tmp/peers/bin/python
    python benchmarks/compare_peers.py epoch --peer-python /tmp/peers/bin/python \
        --tokenizer ../shared/assets/tokenizer.model --data ../shared/assets/alpaca_5000.json

--precision auto (the default) runs every tool in the precision this CPU computes natively: bf16 where it has native
bf16 (AVX-512 BF16 / AMX), fp32 on an AVX2-only CPU, where bf16 matmuls are emulated at about 1 GFLOP/s. Every row
records the CPU kind it came from.

step: one LoRA training step (r=8 on the query and value projections, random weights, AdamW; bf16: a bf16 frozen base
with fp32 LoRA weights under bf16 autocast; fp32: everything fp32) on identical random batches of 4 x 256 tokens of the
`small` shape (dim 512, 8 layers, ffn 1376, vocab 32000). Each peer runs its own fine-tuning step (LitGPT:
`lm_head_chunk_size=128` and `chunked_cross_entropy` as in finetune_lora; torchtune: chunked output and
`CEWithChunkedOutputLoss` as in its LoRA recipe) and, as "-full-logits", the same model with one output matmul and a
plain cross-entropy, which is faster on a CPU. Each tool runs in its own process per round, the order alternates between
rounds, and the table gives the median over rounds of each round's median step time, and the highest peak RSS.

epoch: one epoch of the first 1,000 Alpaca records with the real LLaMA-2 tokenizer, max_seq_len 512, micro-batch 4,
prompt masked, shape `small`, random init, LoRA r=8 on q and v: `scripts/fit.py` (length grouping, or --packing)
against `litgpt finetune_lora` (its own data pipeline; bf16-true, its fastest setting with native bf16, or 32-true)
and torchtune's `lora_finetune_single_device` recipe (its own alpaca_dataset read from the local JSON; dtype bf16 or
fp32). Wall time of the whole command, data preparation included.

dpo: one DPO step (beta 0.1, LoRA r=8 on the query and value projections, AdamW) on 2 pairs of 256 tokens (a
128-token prompt shared by a 128-token chosen and rejected completion, random tokens) of the `small` shape: ours
(`preference.score_pairs`: the reference pass in place with the adapters off, then the policy's pass over the 4 rows)
against TRL's `DPOTrainer` with a PEFT `LoraConfig` (its reference: the adapter disabled), the peer's interpreter
needing trl, peft and transformers (`pip install trl==1.16.0 peft==0.21.2 transformers==5.25.0`). TRL's step is
timed from its Trainer's on_step_begin to on_step_end (the batch fetched before). Alternating rounds, each tool in its
own process; peak RSS with the RSS before the model.

Prints a table with ratios and writes the raw JSON lines to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(dim=512, n_layers=8, n_heads=8, ffn=1376, vocab=32000)
TOOLS = ("llama-lora", "litgpt", "litgpt-full-logits", "torchtune", "torchtune-full-logits")


def cpu_kind() -> str:
    from llama_lora.plan import native_precision

    return "native bf16" if native_precision("cpu")[0] == "bf16-mixed" else "AVX2 only (no native bf16)"


def resolve_precision(precision: str) -> str:
    """The compute dtype every tool runs in ("bf16" or "fp32"): the run plan's choice for this CPU under "auto"."""
    from llama_lora.plan import resolve_precision as plan_precision

    return {"bf16-mixed": "bf16", "32-true": "fp32"}[plan_precision(precision, "cpu")[0]]


def peak_rss_gib() -> float:
    # The peers' interpreters have no llama_lora installed; its memory module needs nothing but torch.
    sys.path.insert(0, str(ROOT / "src"))
    from llama_lora.memory import GIB, peak_rss_bytes

    return peak_rss_bytes() / GIB


# ----- one tool's step, run in that tool's interpreter (no llama_lora import for the peers) -----


def build_llama_lora(dtype):
    import torch

    from llama_lora.config import LlamaConfig
    from llama_lora.lora import LoRASettings, apply_lora, mark_only_lora_as_trainable
    from llama_lora.loss import token_loss_sum
    from llama_lora.plan import make_plan
    from llama_lora.weights import build_model

    precision = "bf16-mixed" if dtype == torch.bfloat16 else "32-true"  # the tools' common setting, as a run plan
    model = build_model(LlamaConfig.from_name("small"), plan=make_plan("cpu", precision), seed=0)
    apply_lora(model, LoRASettings(["wq", "wv"], r=8, alpha=16, dropout=0.0))
    mark_only_lora_as_trainable(model)

    def loss_fn(x):
        labels = x.clone()
        labels[:, 0] = -100  # the first position has no previous token; every other one is a target
        loss_sum, n = token_loss_sum(model, x, labels)
        return loss_sum / n

    return model, loss_fn


def build_litgpt(dtype, chunked: bool = True):
    import torch.nn.functional as F
    from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
    from litgpt.utils import chunked_cross_entropy

    config = Config(name="small", block_size=2048, vocab_size=SMALL["vocab"], padded_vocab_size=SMALL["vocab"],
                    n_layer=SMALL["n_layers"], n_head=SMALL["n_heads"], n_embd=SMALL["dim"],
                    n_query_groups=SMALL["n_heads"], rotary_percentage=1.0, parallel_residual=False, bias=False,
                    norm_class_name="RMSNorm", norm_eps=1e-5, mlp_class_name="LLaMAMLP",
                    intermediate_size=SMALL["ffn"], lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_query=True,
                    lora_value=True)
    model = GPT(config)
    model.max_seq_length = 256
    _set_base_dtype(model, dtype)
    mark_only_lora_as_trainable(model)

    def loss_fn(x):
        if not chunked:  # one output matmul and a plain cross-entropy over all positions
            return F.cross_entropy(model(x)[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())
        logits = model(x, lm_head_chunk_size=128)  # LitGPT's finetune_lora step, as in litgpt/finetune/lora.py
        logits[-1] = logits[-1][..., :-1, :]
        return chunked_cross_entropy(logits, x[..., 1:])

    return model, loss_fn


def build_torchtune(dtype, chunked: bool = True):
    import torch
    import torch.nn.functional as F
    from torchtune.models.llama2 import lora_llama2
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    model = lora_llama2(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=False, apply_lora_to_output=False,
                        vocab_size=SMALL["vocab"], num_layers=SMALL["n_layers"], num_heads=SMALL["n_heads"],
                        num_kv_heads=SMALL["n_heads"], embed_dim=SMALL["dim"], max_seq_len=2048,
                        intermediate_dim=SMALL["ffn"], norm_eps=1e-5, lora_rank=8, lora_alpha=16, lora_dropout=0.0)
    set_trainable_params(model, get_adapter_params(model))
    _set_base_dtype(model, dtype)
    ce = CEWithChunkedOutputLoss()
    if chunked:
        model.set_num_output_chunks(ce.num_output_chunks)  # torchtune's lora_finetune_single_device recipe

    def loss_fn(x):
        labels = torch.hstack((x[:, 1:], torch.full_like(x[:, :1], -100)))
        if chunked:
            return ce(model(x), labels)
        # The same model with one output matmul: on CPU the chunked output above copies the weight per chunk.
        return F.cross_entropy(model(x).float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    return model, loss_fn


def _set_base_dtype(model, dtype) -> None:
    """The frozen base in ``dtype``, fp32 LoRA weights: the same storage for every tool."""
    import torch

    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if "lora" in name else dtype)


def step_worker(tool: str, steps: int, warmup: int, precision: str) -> dict:
    import torch

    torch.manual_seed(0)
    baseline = peak_rss_gib()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    builders = {"llama-lora": build_llama_lora, "litgpt": build_litgpt,
                "litgpt-full-logits": lambda d: build_litgpt(d, chunked=False), "torchtune": build_torchtune,
                "torchtune-full-logits": lambda d: build_torchtune(d, chunked=False)}
    model, loss_fn = builders[tool](dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, SMALL["vocab"], (warmup + steps, 4, 256), generator=g)
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(data[i])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    step_s = statistics.median(times)
    return {"tool": tool, "step_s": step_s, "tokens_per_s": 4 * 256 / step_s, "peak_rss_gib": peak_rss_gib(),
            "baseline_rss_gib": baseline, "trainable_params": trainable, "first_loss": losses[0],
            "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": precision}


def dpo_worker(tool: str, steps: int, warmup: int, precision: str, pairs: int = 2, seq: int = 256) -> dict:
    """One tool's DPO steps on ``pairs`` pairs of ``seq`` tokens (prompt: the first half) in this process."""
    import torch

    torch.manual_seed(0)
    baseline = peak_rss_gib()
    half = seq // 2
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, SMALL["vocab"], (warmup + steps, pairs, half), generator=g)
    answers = torch.randint(3, SMALL["vocab"], (warmup + steps, 2, pairs, half - 1), generator=g)
    times = []
    if tool == "llama-lora":
        from llama_lora.loss import IGNORE_INDEX
        from llama_lora.preference import PreferenceSettings, score_pairs

        model, _ = build_llama_lora(torch.bfloat16 if precision == "bf16" else torch.float32)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        settings = PreferenceSettings(loss="dpo", beta=0.1)
        for i in range(warmup + steps):  # rows: chosen then rejected, each prompt + answer + EOS (id 2)
            rows = [torch.cat([prompts[i, j], answers[i, side, j], torch.tensor([2])]) for side in (0, 1)
                    for j in range(pairs)]
            ids = torch.stack(rows)
            labels = ids.clone()
            labels[:, :half] = IGNORE_INDEX
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = score_pairs(model, ids, labels, settings).losses.mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    else:  # TRL's DPOTrainer + PEFT, on a word-level tokenizer whose words are the token ids (no merges to differ)
        import tempfile

        import tokenizers
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
        from trl import DPOConfig, DPOTrainer

        tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(SMALL["vocab"])},
                                                              unk_token="t0"))
        tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t2", bos_token="t1")

        def text(t) -> str:
            return " ".join(f"t{int(i)}" for i in t)

        records = [{"prompt": text(prompts[i, j]), "chosen": text(answers[i, 0, j]), "rejected": text(answers[i, 1, j])}
                   for i in range(warmup + steps) for j in range(pairs)]
        config = LlamaConfig(vocab_size=SMALL["vocab"], hidden_size=SMALL["dim"], intermediate_size=SMALL["ffn"],
                             num_hidden_layers=SMALL["n_layers"], num_attention_heads=SMALL["n_heads"],
                             num_key_value_heads=SMALL["n_heads"], tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
        if precision == "bf16":
            model = model.to(torch.bfloat16)  # PEFT keeps its adapters in fp32 (autocast_adapter_dtype)

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                times.append(time.perf_counter() - self.t)

        args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=pairs, max_steps=warmup + steps,
                         learning_rate=1e-5, logging_steps=10**6, report_to=[], save_strategy="no",
                         bf16=precision == "bf16", use_cpu=True, max_length=seq + 8, beta=0.1,
                         dataloader_num_workers=0)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok,
                             peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj"]), callbacks=[Timer()])
        trainer.train()
        times = times[warmup:]
    return {"tool": tool, "step_s": statistics.median(times), "peak_rss_gib": peak_rss_gib(),
            "baseline_rss_gib": baseline, "precision": precision, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def compare_dpo(args) -> list[dict]:
    tools = ["llama-lora"] + (["trl"] if args.peer_python else [])
    rounds: dict[str, list[dict]] = {t: [] for t in tools}
    for r in range(args.rounds):
        for tool in tools if r % 2 == 0 else reversed(tools):
            python = sys.executable if tool == "llama-lora" else args.peer_python
            result = run_json([python, __file__, "dpo-worker", tool, "--steps", str(args.steps), "--warmup",
                               str(args.warmup), "--precision", args.precision])
            rounds[tool].append(result)
            print(f"round {r + 1}/{args.rounds} {tool:10s} {result['step_s']:.3f} s/step  "
                  f"peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)
    return [{"bench": "dpo", "tool": tool, "step_s": statistics.median(r["step_s"] for r in results),
             "peak_rss_gib": max(r["peak_rss_gib"] for r in results),
             "baseline_rss_gib": statistics.median(r["baseline_rss_gib"] for r in results),
             "precision": args.precision, "rounds": [round(r["step_s"], 3) for r in results]}
            for tool, results in rounds.items()]


# ----- driver -----


def run_json(cmd: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tool_python(tool: str, peer_python: str | None) -> str | None:
    return sys.executable if tool == "llama-lora" else peer_python


def compare_steps(args) -> list[dict]:
    tools = [t for t in TOOLS if tool_python(t, args.peer_python)]
    rounds: dict[str, list[dict]] = {t: [] for t in tools}
    for r in range(args.rounds):
        for tool in tools if r % 2 == 0 else reversed(tools):  # alternate the order too
            result = run_json([tool_python(tool, args.peer_python), __file__, "step-worker", tool,
                               "--steps", str(args.steps), "--warmup", str(args.warmup),
                               "--precision", args.precision])
            rounds[tool].append(result)
            print(f"round {r + 1}/{args.rounds} {tool:10s} {result['tokens_per_s']:8.0f} tokens/s  "
                  f"peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)
    rows = []
    for tool, results in rounds.items():
        step_s = statistics.median(r["step_s"] for r in results)
        rows.append({"bench": "step", "tool": tool, "tokens_per_s": 4 * 256 / step_s, "step_s": step_s,
                     "peak_rss_gib": max(r["peak_rss_gib"] for r in results),
                     "baseline_rss_gib": statistics.median(r["baseline_rss_gib"] for r in results),
                     "trainable_params": results[0]["trainable_params"], "first_loss": results[0]["first_loss"],
                     "precision": args.precision, "rounds": [round(r["tokens_per_s"], 1) for r in results]})
    return rows


# ----- epoch -----


def epoch_ours(args, data: Path, workdir: Path) -> dict:
    bf16 = args.precision == "bf16"
    config = {
        "seed_everything": 42,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed" if bf16 else "32-true",
                    "max_epochs": 1, "max_steps": -1,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "llama_lora.callbacks.PeakMemoryMonitor"},
                                  {"class_path": "llama_lora.callbacks.TokenThroughput"}]},
        "model": {"model": "small", "checkpoint_dir": None, "base_dtype": "bf16" if bf16 else "fp32",
                  "compile": args.compile,
                  "lora": {"targets": ["wq", "wv"], "r": 8, "alpha": 16, "dropout": 0.05},
                  "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-4}},
                  "scheduler": {"class_path": "llama_lora.module.WarmupCosineLR", "init_args": {"warmup_steps": 10}}},
        "data": {"data_path": str(data), "tokenizer_path": str(Path(args.tokenizer).resolve()), "val_size": 0,
                 "max_seq_len": 512, "micro_batch_size": 4, "mask_prompt": True,
                 "group_by_length": args.group_by_length, "packing": args.packing,
                 "num_workers": args.num_workers},
    }
    path = workdir / "ours.json"
    path.write_text(json.dumps(config))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fit.py"), "--config", str(path)],
                          capture_output=True, text=True, timeout=7200, cwd=workdir)  # its config.yaml lands there
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    peak = next((float(line.split()[2]) / 1024 for line in proc.stdout.splitlines() if line.startswith("Peak RSS")),
                None)
    train_s = re.findall(r"Computation time: ([\d.]+) s", proc.stdout)
    rows = re.findall(r"Packing: \d+ examples into (\d+) rows", proc.stdout + proc.stderr)
    setting = "bf16 base, fp32 LoRA, bf16-mixed" if bf16 else "fp32 base and LoRA, 32-true"
    arrangement = "packing" if args.packing else f"group_by_length={args.group_by_length}"
    return {"bench": "epoch", "tool": "llama-lora" + ("-packed" if args.packing else ""), "wall_s": wall,
            "peak_rss_gib": peak, "train_s": float(train_s[-1]) if train_s else None,
            "packed_rows": int(rows[-1]) if rows else None,
            "setting": f"{setting}, {arrangement}, compile={args.compile}, num_workers={args.num_workers}"}


LITGPT_CONFIG = """name: small
block_size: 2048
vocab_size: 32000
padded_vocab_size: 32000
n_layer: 8
n_head: 8
n_embd: 512
n_query_groups: 8
rotary_percentage: 1.0
parallel_residual: false
bias: false
norm_class_name: RMSNorm
norm_eps: 1.0e-05
mlp_class_name: LLaMAMLP
intermediate_size: 1376
"""


def epoch_litgpt(args, data: Path, workdir: Path) -> dict:
    ckpt = workdir / "litgpt-small"
    ckpt.mkdir()
    (ckpt / "model_config.yaml").write_text(LITGPT_CONFIG)
    (ckpt / "tokenizer.model").write_bytes(Path(args.tokenizer).read_bytes())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>",
                                                            "eos_token": "</s>", "tokenizer_class": "LlamaTokenizer"}))
    (ckpt / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    init = ("import torch, sys; from litgpt import GPT, Config; torch.manual_seed(0); "
            "c = Config.from_file(sys.argv[1] + '/model_config.yaml'); "
            "torch.save(GPT(c).state_dict(), sys.argv[1] + '/lit_model.pth')")
    subprocess.run([args.peer_python, "-c", init, str(ckpt)], check=True, timeout=600)
    litgpt = str(Path(args.peer_python).parent / "litgpt")
    precision = "bf16-true" if args.precision == "bf16" else "32-true"
    cmd = [litgpt, "finetune_lora", str(ckpt), "--out_dir", str(workdir / "litgpt-out"), "--precision", precision,
           "--devices", "1", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
           "--data", "JSON", "--data.json_path", str(data.with_name("litgpt.json")),
           "--data.val_split_fraction", str(1 / 1001), "--data.mask_prompt", "true", "--data.prompt_style", "alpaca",
           "--train.epochs", "1", "--train.micro_batch_size", "4", "--train.global_batch_size", "4",
           "--train.max_seq_length", "512", "--train.lr_warmup_steps", "10", "--train.save_interval", "100000",
           "--train.log_interval", "50", "--eval.interval", "100000", "--eval.initial_validation", "false",
           "--eval.final_validation", "false", "--logger_name", "csv"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, cwd=workdir)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-3000:])
    out = proc.stdout + proc.stderr
    iters = [int(m) for m in re.findall(r"iter (\d+) step", out)]
    train_s = re.findall(r"Training Time\s*:\s*([\d.]+) s", out)
    return {"bench": "epoch", "tool": "litgpt", "wall_s": wall, "peak_rss_gib": None,
            "train_s": float(train_s[-1]) if train_s else None, "micro_batches": max(iters, default=None),
            "setting": f"{precision} (base and LoRA in one dtype), its own padding and full-vocab chunked loss"}


# torchtune's lora_finetune_single_device recipe, as its configs llama2/7B_lora_single_device, on the small shape
TORCHTUNE_CONFIG = """
output_dir: {out}
model:
  _component_: torchtune.models.llama2.lora_llama2
  lora_attn_modules: [q_proj, v_proj]
  apply_lora_to_mlp: false
  apply_lora_to_output: false
  vocab_size: 32000
  num_layers: 8
  num_heads: 8
  num_kv_heads: 8
  embed_dim: 512
  max_seq_len: 512
  intermediate_dim: 1376
  norm_eps: 1.0e-05
  lora_rank: 8
  lora_alpha: 16
  lora_dropout: 0.05
tokenizer:
  _component_: torchtune.models.llama2.llama2_tokenizer
  path: {tokenizer}
  max_seq_len: 512
checkpointer:
  _component_: torchtune.training.FullModelTorchTuneCheckpointer
  checkpoint_dir: {ckpt}
  checkpoint_files: [model.pt]
  adapter_checkpoint: null
  recipe_checkpoint: null
  output_dir: {out}
  model_type: LLAMA2
resume_from_checkpoint: false
save_adapter_weights_only: true
dataset:
  _component_: torchtune.datasets.alpaca_dataset
  source: json
  data_files: {data}
  split: train
  train_on_input: false
  packed: false
seed: 42
shuffle: true
batch_size: 4
optimizer:
  _component_: torch.optim.AdamW
  fused: false
  weight_decay: 0.01
  lr: 3.0e-04
lr_scheduler:
  _component_: torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup
  num_warmup_steps: 10
loss:
  _component_: torchtune.modules.loss.CEWithChunkedOutputLoss
epochs: 1
max_steps_per_epoch: null
gradient_accumulation_steps: 1
clip_grad_norm: null
compile: false
metric_logger:
  _component_: torchtune.training.metric_logging.DiskLogger
  log_dir: {out}/logs
log_every_n_steps: 50
log_peak_memory_stats: false
device: cpu
dtype: {dtype}
enable_activation_checkpointing: false
enable_activation_offloading: false
profiler:
  _component_: torchtune.training.setup_torch_profiler
  enabled: false
"""


def epoch_torchtune(args, data: Path, workdir: Path) -> dict:
    ckpt = workdir / "torchtune-small"
    ckpt.mkdir()
    init = ("import torch, sys; from torchtune.models.llama2 import llama2; torch.manual_seed(0); "
            "m = llama2(vocab_size=32000, num_layers=8, num_heads=8, num_kv_heads=8, embed_dim=512, max_seq_len=512, "
            "intermediate_dim=1376, norm_eps=1e-5); torch.save(m.state_dict(), sys.argv[1] + '/model.pt')")
    subprocess.run([args.peer_python, "-c", init, str(ckpt)], check=True, timeout=600)
    dtype = "bf16" if args.precision == "bf16" else "fp32"
    config = workdir / "torchtune.yaml"
    config.write_text(TORCHTUNE_CONFIG.format(out=workdir / "torchtune-out", tokenizer=Path(args.tokenizer).resolve(),
                                              ckpt=ckpt, data=data, dtype=dtype))
    tune = str(Path(args.peer_python).parent / "tune")
    t = time.perf_counter()
    proc = subprocess.run([tune, "run", "lora_finetune_single_device", "--config", str(config)], capture_output=True,
                          text=True, timeout=7200, cwd=workdir)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-3000:])
    return {"bench": "epoch", "tool": "torchtune", "wall_s": wall, "peak_rss_gib": None, "train_s": None,
            "setting": f"dtype {dtype} (base and LoRA), its alpaca_dataset, chunked-output loss"}


def dataset_counts(args, data: Path) -> dict:
    """Non-pad and target tokens of the epoch, from the project's own preprocessing (the same Alpaca template)."""
    from llama_lora.data import load_records, preprocess
    from llama_lora.tokenizer import Tokenizer

    examples, stats = preprocess(load_records(data), Tokenizer(args.tokenizer), 512, True)
    tokens = sum(len(e["input_ids"]) for e in examples)
    targets = sum(sum(1 for t in e["labels"][1:] if t != -100) for e in examples)
    return {"examples": len(examples), "tokens": tokens, "targets": targets}


def compare_epoch(args) -> list[dict]:
    records = json.loads(Path(args.data).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = workdir / "alpaca_1000.json"
        data.write_text(json.dumps(records[: args.records]))
        (workdir / "litgpt.json").write_text(json.dumps(records[: args.records + 1]))  # + 1 record of validation
        counts = dataset_counts(args, data)
        rows = []
        runs = [epoch_ours] + ([epoch_litgpt, epoch_torchtune] if args.peer_python else [])
        runs = [run for run in runs if run.__name__.removeprefix("epoch_") in args.tools]
        for r in range(args.rounds):
            for run in runs if r % 2 == 0 else reversed(runs):
                sub = workdir / f"{run.__name__}-{r}"
                sub.mkdir()
                row = run(args, data, sub)
                row.update(counts, round=r + 1, tokens_per_s=counts["tokens"] / row["wall_s"],
                           targets_per_s=counts["targets"] / row["wall_s"])
                print(f"round {r + 1}/{args.rounds} {row['tool']:10s} {row['wall_s']:7.1f} s "
                      f"(training loop {row['train_s']} s)  "
                      f"{row['tokens_per_s']:6.0f} tokens/s  {row['targets_per_s']:6.0f} target tokens/s", flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict], bench: str) -> str:
    if bench == "dpo":
        trl = next((r["step_s"] for r in rows if r["tool"] == "trl"), None)
        lines = ["| tool | DPO step | vs TRL | peak RSS | RSS before the model |", "|---|---|---|---|---|"]
        for r in rows:
            ratio = f"{trl / r['step_s']:.2f}x" if trl else "-"
            lines.append(f"| {r['tool']} | {r['step_s']:.3f} s | {ratio} | {r['peak_rss_gib']:.2f} GiB | "
                         f"{r['baseline_rss_gib']:.2f} GiB |")
        return "\n".join(lines)
    if bench == "step":
        best_peer = max((r["tokens_per_s"] for r in rows if r["tool"] != "llama-lora"), default=None)
        lines = ["| tool | tokens/s | vs better peer | peak RSS | RSS before the model |", "|---|---|---|---|---|"]
        for r in rows:
            ratio = f"{r['tokens_per_s'] / best_peer:.2f}x" if best_peer else "-"
            lines.append(f"| {r['tool']} | {r['tokens_per_s']:,.0f} | {ratio} | {r['peak_rss_gib']:.2f} GiB | "
                         f"{r['baseline_rss_gib']:.2f} GiB |")
        return "\n".join(lines)
    by_tool: dict[str, list[dict]] = {}
    for r in rows:
        by_tool.setdefault(r["tool"], []).append(r)
    med = {t: statistics.median(r["wall_s"] for r in rs) for t, rs in by_tool.items()}
    lit = med.get("litgpt")
    tune = med.get("torchtune")
    lines = ["| tool | epoch wall time | tokens/s (non-pad) | target tokens/s | vs LitGPT | vs torchtune |",
             "|---|---|---|---|---|---|"]
    for tool, rs in by_tool.items():
        r = rs[0]
        lines.append(f"| {tool} | {med[tool]:.1f} s | {r['tokens'] / med[tool]:,.0f} | {r['targets'] / med[tool]:,.0f} "
                     f"| {f'{lit / med[tool]:.2f}x' if lit else '-'} | {f'{tune / med[tool]:.2f}x' if tune else '-'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step")
    step.add_argument("--peer-python", help="interpreter of a venv with litgpt and torchtune installed")
    step.add_argument("--rounds", type=int, default=5)
    step.add_argument("--steps", type=int, default=10)
    step.add_argument("--warmup", type=int, default=3)
    step.add_argument("--out", default=None, help="append the result rows (JSON lines) to this file")
    for sp in (step, epoch := sub.add_parser("epoch")):
        sp.add_argument("--precision", choices=["auto", "bf16-mixed", "32-true"], default="auto",
                        help="auto: bf16 with native bf16, else fp32 (for every tool)")
    epoch.add_argument("--peer-python")
    epoch.add_argument("--tokenizer", required=True)
    epoch.add_argument("--data", required=True, help="Alpaca JSON; the first --records are used")
    epoch.add_argument("--records", type=int, default=1000)
    epoch.add_argument("--rounds", type=int, default=1)
    epoch.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True)
    epoch.add_argument("--packing", action="store_true", help="llama-lora with data.packing: true")
    epoch.add_argument("--num-workers", type=int, default=0, help="llama-lora's DataLoader workers")
    epoch.add_argument("--tools", default="ours,litgpt,torchtune", help="which of ours,litgpt,torchtune to run")
    epoch.add_argument("--compile", action="store_true", help="llama-lora with model.compile: true")
    epoch.add_argument("--out", default=None)
    dpo = sub.add_parser("dpo")
    dpo.add_argument("--peer-python", help="interpreter of a venv with trl, peft and transformers installed")
    dpo.add_argument("--rounds", type=int, default=4)
    dpo.add_argument("--steps", type=int, default=5)
    dpo.add_argument("--warmup", type=int, default=2)
    dpo.add_argument("--precision", choices=["auto", "bf16-mixed", "32-true"], default="auto")
    dpo.add_argument("--out", default=None)
    dpo_worker_parser = sub.add_parser("dpo-worker")
    dpo_worker_parser.add_argument("tool", choices=["llama-lora", "trl"])
    dpo_worker_parser.add_argument("--steps", type=int, default=5)
    dpo_worker_parser.add_argument("--warmup", type=int, default=2)
    dpo_worker_parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    worker = sub.add_parser("step-worker")
    worker.add_argument("tool", choices=TOOLS)
    worker.add_argument("--steps", type=int, default=10)
    worker.add_argument("--warmup", type=int, default=3)
    worker.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    args = p.parse_args()
    if args.command == "step-worker":
        print(json.dumps(step_worker(args.tool, args.steps, args.warmup, args.precision)))
        return
    if args.command == "dpo-worker":
        print(json.dumps(dpo_worker(args.tool, args.steps, args.warmup, args.precision)))
        return
    args.precision = resolve_precision(args.precision)
    if args.command == "epoch":
        args.tools = set(args.tools.split(","))
    rows = {"step": compare_steps, "epoch": compare_epoch, "dpo": compare_dpo}[args.command](args)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "cpu_kind": cpu_kind(), "precision": args.precision, "python": platform.python_version(),
            "isa_limit": os.environ.get("ONEDNN_MAX_CPU_ISA")}
    for row in rows:
        row.update(meta)
    print()
    print(f"{cpu_kind()} CPU, precision {args.precision}")
    print(table(rows, args.command))
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
