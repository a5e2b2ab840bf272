"""The analytic memory model (llama_lora.memory), checked by hand and read the way the study's tables read it."""

import sys

import torch
from conftest import ROOT

from llama_lora.config import LlamaConfig

sys.path.insert(0, str(ROOT / "benchmarks" / "ablation"))
from study import Cell, StudySettings, memory_breakdown, table1  # noqa: E402

# MP's half precision is bf16 on a CPU here, whatever CPU runs the test (auto would be fp32 on an AVX2-only one).
SETTINGS = StudySettings(model="tiny", global_batch=4, accumulate=4, seq_len=128, lora_targets=("wq", "wk", "wv"),
                         lora_r=16, device="cpu", half="bf16")


def test_analytic_breakdown_by_hand_for_tiny():
    """tiny: dim 64, 2 layers, 4 heads / 2 kv heads (kv_dim 32), hidden 176, vocab 512."""
    c = LlamaConfig.from_name("tiny")
    n = 2 * (64 * (2 * 64 + 2 * 32) + 3 * 64 * 176 + 2 * 64) + 2 * 512 * 64 + 64
    assert n == c.n_params == 158_016
    n_lora = 2 * 16 * ((64 + 64) + (64 + 32) + (64 + 32))  # r * (in + out) for wq, wk, wv, per layer
    tokens = 4 * 128  # GA off: the whole global batch in one micro-batch
    # MP + LoRA on CPU: bf16 base (2 B), fp32 LoRA; activations in bf16 (2 B), RMSNorm inputs in fp32.
    per_layer = 2 * 4 * 64 + 2 * (64 + 64 + 2 * 32 + 64 + 64) + 2 * (64 + 4 * 176) + 6 * (64 + 64 + 64)
    assert per_layer == 3840
    b = memory_breakdown(c, Cell(ga=False, mp=True, lora=True, gc=False), SETTINGS)
    assert b["params"] == n * 2 + n_lora * 4 == 356_992
    assert b["grads"] == n_lora * 4 and b["optimizer"] == n_lora * 8 and b["autocast_cache"] == 0
    assert b["activations"] == tokens * 2 * per_layer == 3_932_160
    assert b["loss"] == 512 * 512 * 8 + tokens * 64 * 2
    assert b["total"] == sum(v for k, v in b.items() if k != "total") == 6_574_720
    # Full fine-tuning under MP keeps fp32 weights, and autocast adds a half copy of every matmul weight.
    full = memory_breakdown(c, Cell(ga=False, mp=True, lora=False, gc=False), SETTINGS)
    assert full["params"] == n * 4 and full["grads"] == n * 4 and full["optimizer"] == n * 8
    assert full["autocast_cache"] == (n - 512 * 64 - 64 * 5) * 2
    # Checkpointing keeps each block's input plus one block's activations; GA shrinks the micro-batch 4x.
    gc = memory_breakdown(c, Cell(ga=True, mp=True, lora=True, gc=True), SETTINGS)
    assert gc["activations"] == 128 * (2 * 2 * 64 + per_layer)


def test_corrected_table1_claims():
    """The seed's TABLE1 errors, read off the analytic model: GC lowers activations; GA does not shrink parameter,
    gradient or optimizer memory; MP over fp32 weights adds autocast's copies."""
    rows = {line.split("|")[1].strip(): [x.strip() for x in line.split("|")[2:-1]]
            for line in table1(LlamaConfig.from_name("llama2-7b"), StudySettings(model="llama2-7b", half="bf16")
                               ).splitlines()
            if line.startswith("| GA |") or line.startswith("| MP |") or line.startswith("| LORA |")
            or line.startswith("| GC |")}
    params, grads, optimizer, activations, compute = range(5)
    assert rows["GC"][activations] == "↓" and rows["GC"][compute].startswith("↑")
    assert rows["GC"][params] == rows["GC"][grads] == rows["GC"][optimizer] == "="
    assert rows["GA"][params] == rows["GA"][grads] == rows["GA"][optimizer] == "=" and rows["GA"][activations] == "↓"
    assert rows["LORA"][grads] == rows["LORA"][optimizer] == "↓"
    assert "↑" in rows["MP"][activations]  # autocast's weight copies when the weights are fp32 (full fine-tuning)
    c = LlamaConfig.from_name("llama2-7b")
    s = StudySettings(model="llama2-7b", seq_len=512, global_batch=4, half="bf16")
    seed_mp_on = memory_breakdown(c, Cell(ga=False, mp=True, lora=False, gc=False), s)
    assert seed_mp_on["autocast_cache"] > 12 * 2**30  # ~12.5 GiB of fp16 copies of the 7B matmul weights


def test_sharded_breakdown_splits_the_states_and_adds_what_is_gathered():
    """Each rank holds 1/W of the states, the root's embedding gathered for the whole step, and two gathered blocks
    or the output layer, whichever is larger; an NF4 base is gathered in 4-bit codes and int8 scales."""
    from llama_lora.memory import NF4_BITS, memory_breakdown, sharded_breakdown

    c = LlamaConfig.from_name("llama2-70b")
    from llama_lora.plan import make_plan

    settings = dict(plan=make_plan("cuda", "16-mixed", "fp16"), lora_targets=("wq", "wk", "wv"), lora_r=16,
                    micro_batch=1, seq_len=512, gradient_checkpointing=True)
    one, eight = memory_breakdown(c, **settings), sharded_breakdown(c, 8, **settings)
    assert eight["params"] == one["params"] // 8 and eight["optimizer"] == one["optimizer"] // 8
    assert eight["activations"] == one["activations"] and sharded_breakdown(c, 1, **settings)["gathered"] == 0
    block = 2 * (8192 * 8192 + 2 * 8192 * 1024 + 8192 * 8192 + 3 * 8192 * 28672) + 2 * 8192 * 2  # fp16 q k v o ffn
    assert eight["gathered"] == 32000 * 8192 * 2 + 2 * block  # the fp16 embedding, two blocks
    assert eight["total"] == sum(v for k, v in eight.items() if k != "total")
    c = LlamaConfig.from_name("llama3.1-70b")
    qlora = {**settings, "plan": make_plan("cuda", "bf16-mixed", "nf4")}
    two = sharded_breakdown(c, 2, **qlora)
    linears = 8192 * 8192 + 2 * 8192 * 1024 + 8192 * 8192 + 3 * 8192 * 28672
    assert 2 * (int(linears * NF4_BITS / 8) + 2 * 8192 * 2) < 128256 * 8192 * 2  # the output layer is larger
    assert two["gathered"] == 2 * 128256 * 8192 * 2  # the bf16 embedding, and the bf16 output layer at the loss
    assert two["params"] == memory_breakdown(c, **qlora)["params"] // 2


def test_a_tied_output_layer_is_still_a_matmul():
    """Llama 3.2's output layer is its embedding: one parameter fewer to store, but as many weights multiplied (the
    autocast cache and the FLOPs count it)."""
    from llama_lora.memory import matmul_params

    tied = LlamaConfig.from_name("llama3.2-1b")
    untied = LlamaConfig.from_name("llama3.2-1b", tie_embeddings=False)
    assert matmul_params(tied) == matmul_params(untied)
    assert untied.n_params - tied.n_params == tied.vocab_size * tied.dim


def test_dora_adds_one_magnitude_per_output_row_and_what_its_correction_keeps():
    """The analytic model's DoRA: its trainable count is a DoRA model's (A, B and the magnitudes), and it keeps more
    activations than LoRA at the same rank (the TABLE1 line's ↑)."""
    from llama_lora.lora import LoRASettings, apply_lora, count_params, mark_only_lora_as_trainable
    from llama_lora.memory import lora_param_count
    from llama_lora.weights import build_model

    c = LlamaConfig.from_name("tiny")
    model = build_model(c, plan=torch.float32, seed=0)
    apply_lora(model, LoRASettings(["wq", "wk", "w2", "output"], r=4, alpha=8, dropout=0.0, use_dora=True))
    mark_only_lora_as_trainable(model)
    assert count_params(model)[0] == lora_param_count(c, ["wq", "wk", "w2", "output"], 4, dora=True)
    assert lora_param_count(c, ["wq"], 4, dora=True) - lora_param_count(c, ["wq"], 4) == c.n_layers * c.dim
    lora, dora = (memory_breakdown(c, Cell(ga=False, mp=True, lora=True, gc=False, dora=d), SETTINGS) for d in (0, 1))
    assert dora["activations"] > lora["activations"] and dora["total"] > lora["total"]


def test_a_preference_step_counts_as_sft_on_both_completions():
    """P pairs: the policy's forward and backward over 2P sequences, plus 4 bytes a token of per-position
    log-probabilities; the reference pass (no autograd, before the policy's) adds nothing to the peak."""
    from llama_lora.memory import memory_breakdown
    from llama_lora.plan import make_plan

    c = LlamaConfig.from_name("llama2-7b")
    settings = dict(plan=make_plan("cuda", "bf16-mixed", "nf4"), lora_targets=("wq", "wv"), lora_r=16, seq_len=512,
                    gradient_checkpointing=True)
    dpo, sft = memory_breakdown(c, micro_batch=2, pairs=True, **settings), memory_breakdown(c, micro_batch=4,
                                                                                            **settings)
    assert dpo["total"] - sft["total"] == dpo["loss"] - sft["loss"] == 4 * 512 * 4
