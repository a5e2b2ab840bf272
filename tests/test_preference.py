"""Preference tuning: the objectives against their papers' formulas, the pairs' records and masking against an
independent construction, the log-probabilities against full logits, the reference model in place, and runs of
fit.py: the ln 2 start, DDP = one process, exact resume, one-line refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, fit, lora_weights, scalars, write_tiny_config

from llama_lora.data import PreferenceCollator, preference_record, preprocess_pairs
from llama_lora.demo import demo_tokenizer_file
from llama_lora.lora import LoRASettings, apply_lora, lora_layers, reference_model, set_reference_adapter
from llama_lora.loss import IGNORE_INDEX, sequence_logps
from llama_lora.preference import PreferenceSettings, pair_metrics, preference_scores
from llama_lora.prompts import FORMATS, format_prompt
from llama_lora.weights import build_model

LN2 = math.log(2)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ----- the objectives -----

@pytest.mark.parametrize("loss, beta, smoothing", [("dpo", 0.1, 0.0), ("dpo", 0.5, 0.2), ("ipo", 0.1, 0.0),
                                                   ("ipo", 0.7, 0.0), ("simpo", 2.0, 0.0)])
def test_each_objective_equals_its_papers_formula(loss, beta, smoothing):
    """Per pair, in plain Python: DPO's eq. 7 (Rafailov et al. 2023) and conservative DPO's label smoothing, IPO's
    eq. 17 (Azar et al. 2023) on the length-averaged log-probabilities, SimPO's eq. 6 (Meng et al. 2024); the
    rewards as TRL logs them."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(12, generator=g, dtype=torch.float64) * 4 - 30 for _ in range(4))
    nc, nr = torch.randint(1, 40, (12,), generator=g), torch.randint(1, 40, (12,), generator=g)
    settings = PreferenceSettings(loss=loss, beta=beta, label_smoothing=smoothing, simpo_gamma=0.8)
    got = preference_scores(settings, pc, pr, nc, nr, rc, rr)
    for i in range(12):
        a, b, c, d, m, n = (float(t[i]) for t in (pc, pr, rc, rr, nc, nr))
        if loss == "dpo":
            h = beta * (a - c) - beta * (b - d)
            want = -(1 - smoothing) * math.log(_sigmoid(h)) - smoothing * math.log(_sigmoid(-h))
            rewards = (beta * (a - c), beta * (b - d))
        elif loss == "ipo":
            h = (a / m - c / m) - (b / n - d / n)
            want = (h - 1 / (2 * beta)) ** 2
            rewards = (beta * (a / m - c / m), beta * (b / n - d / n))
        else:
            want = -math.log(_sigmoid(beta / m * a - beta / n * b - 0.8))
            rewards = (beta * a / m, beta * b / n)
        assert float(got.losses[i]) == pytest.approx(want, rel=1e-12)
        assert (float(got.chosen_rewards[i]), float(got.rejected_rewards[i])) == pytest.approx(rewards, rel=1e-12)
    metrics = pair_metrics(got)
    assert torch.equal(metrics["rewards/accuracies"], (got.chosen_rewards > got.rejected_rewards).double())
    assert torch.equal(metrics["logps/chosen"], pc) and torch.equal(metrics["logps/rejected"], pr)


def test_the_policy_equal_to_the_reference_gives_ln2_and_ipos_square():
    logps = torch.tensor([-12.5, -3.25])
    dpo = preference_scores(PreferenceSettings(), logps[:1], logps[1:], torch.tensor([3]), torch.tensor([5]),
                            logps[:1], logps[1:])
    assert dpo.losses.item() == torch.tensor(LN2, dtype=torch.float32).item()
    ipo = preference_scores(PreferenceSettings(loss="ipo", beta=0.25), logps[:1], logps[1:], torch.tensor([3]),
                            torch.tensor([5]), logps[:1], logps[1:])
    assert ipo.losses.item() == 4.0  # (0 - 1 / (2 * 0.25))^2


@pytest.mark.parametrize("settings, message", [
    (dict(loss="kto"), "loss must be one of dpo, ipo, simpo"), (dict(beta=0), "beta must be > 0"),
    (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(loss="simpo", label_smoothing=0.1), "loss simpo has none")])
def test_settings_are_checked_in_one_line(settings, message):
    with pytest.raises(ValueError, match=message):
        PreferenceSettings(**settings)


# ----- records -----

CONVERSATION = [{"role": "user", "content": "What is 2 plus 2?"}]


@pytest.mark.parametrize("record, prompt, chosen, rejected", [
    ({"instruction": "Add.", "input": "2 and 2", "chosen": "4", "rejected": "5"},
     {"instruction": "Add.", "input": "2 and 2"}, "4", "5"),
    ({"instruction": "Add.", "input": None, "chosen": "4", "rejected": "5"}, {"instruction": "Add.", "input": ""},
     "4", "5"),
    ({"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5"},  # TRL's standard form
     {"instruction": "What is 2 plus 2?", "input": ""}, "4", "5"),
    ({"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": "4"}],  # TRL's conversational form
      "rejected": [{"role": "assistant", "content": "5"}]}, {"messages": CONVERSATION}, "4", "5"),
    ({"chosen": CONVERSATION + [{"role": "assistant", "content": "4"}],  # whole conversations
      "rejected": CONVERSATION + [{"role": "assistant", "content": "5"}]}, {"messages": CONVERSATION}, "4", "5"),
    ({"prompt": "What is 2 plus 2?", "prompt_id": "x", "score_chosen": 8.0,  # UltraFeedback-binarized as it is
      "chosen": CONVERSATION + [{"role": "assistant", "content": "4"}],
      "rejected": CONVERSATION + [{"role": "assistant", "content": "5"}]}, {"messages": CONVERSATION}, "4", "5"),
    ({"chosen": "\n\nHuman: 2 plus 2?\n\nAssistant: It is 4.",  # Anthropic HH: the shared text, TRL's cut
      "rejected": "\n\nHuman: 2 plus 2?\n\nAssistant: It is 5."}, {"text": "\n\nHuman: 2 plus 2?\n\nAssistant: It is"},
     " 4.", " 5."),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"},
     {"text": "\n\nHuman: Hi\n\nAssistant:"}, " Hello", " Go"),
])
def test_every_record_form_gives_its_prompt_and_completions(record, prompt, chosen, rejected):
    assert preference_record(record, 0) == {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@pytest.mark.parametrize("record, message", [
    ({"instruction": "Add.", "chosen": "4"}, "record 0 has no 'rejected' field"),
    ({"prompt": 3, "chosen": "4", "rejected": "5"}, "field 'prompt' is a int"),
    ({"chosen": "4", "rejected": CONVERSATION}, "not both strings or both whole conversations"),
    ({"prompt": CONVERSATION, "chosen": [{"role": "user", "content": "4"}], "rejected": "5"},
     "the completion must be the assistant's one turn"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "4", "rejected": "5"}, "roles"),
    ("text", "is a str, expected an object"),
])
def test_a_malformed_record_is_refused_in_one_line(record, message):
    with pytest.raises(ValueError, match=message) as err:
        preference_record(record, 0, "pairs.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("pairs.json: record 0")


# ----- masking, against an independent construction -----

def _labels_of(ids: list[int], first: int, last: int) -> list[int]:
    return [t if first <= i < last else IGNORE_INDEX for i, t in enumerate(ids)]


def test_alpaca_pair_masks_all_but_the_completion_and_its_eos(demo_tok):
    """BOS + the Alpaca prompt, tokenized on its own, then the completion + EOS: the labels are exactly the
    completion's ids and EOS, for chosen and rejected, and non-ASCII text survives."""
    rec = {"instruction": "Translate: café", "input": "naïve", "chosen": "Kaffee ☕", "rejected": "Tee"}
    (pair,), stats = preprocess_pairs([preference_record(rec, 0)], demo_tok, max_seq_len=512)
    prompt = [demo_tok.bos_id] + demo_tok.encode(format_prompt(rec))
    for side in ("chosen", "rejected"):
        completion = demo_tok.encode(rec[side]) + [demo_tok.eos_id]
        ids = prompt + completion
        assert pair[side] == (ids, _labels_of(ids, len(prompt), len(ids)))
    assert stats.kept == 1 and stats.dropped == stats.truncated == 0


def test_chat_pair_trains_on_the_last_assistant_turn_alone(demo_tok):
    """A multi-turn prompt in the llama2 template: the completion's ids are what follows the prompt rendered with
    its generation prompt; the earlier assistant turn is prompt (masked), whatever form the record came in."""
    llama2 = FORMATS["llama2"]
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "What is 2 plus 2?"}]
    forms = [{"prompt": history, "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"},
             {"chosen": history + [{"role": "assistant", "content": "4"}],
              "rejected": history + [{"role": "assistant", "content": "5"}]}]
    head = llama2.tokens(history, demo_tok, add_generation_prompt=True)[0]
    for rec in forms:
        (pair,), _ = preprocess_pairs([preference_record(rec, 0)], demo_tok, 512, prompt_format=llama2)
        for side, answer in (("chosen", "4"), ("rejected", "5")):
            whole = llama2.tokens(history + [{"role": "assistant", "content": answer}], demo_tok)[0]
            assert whole[: len(head)] == head
            ids, labels = pair[side]
            assert ids == whole and labels == _labels_of(whole, len(head), len(whole))
            assert labels[-1] == demo_tok.eos_id
    with pytest.raises(ValueError, match="needs a chat template.*set data.chat_template"):
        preprocess_pairs([preference_record(forms[0], 0)], demo_tok, 512)


def test_hh_text_prompt_is_used_as_written(demo_tok):
    rec = preference_record({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: "
                             "Go away"}, 0)
    (pair,), _ = preprocess_pairs([rec], demo_tok, 512)
    head = [demo_tok.bos_id] + demo_tok.encode("\n\nHuman: Hi\n\nAssistant:")
    ids = head + demo_tok.encode(" Hello") + [demo_tok.eos_id]
    assert pair["chosen"] == (ids, _labels_of(ids, len(head), len(ids)))


def test_unusable_pairs_are_dropped_and_counted(demo_tok, caplog):
    good = {"instruction": "Add.", "input": "1 and 2", "chosen": "3", "rejected": "4"}
    records = [good, {**good, "rejected": "3"}, {**good, "chosen": " "}, {**good, "instruction": "word " * 300},
               {**good, "chosen": "long " * 300}]
    prompt_len = 1 + len(demo_tok.encode(format_prompt(good)))
    examples, stats = preprocess_pairs([preference_record(r, i) for i, r in enumerate(records)], demo_tok,
                                       max_seq_len=prompt_len + 20)
    assert [e["index"] for e in examples] == [0, 4]
    assert (stats.kept, stats.identical, stats.empty, stats.dropped, stats.truncated) == (2, 1, 1, 1, 1)
    cut_ids, cut_labels = examples[1]["chosen"]
    assert len(cut_ids) == prompt_len + 20 and cut_labels[-1] != demo_tok.eos_id  # cut: no end of turn
    assert "1 preference pairs whose chosen equals rejected and 1 with an empty completion" in caplog.text
    assert "prompt alone is longer than max_seq_len" in caplog.text  # SFT's warning: 1 of 5 dropped


def test_collator_puts_chosen_first_and_weighs_a_padding_pair_zero():
    pairs = [{"chosen": ([1, 5, 6], [-100, 5, 6]), "rejected": ([1, 7], [-100, 7])},
             {"chosen": ([1, 8], [-100, 8]), "rejected": ([1, 9, 9, 9], [-100, -100, 9, 9]), "padding": True,
              "n_targets_window": 3}]
    pairs[0]["n_targets_window"] = 3
    batch = PreferenceCollator(pad_id=0, pad_to_multiple_of=None)(pairs)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0], [1, 8, 0, 0], [1, 7, 0, 0], [1, 9, 9, 9]]
    assert batch["labels"][3].tolist() == [-100, -100, 9, 9]
    assert batch["pair_weight"].tolist() == [1.0, 0.0] and batch["n_targets_window"].item() == 3


# ----- log-probabilities and the reference model -----

def _lora_model(config, dora: bool = False):
    model = build_model(config, plan=torch.float32, seed=0)
    apply_lora(model, LoRASettings(targets=["wq", "wv", "w2"], r=4, alpha=8, dropout=0.0, use_dora=dora))
    return model


def _batch(config):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, config.vocab_size, (3, 20), generator=g)
    labels = ids.clone()
    labels[0, :7], labels[1, :3], labels[2, :12] = IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX
    labels[1, 15:] = IGNORE_INDEX  # padding
    return ids, labels


def test_sequence_logps_equal_full_logits_and_their_gradients(tiny_config):
    """Per row, the summed log-probabilities of the target tokens from the whole (B, T, V) logits, and the LoRA
    gradients of a weighted sum of them, equal the chunked, output-only-where-needed computation."""
    torch.manual_seed(0)
    model = _lora_model(tiny_config)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_b.normal_(0, 0.05)
    ids, labels = _batch(tiny_config)
    weights = torch.tensor([1.0, -2.0, 0.5])
    logps, counts = sequence_logps(model, ids, labels, chunk_size=4)
    (logps * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    full = torch.log_softmax(model(ids).float(), dim=-1)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    want = (full.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask).sum(dim=1)
    (want * weights).sum().backward()
    torch.testing.assert_close(logps, want, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == mask.sum(dim=1).tolist() == [13, 12, 8]
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_reference_model_is_the_start_in_place(tiny_config, dora):
    """Inside ``reference_model`` the model computes as training started: with B = 0 bit for bit the policy; after
    the adapter moved, the base alone (adapters off), or the init adapter given as the reference."""
    model = _lora_model(tiny_config, dora)
    ids, labels = _batch(tiny_config)
    with torch.no_grad():
        start = sequence_logps(model, ids, labels)[0]
        with reference_model(model):
            assert torch.equal(sequence_logps(model, ids, labels)[0], start)
        for _, layer in lora_layers(model):
            layer.lora_b.normal_(0, 0.05)
        init = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        adapted = sequence_logps(model, ids, labels)[0]
        assert (adapted - start).abs().max() > 1e-2
        with reference_model(model):
            assert torch.equal(sequence_logps(model, ids, labels)[0], start)
        set_reference_adapter(model, init)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.1)  # training moves on; the reference stays at the init adapter
        assert (sequence_logps(model, ids, labels)[0] - adapted).abs().max() > 1e-2
        with reference_model(model):
            assert torch.equal(sequence_logps(model, ids, labels)[0], adapted)
        assert not any(layer.use_reference for _, layer in lora_layers(model))


# ----- runs of fit.py -----

PAIRS = {"data": {"format": "preference"}}


def preference_config(tmp_path, cache_dir, preference=None, **overrides):
    model = {"preference": preference or {"loss": "dpo", "beta": 0.1}, **overrides.pop("model", {})}  # null: SFT
    data = {**PAIRS["data"], **overrides.pop("data", {})}
    return write_tiny_config(tmp_path, cache_dir, model=model, data=data, **overrides)


@pytest.mark.parametrize("case", ["lora", pytest.param("nf4-dora-bf16", marks=pytest.mark.slow),
                                  pytest.param("ipo", marks=pytest.mark.slow)])
def test_first_step_starts_at_the_reference(tmp_path, cache_dir, case):
    """B = 0: the policy is the reference, so DPO's first loss is ln 2 exactly and every reward 0 (IPO's first loss
    is 1 / (4 beta^2)), on an NF4 base with DoRA under bf16-mixed too; and training moves away from it."""
    model = {"base_dtype": "nf4", "lora": {"targets": ["wq", "wv", "w2"], "r": 4, "alpha": 8, "dropout": 0.0,
                                           "use_dora": True}} if case == "nf4-dora-bf16" else {}
    trainer = {"precision": "bf16-mixed"} if case == "nf4-dora-bf16" else {}
    preference = {"loss": "ipo", "beta": 0.5} if case == "ipo" else None
    fit(preference_config(tmp_path, cache_dir, preference, model=model, trainer=trainer))
    loss = scalars(tmp_path / "logs", "train/loss_step")
    first = 1.0 if case == "ipo" else torch.tensor(LN2, dtype=torch.float32).item()
    assert loss[0] == first
    assert scalars(tmp_path / "logs", "train/rewards/margins_step")[0] == 0.0
    assert scalars(tmp_path / "logs", "train/rewards/chosen_step")[0] == 0.0
    assert any(v != first for v in loss.values())
    for tag in ("val/loss", "val/rewards/accuracies", "val/rewards/margins", "val/logps/chosen", "val/logps/rejected"):
        assert scalars(tmp_path / "logs", tag)


def test_dpo_from_an_sft_adapter_starts_at_ln2_and_keeps_it_as_the_reference(tmp_path, cache_dir):
    """SFT, then DPO with model.init_adapter: the reference is the SFT adapter (not the base), so the first loss is
    ln 2 exactly although the adapter is far from B = 0; a resume keeps that reference."""
    sft = tmp_path / "sft"
    sft.mkdir()
    fit(write_tiny_config(sft, cache_dir, trainer={"max_steps": 4}))
    dpo = tmp_path / "dpo"
    dpo.mkdir()
    config = preference_config(dpo, cache_dir, model={"init_adapter": str(sft / "ckpt" / "last.ckpt")})
    fit(config, "--trainer.max_steps", "4")
    fit(config, "--ckpt_path", "last")
    loss = scalars(dpo / "logs", "train/loss_step")
    assert loss[0] == torch.tensor(LN2, dtype=torch.float32).item() and len(loss) == 6
    whole = tmp_path / "whole"
    whole.mkdir()
    fit(preference_config(whole, cache_dir, model={"init_adapter": str(sft / "ckpt" / "last.ckpt")}))
    assert scalars(whole / "logs", "train/loss_step") == loss
    a, b = lora_weights(dpo / "ckpt" / "last.ckpt"), lora_weights(whole / "ckpt" / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # evaluate.py reads the run back: its pairs, its objective, its reference (the SFT adapter): training's last
    # validation figures
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--adapter",
                           str(whole / "ckpt" / "last.ckpt"), "--precision", "32-true", "--out",
                           str(tmp_path / "eval.json")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "eval.json").read_text())
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        trained = scalars(whole / "logs", f"val/{key}")
        assert record[f"val_{key}"] == pytest.approx(trained[max(trained)], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_precomputed_reference_gives_the_loss_of_the_reference_pass(tmp_path, cache_dir):
    """The reference's log-probabilities computed in one pass before training (precompute_reference) give the
    losses, rewards and weights of the reference pass run at every step, from an init adapter (dropout on: the
    reference is computed without it either way)."""
    sft = tmp_path / "sft"
    sft.mkdir()
    fit(write_tiny_config(sft, cache_dir, trainer={"max_steps": 2}))
    runs = {}
    for precompute in (False, True):
        d = tmp_path / str(precompute)
        d.mkdir()
        fit(preference_config(d, cache_dir, {"loss": "dpo", "beta": 0.1, "precompute_reference": precompute},
                              model={"init_adapter": str(sft / "ckpt" / "last.ckpt"),
                                     "lora": {"targets": ["wq", "wv", "w2"], "r": 4, "alpha": 8, "dropout": 0.1}}))
        runs[precompute] = d
    for tag in ("train/loss_step", "train/rewards/margins_step", "val/loss", "val/rewards/chosen"):
        on_the_fly, precomputed = scalars(runs[False] / "logs", tag), scalars(runs[True] / "logs", tag)
        assert on_the_fly.keys() == precomputed.keys()
        for step, value in on_the_fly.items():
            assert precomputed[step] == pytest.approx(value, rel=1e-5, abs=1e-6), (tag, step)
    a, b = (lora_weights(runs[p] / "ckpt" / "last.ckpt") for p in (False, True))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_dpo_in_two_processes_equals_one_process(tmp_path, cache_dir):
    """The mean over the pairs of the whole accumulation window on all ranks: DDP with 2 processes x 1 pair x
    accumulation 2 trains the weights of 1 process x 2 pairs x accumulation 2; the DDP run's reference is
    precomputed, each rank its half, gathered."""
    runs = {}
    for name, trainer, micro in [("ddp", {"devices": 2, "strategy": "ddp"}, 1), ("single", {}, 2)]:
        d = tmp_path / name
        d.mkdir()
        preference = {"loss": "dpo", "beta": 0.1, "precompute_reference": name == "ddp"}
        fit(preference_config(d, cache_dir, preference, trainer={
            "accumulate_grad_batches": 2, "val_check_interval": 1000, "limit_val_batches": 0, **trainer},
            data={"micro_batch_size": micro}))
        runs[name] = lora_weights(d / "ckpt" / "last.ckpt")
    assert any(v.abs().max() > 0 for k, v in runs["single"].items() if k.endswith("lora_b"))
    for k in runs["single"]:
        torch.testing.assert_close(runs["ddp"][k], runs["single"][k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_resume_is_exact_and_refuses_another_objective(tmp_path, cache_dir):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full.mkdir(), resumed.mkdir()
    settings = dict(preference={"loss": "simpo", "beta": 2.0}, trainer={"max_steps": 8},
                    model={"lora": {"targets": ["wq", "wv"], "r": 4, "alpha": 8, "dropout": 0.1}})
    fit(preference_config(full, cache_dir, **settings))
    config = preference_config(resumed, cache_dir, **settings)
    fit(config, "--trainer.max_steps", "5")
    proc = fit(config, "--ckpt_path", "last", "--model.preference.beta", "1.0", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert "model.preference.beta: 2.0 in the checkpoint, 1.0 now" in errors[0]
    fit(config, "--ckpt_path", "last")
    assert scalars(full / "logs", "train/loss_step") == scalars(resumed / "logs", "train/loss_step")
    a, b = lora_weights(full / "ckpt" / "last.ckpt"), lora_weights(resumed / "ckpt" / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, message", [
    (dict(data={"format": "alpaca"}), "model.preference trains on chosen/rejected pairs: set data.format: preference"),
    (dict(model={"preference": None}), "data.format preference goes with model.preference"),
    (dict(data={"packing": True}), "data.packing with data.format preference is not supported"),
    (dict(model={"lora": None}), "model.preference with model.lora null"),
])
def test_what_cannot_train_is_refused_in_one_line(tmp_path, cache_dir, overrides, message):
    proc = fit(preference_config(tmp_path, cache_dir, **overrides), check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert message in errors[0]


def test_a_pairs_file_in_each_form_trains(tmp_path, cache_dir):
    """A JSON-lines file mixing the forms (Alpaca-style, TRL's standard and conversational) trains under the llama2
    chat template; a record without 'rejected' stops the run in one line that names it."""
    conversation = [{"role": "user", "content": "What is 3 plus 4?"}]
    records = [{"instruction": "What is 1 plus 2?", "input": "", "chosen": "3", "rejected": "4"},
               {"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "6"},
               {"prompt": conversation, "chosen": [{"role": "assistant", "content": "7"}],
                "rejected": [{"role": "assistant", "content": "8"}]}] * 8
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    tokenizer = demo_tokenizer_file(512, cache_dir)  # the tiny model's 512 rows
    config = preference_config(tmp_path, cache_dir, trainer={"max_steps": 2},
                               data={"data_path": str(path), "chat_template": "llama2", "val_size": 4,
                                     "tokenizer_path": str(tokenizer)})
    fit(config)
    assert len(scalars(tmp_path / "logs", "train/loss_step")) == 2
    path.write_text("\n".join(json.dumps(r) for r in records + [{"prompt": "x", "chosen": "y"}]))
    proc = fit(config, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{path}: record 24 has no 'rejected' field" in errors[0]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(torch.cpu.Stream, "record_event"),
                    reason="FSDP2 on CPU processes needs torch.cpu.Stream.record_event (torch 2.6 has none)")
def test_dpo_under_fsdp2_computes_what_ddp_computes(tmp_path, cache_dir):
    """FSDP2 (its reference pass runs the sharded model a second time, without autograd) trains the weights DDP
    trains on the same per-rank pairs, on a bf16 base, with validation."""
    from test_fit import FSDP2, max_relative_difference

    from llama_lora.config import LlamaConfig
    from llama_lora.weights import save_meta

    config = LlamaConfig.from_name("tiny")
    save_meta(build_model(config, plan=torch.bfloat16, seed=3).state_dict(), config, tmp_path / "base", 2)
    model = {"checkpoint_dir": str(tmp_path / "base"), "model": None, "base_dtype": "bf16"}
    runs = {}
    for name, strategy in (("ddp", "ddp"), ("fsdp", FSDP2)):
        d = tmp_path / name
        d.mkdir()
        fit(preference_config(d, cache_dir, model=model, trainer={"devices": 2, "strategy": strategy,
                                                                  "max_steps": 4}, data={"micro_batch_size": 2}))
        runs[name] = d
    a, b = (lora_weights(runs[n] / "ckpt" / "last.ckpt") for n in ("fsdp", "ddp"))
    assert max_relative_difference(a, b) < 1e-5
    assert scalars(runs["fsdp"] / "logs", "train/loss_step") == scalars(runs["ddp"] / "logs", "train/loss_step")
    assert scalars(runs["fsdp"] / "logs", "val/loss") == scalars(runs["ddp"] / "logs", "val/loss")


def test_a_resume_against_another_reference_adapter_is_refused(tmp_path, cache_dir):
    """A DPO run's reference is the adapter it started from (model.init_adapter), kept on resume: resuming with
    another adapter file would go on against another reference. Failed before: it resumed silently."""
    adapters = {}
    for name, steps in (("sft", 2), ("other", 3)):
        (tmp_path / name).mkdir()
        fit(write_tiny_config(tmp_path / name, cache_dir, trainer={"max_steps": steps, "limit_val_batches": 0}))
        adapters[name] = str(tmp_path / name / "ckpt" / "last.ckpt")
    dpo = tmp_path / "dpo"
    dpo.mkdir()
    config = preference_config(dpo, cache_dir, model={"init_adapter": adapters["sft"]})
    fit(config, "--trainer.max_steps", "2")
    proc = fit(config, "--ckpt_path", "last", "--model.init_adapter", adapters["other"], check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "model.init_adapter" in errors[0] and "another file" in errors[0], errors[0]
    resumed = fit(config, "--ckpt_path", "last", check=False)  # the same adapter resumes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
