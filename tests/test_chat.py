"""Chat data and templates: the token ids and labels of generated multi-turn conversations equal an independent
construction from each template's strings (Llama 3's as its chat template renders it, tokenized whole with special
tokens parsed; Llama 2's as Meta's chat_completion encodes each exchange), and the records' two forms."""

import json
import random

import pytest
from test_tokenizer import write_bpe_file

from llama_lora.data.records import load_records
from llama_lora.data.tokenize import tokenize_record
from llama_lora.loss import IGNORE_INDEX
from llama_lora.prompts import FORMATS, chat_tokens
from llama_lora.tokenizer import Tokenizer

WORDS = ["the", "cat", "Paris", "2026", "café", "naïve", "我爱你", "🚀", "?", "!", "it's", "x=3;", "(ok)", "\n", "\t",
         "  ", "über", "-", "1,234", "end."]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(WORDS) + rng.choice([" ", "", " ", "\n"]) for _ in range(rng.randint(1, 12)))


def conversations(n: int, seed: int = 0):
    """Generated conversations: an optional system message, 1 to 4 exchanges, contents with non-ASCII text,
    digits, punctuation and whitespace at either end."""
    rng = random.Random(seed)
    for _ in range(n):
        messages = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            messages += [{"role": "user", "content": random_text(rng)},
                         {"role": "assistant", "content": random_text(rng)}]
        yield messages


@pytest.fixture(scope="module")
def llama3_tok(tmp_path_factory):
    pytest.importorskip("tiktoken", reason="Llama 3's tokenizer needs tiktoken (pip install -e '.[llama3]')")
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.model"
    corpus = " ".join(random_text(random.Random(i)) for i in range(300))
    write_bpe_file(path, corpus + " system user assistant " * 20, merges=150)
    return Tokenizer(path)


def test_llama3_ids_and_labels_equal_the_template_string_tokenized_whole(llama3_tok):
    """Independent construction: the conversation as Llama 3's chat template renders it (a string, special tokens
    written out), tokenized in one call by tiktoken with the special tokens parsed; the labels are the tokens of
    each assistant content and its <|eot_id|>, located by tokenizing the string up to them."""
    tok = llama3_tok
    model = tok.model  # tiktoken's Encoding itself

    def whole(text):
        return model.encode(text, allowed_special="all")

    for messages in conversations(60):
        text, spans = "<|begin_of_text|>", []
        for m in messages:
            text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
            start = len(whole(text))
            text += f"{m['content'].strip()}<|eot_id|>"
            if m["role"] == "assistant":
                spans.append((start, len(whole(text))))
        expected = whole(text)
        labels = [IGNORE_INDEX] * len(expected)
        for a, b in spans:
            labels[a:b] = expected[a:b]
        ids, got = tokenize_record({"messages": messages}, tok, max_seq_len=10_000, prompt_format=FORMATS["llama3"])[:2]
        assert ids == expected and got == labels
        assert all(got[b - 1] == tok.special["eot"] for _, b in spans)  # each trained turn ends in <|eot_id|>
    prompt, _ = chat_tokens(messages[:-1], tok, "llama3", add_generation_prompt=True)
    assert prompt == whole(text[: text.rindex(messages[-1]["content"].strip())])  # ends at the assistant header
    assert FORMATS["llama3"].stop_id(tok) == tok.special["eot"]


def test_special_token_strings_in_a_message_stay_text(llama3_tok):
    messages = [{"role": "user", "content": "say <|eot_id|> please"}, {"role": "assistant", "content": "<|eot_id|>"}]
    ids, trained = chat_tokens(messages, llama3_tok, "llama3")
    assert ids.count(llama3_tok.special["eot"]) == 2  # the two ends of turn, not the typed ones


@pytest.fixture(scope="module", params=["llama2", "demo"])
def sp_tok(request, tmp_path_factory):
    if request.param == "demo":
        from llama_lora.demo import demo_tokenizer_file

        return Tokenizer(demo_tokenizer_file(1024, tmp_path_factory.mktemp("cache")))
    import os
    from pathlib import Path

    if not os.environ.get("LLAMA_LORA_TEST_ASSETS"):
        pytest.skip("LLAMA_LORA_TEST_ASSETS is not set")
    return Tokenizer(Path(os.environ["LLAMA_LORA_TEST_ASSETS"]) / "tokenizer.model")


def test_llama2_ids_and_labels_equal_metas_chat_completion_encoding(sp_tok):
    """Independent construction, Meta's llama/generation.py chat_completion: the system message merged into the
    first user turn in <<SYS>>, then per exchange encode(f"[INST] {user} [/INST] {answer} ", bos, eos); the labels
    are each exchange's tokens after its "[INST] ... [/INST]" part, EOS included."""
    tok = sp_tok
    for messages in conversations(60, seed=1):
        dialog = messages
        if dialog[0]["role"] == "system":
            dialog = [{"role": "user", "content": f"<<SYS>>\n{dialog[0]['content']}\n<</SYS>>\n\n"
                                                  f"{dialog[1]['content']}"}] + dialog[2:]
        expected, labels = [], []
        for user, answer in zip(dialog[::2], dialog[1::2]):
            exchange = tok.encode(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ", bos=True,
                                  eos=True)
            head = len(tok.encode(f"[INST] {user['content'].strip()} [/INST]", bos=True))
            expected += exchange
            labels += [IGNORE_INDEX] * head + exchange[head:]
        ids, got = tokenize_record({"messages": messages}, tok, max_seq_len=10_000, prompt_format=FORMATS["llama2"])[:2]
        assert ids == expected and got == labels


def test_a_long_conversation_is_cut_and_one_that_cannot_train_is_dropped(llama3_tok):
    messages = [{"role": "user", "content": "hi " * 50}, {"role": "assistant", "content": "yes " * 50}]
    full, _ = chat_tokens(messages, llama3_tok, "llama3")
    first = chat_tokens(messages[:1], llama3_tok, "llama3", add_generation_prompt=True)[0]
    ids, labels, truncated = tokenize_record({"messages": messages}, llama3_tok, max_seq_len=len(first) + 3,
                                             prompt_format=FORMATS["llama3"])
    assert truncated and ids == full[: len(first) + 3] and labels[-3:] == ids[-3:]
    llama3 = FORMATS["llama3"]
    assert tokenize_record({"messages": messages}, llama3_tok, max_seq_len=len(first), prompt_format=llama3) is None


def test_both_record_forms_read_as_the_same_conversation(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in messages]}
    (tmp_path / "a.json").write_text(json.dumps([{"messages": messages}]))
    (tmp_path / "b.jsonl").write_text(json.dumps(sharegpt) + "\n")
    assert load_records(tmp_path / "a.json", format="chat") == load_records(tmp_path / "b.jsonl", format="chat") == [
        {"messages": messages}]


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "assistant", "content": "x"}]}, "alternating, starting with the user"),
    ({"messages": [{"role": "user", "content": "x"}]}, "nothing to train on"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "turn 0"),
    ({"instruction": "x", "output": "y"}, "neither 'messages'"),
])
def test_a_malformed_conversation_is_refused_in_one_line(tmp_path, record, message):
    (tmp_path / "c.json").write_text(json.dumps([record]))
    with pytest.raises(ValueError, match=message) as e:
        load_records(tmp_path / "c.json", format="chat")
    assert "record 0" in str(e.value) and "\n" not in str(e.value)


def test_alpaca_records_take_a_chosen_chat_template(llama3_tok):
    record = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    ids, labels, _ = tokenize_record(record, llama3_tok, max_seq_len=512, prompt_format=FORMATS["llama3"])
    expected, _ = chat_tokens([{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
                              llama3_tok, "llama3")
    assert ids == expected and [t for t in labels if t != IGNORE_INDEX] == llama3_tok.encode("5") + [
        llama3_tok.special["eot"]]


@pytest.mark.parametrize("variant", ["bf16", pytest.param("nf4-packing", marks=pytest.mark.slow),
                                     pytest.param("ddp", marks=pytest.mark.slow)])
def test_a_llama3_shaped_base_trains_on_chat_data_and_answers_in_its_template(tmp_path, llama3_tok, variant):
    """fit.py on a tiny Llama 3-shaped Meta base (theta 500000, llama3 scaling, tied embeddings, a tiktoken
    tokenizer), chat records in ShareGPT form; then generate.py takes the run's template (llama3, from the chat data
    and the tokenizer) and stops at <|eot_id|>, with and without a system message; merge and PEFT export work. The
    slow variants: QLoRA (an NF4 base) with packing; DDP on 2 processes."""
    import subprocess
    import sys

    import torch
    from conftest import ROOT, fit, write_tiny_config

    from llama_lora.config import LlamaConfig
    from llama_lora.weights import build_model, load_checkpoint, save_meta

    config = LlamaConfig.from_name("tiny", vocab_size=llama3_tok.vocab_size, rope_theta=500000.0, max_seq_len=256,
                                   tie_embeddings=True, rope_scaling={"factor": 32.0, "low_freq_factor": 1.0,
                                                                      "high_freq_factor": 4.0,
                                                                      "original_max_seq_len": 8192})
    save_meta(build_model(config, plan=torch.bfloat16, seed=1).state_dict(), config, tmp_path / "base")
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    lines = [json.dumps({"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in c]})
             for c in conversations(40, seed=3)]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    ddp = {"devices": 2, "strategy": "ddp"} if variant == "ddp" else {}
    config_file = write_tiny_config(tmp_path, tmp_path / "cache",
                                    trainer={"max_steps": 2, "limit_val_batches": 1, **ddp},
                                    model={"checkpoint_dir": str(tmp_path / "base"), "model": None,
                                           "base_dtype": "nf4" if variant == "nf4-packing" else "auto"},
                                    data={"data_path": str(tmp_path / "chat.jsonl"), "format": "chat", "val_size": 4,
                                          "tokenizer_path": str(llama3_tok.path), "max_seq_len": 128,
                                          "packing": variant == "nf4-packing"})
    trained = fit(config_file)
    said = " ".join(trained.stderr.split())  # the log as one line, whatever the terminal's width wrapped
    assert "Chat data" in said and "in the llama3 chat template" in said  # (failed before: "Alpaca data")
    if variant != "ddp":  # model null: read once per process (failed before: twice)
        assert trained.stderr.count("Read meta checkpoint") == 1, trained.stderr[-2000:]
    ckpt = tmp_path / "ckpt" / "last.ckpt"

    def script(name, *args):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                              timeout=300)
    for adapter, extra in ((ckpt, ()), (ckpt.parent, ("--system", "Be brief."))):  # a .ckpt, and a run folder
        proc = script("generate.py", "--adapter", str(adapter), "--greedy", "--max_new_tokens", "6", *extra, "Hi")
        assert proc.returncode == 0 and "the llama3 chat template" in proc.stderr, proc.stderr[-2000:]
        # each said once (failed before: the adapter and the base were each read, and logged, twice)
        assert proc.stderr.count("Read meta checkpoint") == 1, proc.stderr[-2000:]
        assert proc.stderr.count("Adapter:") == (1 if adapter == ckpt.parent else 0), proc.stderr[-2000:]
    assert script("merge.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path / "merged")).returncode == 0
    _, _, merged = load_checkpoint(tmp_path / "merged")
    assert merged.rope_scaling == config.rope_scaling and merged.tie_embeddings and merged.rope_theta == 500000.0
    assert script("export_adapter.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path / "peft")).returncode == 0
    # The template travels with what was written (failed before: both were prompted in Alpaca's format, silently).
    for where in (("--adapter", str(tmp_path / "peft"), "--checkpoint_dir", str(tmp_path / "base"),
                   "--tokenizer_path", str(llama3_tok.path)),
                  ("--checkpoint_dir", str(tmp_path / "merged"), "--tokenizer_path", str(llama3_tok.path))):
        proc = script("generate.py", *where, "--greedy", "--max_new_tokens", "4", "Hi")
        assert proc.returncode == 0 and "the llama3 chat template" in proc.stderr, proc.stderr[-2000:]
    proc = script("generate.py", "--adapter", str(ckpt), "--system", "x", "--mode", "completion", "Hi")
    assert proc.returncode != 0 and "--system is a chat template's" in proc.stderr
