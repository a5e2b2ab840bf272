"""GGUF for llama.cpp and Ollama: merged models and LoRA adapters read back with the gguf package's own reader
(the default suite), and run by llama.cpp itself through llama-cpp-python (slow, skipped without it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, fit, lora_weights, run_on_meta_base, write_tiny_config

from llama_lora.config import LlamaConfig
from llama_lora.demo import demo_tokenizer_file
from llama_lora.export import merged_weights
from llama_lora.gguf_files import write_model
from llama_lora.layout import gguf_name
from llama_lora.prompts import format_prompt
from llama_lora.tokenizer import Tokenizer
from llama_lora.trained_run import open_run
from llama_lora.weights import build_model, load_checkpoint, save_meta

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install -e '.[gguf]') is not installed")


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny LoRA run (all seven targets and the output layer) on a bf16 Meta base folder with its tokenizer."""
    lora = {"targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"], "r": 4, "alpha": 8, "dropout": 0.0}
    return run_on_meta_base(tmp_path_factory, "gguf", seed=4, lora=lora)


def merged_reference(run: Path) -> dict[str, torch.Tensor]:
    """The merged weights in fp32, as merge.py folds them."""
    base, _, _ = load_checkpoint(run / "base")
    return {k: v.clone() for k, v in merged_weights(base, open_run(run / "ckpt" / "last.ckpt"), torch.float32)}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file, dequantized by the gguf package, in torch's (rows, columns) order."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = torch.from_numpy(values.astype("float32").reshape(tuple(reversed(t.shape.tolist()))))
    return out


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_a_merged_gguf_holds_the_metadata_the_tokenizer_and_the_merged_weights(run, tmp_path, kind):
    proc = script("merge.py", "--adapter", str(run / "ckpt" / "last.ckpt"), "--out_dir", str(tmp_path / "out"),
                  "--format", "gguf", "--gguf_type", kind)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = tmp_path / "out" / f"model-{kind}.gguf"
    reader = gguf.GGUFReader(str(path))
    config = LlamaConfig.from_name("tiny")
    expected = {"general.architecture": "llama", "llama.context_length": config.max_seq_len,
                "llama.embedding_length": config.dim, "llama.feed_forward_length": config.hidden_dim,
                "llama.block_count": config.n_layers, "llama.attention.head_count": config.n_heads,
                "llama.attention.head_count_kv": config.n_kv_heads, "llama.rope.dimension_count": config.head_dim,
                "llama.rope.freq_base": config.rope_theta, "llama.vocab_size": config.vocab_size,
                "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
                "tokenizer.ggml.add_eos_token": False}
    for key, value in expected.items():
        assert field(reader, key) == pytest.approx(value) if isinstance(value, float) else field(reader, key) == value
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.norm_eps)
    tok = Tokenizer(run / "base" / "tokenizer.model")
    assert field(reader, "tokenizer.ggml.tokens") == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert field(reader, "tokenizer.ggml.scores") == pytest.approx([tok.sp.GetScore(i) for i in range(512)])
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[0] == 2 and types[1] == types[2] == 3 and types[3] == 6  # unk, bos/eos control, <0x00> byte
    got, want = read_tensors(path), merged_reference(run)
    assert set(got) == {gguf_name(k) for k in want}
    for key, w in want.items():
        g = got[gguf_name(key)]
        if kind == "f32" or w.dim() == 1:  # norms are f32 in every type, as llama.cpp keeps them
            assert torch.equal(g, w), key
        elif kind in ("f16", "bf16"):
            assert torch.equal(g, w.to(torch.float16 if kind == "f16" else torch.bfloat16).float()), key
        elif w.shape[-1] % 32:  # rows that do not split into 32-value blocks (ffn_down: 176): f16 instead
            assert torch.equal(g, w.half().float()), key
        else:  # the gguf package's own rounding of the merged weight, and so within its blocks' steps
            qtype = gguf.GGMLQuantizationType[kind.upper()]
            own = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)
            assert torch.equal(g, torch.from_numpy(own).reshape(w.shape)), key
            blocks, err = w.reshape(-1, 32), (g - w).reshape(-1, 32)
            step = blocks.abs().amax(1, keepdim=True) / (127 if kind == "q8_0" else 8)
            # half a step (the scale itself is fp16); q4_0's 16 levels run -8..7 steps of the signed largest value,
            # so the largest of the other sign is clipped by a whole step
            bound = step * (0.57 if kind == "q8_0" else 1.07) + 1e-7
            assert (err.abs() <= bound).all(), key
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert f"FROM ./model-{kind}.gguf" in modelfile and "ollama create" in modelfile


SPM_CORPUS = ["Name three fruits.", " leading space", "Bonjour 🚀 我爱你 café ❤️ fin", "12345 digits\tand\n\nruns",
              "</s> typed <s> as text", "", "   ", "x=3; y = f(x)"]


@pytest.mark.slow
def test_a_ggufs_sentencepiece_tokenizer_is_the_model_it_was_written_from(run, tmp_path):
    """A GGUF's "llama" tokenizer (pieces, scores, types) read back as a SentencePiece model: the same ids and text as
    the tokenizer.model it was written from, the demo's and LLaMA-2's (32,000 pieces); and the GGUF alone is a base
    that generate.py answers from with its own tokenizer."""
    from llama_lora.tokenizer import SentencePieceTokenizer

    proc = script("merge.py", "--adapter", str(run / "ckpt" / "last.ckpt"), "--out_dir", str(tmp_path / "out"),
                  "--format", "gguf", "--gguf_type", "f32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = tmp_path / "out" / "model-f32.gguf"
    pairs = [(Tokenizer(run / "base" / "tokenizer.model"), Tokenizer(path))]
    if os.environ.get("LLAMA_LORA_TEST_ASSETS"):
        assets = Path(os.environ["LLAMA_LORA_TEST_ASSETS"])
        config = LlamaConfig.from_name("tiny", vocab_size=32000)
        shapes = {k: tuple(v.shape) for k, v in build_model(config, plan=torch.float32).state_dict().items()}
        real = Tokenizer(assets / "tokenizer.model")
        write_model(tmp_path / "real.gguf", config, shapes,
                    build_model(config, plan=torch.float32).state_dict().items(), real, "f32")
        pairs.append((real, Tokenizer(tmp_path / "real.gguf")))
    for original, read in pairs:
        assert isinstance(read, SentencePieceTokenizer) and read.vocab_size == original.vocab_size
        assert (read.bos_id, read.eos_id, read.pad_id) == (original.bos_id, original.eos_id, original.pad_id)
        for text in SPM_CORPUS:
            assert read.encode(text, bos=True) == original.encode(text, bos=True), text
            assert read.decode(original.encode(text)) == original.decode(original.encode(text))
    proc = script("generate.py", "--checkpoint_dir", str(path), "--greedy", "--max_new_tokens", "4", "Hi")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with_adapter = script("generate.py", "--adapter", str(run / "ckpt" / "last.ckpt"), "--greedy",
                          "--max_new_tokens", "4", "--precision", "32-true", "Hi")
    assert proc.stdout == with_adapter.stdout


def test_an_hf_base_gives_the_gguf_of_its_meta_form(run, tmp_path):
    """The same base in HF's layout (q/k rows permuted for rotate-half RoPE): the GGUF is the Meta one, byte for byte
    in its tensors (llama.cpp pairs RoPE channels as Meta does)."""
    assert script("merge.py", "--checkpoint_dir", str(run / "base"), "--out_dir", str(tmp_path / "hf"), "--format",
                  "hf").returncode == 0
    for base in ("base", "hf"):
        root = run if base == "base" else tmp_path
        proc = script("merge.py", "--adapter", str(run / "ckpt" / "last.ckpt"), "--checkpoint_dir", str(root / base),
                      "--out_dir", str(tmp_path / f"gguf-{base}"), "--format", "gguf", "--gguf_type", "f32")
        assert proc.returncode == 0, proc.stderr[-3000:]
    meta, hf = read_tensors(tmp_path / "gguf-base" / "model-f32.gguf"), read_tensors(tmp_path / "gguf-hf" /
                                                                                      "model-f32.gguf")
    assert meta.keys() == hf.keys() and all(torch.equal(meta[k], hf[k]) for k in meta)


def tied_base(folder: Path, tokenizer: Path) -> Path:
    """A llama2.c checkpoint whose output layer is its embedding (a stories model's shared classifier)."""
    import shutil

    from llama_lora.weights import save_llama2c

    config = LlamaConfig.from_name("tiny")
    sd = build_model(config, plan=torch.float32, seed=6).state_dict()
    sd["output.weight"] = sd["tok_embeddings.weight"]
    folder.mkdir()
    shutil.copyfile(tokenizer, folder / "tokenizer.model")
    return save_llama2c(sd, config, folder / "tied.bin")


def test_tied_embeddings_are_written_once(tmp_path, cache_dir):
    """A shared classifier: token_embd alone (llama.cpp computes the output with it when output.weight is absent),
    as the HF export leaves lm_head out."""
    demo_tok = demo_tokenizer_file(512, cache_dir)
    base = tied_base(tmp_path / "base", demo_tok)
    proc = script("merge.py", "--checkpoint_dir", str(base), "--out_dir", str(tmp_path / "out"), "--format", "gguf",
                  "--tokenizer_path", str(demo_tok), "--gguf_type", "f32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_tensors(tmp_path / "out" / "model-f32.gguf")
    assert "output.weight" not in got and "token_embd.weight" in got


def test_the_gguf_merge_lets_each_written_tensor_of_the_base_go(run, tmp_path, monkeypatch):
    """Every base tensor is released once written (its pages leave RSS: tests/test_weights.py), after it was written:
    the peak is one layer, not the base (docs/performance.md: 1.9 GiB for 7B, against 13.6 GiB for the HF merge)."""
    from llama_lora.export import merge_adapter
    from llama_lora.weights import LazyStateDict

    released, original = [], LazyStateDict.release
    out = tmp_path / "model-f16.gguf.tmp"

    def release(self, key):
        released.append((key, out.stat().st_size))
        original(self, key)
    monkeypatch.setattr(LazyStateDict, "release", release)
    merge_adapter(str(run / "ckpt" / "last.ckpt"), out_dir=str(tmp_path), format="gguf")
    base, _, _ = load_checkpoint(run / "base")
    assert [k for k, _ in released] == list(base)
    sizes = [size for _, size in released]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)  # the file grew before each release


def test_the_modelfile_template_is_the_prompt_the_adapter_was_trained_with(run, tmp_path):
    """Rendered as Ollama renders it (Go's text/template, here by hand), the template gives format_prompt exactly."""
    import re

    assert script("merge.py", "--adapter", str(run / "ckpt" / "last.ckpt"), "--out_dir", str(tmp_path), "--format",
                  "gguf").returncode == 0
    template = re.search(r'TEMPLATE """(.*)"""', (tmp_path / "Modelfile").read_text(), re.S).group(1)
    with_input, without = re.fullmatch(r"\{\{ if \.System \}\}(.*)\{\{ else \}\}(.*)\{\{ end \}\}", template,
                                       re.S).groups()
    record = {"instruction": "Sort the words.", "input": "pear apple"}
    assert without.replace("{{ .Prompt }}", record["instruction"]) == format_prompt({**record, "input": ""})
    assert with_input.replace("{{ .Prompt }}", record["instruction"]).replace("{{ .System }}", record["input"]) == (
        format_prompt(record))


def test_the_chat_template_is_the_prompt_the_adapter_was_trained_with(run, tmp_path):
    """tokenizer.chat_template, rendered as llama-cpp-python and transformers render it (a sandboxed Jinja
    environment), gives format_prompt exactly: with a system message as the Alpaca input, and without."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    assert script("merge.py", "--adapter", str(run / "ckpt" / "last.ckpt"), "--out_dir", str(tmp_path), "--format",
                  "gguf").returncode == 0
    source = field(gguf.GGUFReader(str(tmp_path / "model-f16.gguf")), "tokenizer.chat_template")
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    record = {"instruction": "Sort the words: ünïcode {braces} %}", "input": "pear apple\n"}

    def render(messages):
        return template.render(messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
    assert render([{"role": "user", "content": record["instruction"]}]) == format_prompt({**record, "input": ""})
    assert render([{"role": "system", "content": record["input"]},
                   {"role": "user", "content": record["instruction"]}]) == format_prompt(record)
    turns = [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"},
             {"role": "user", "content": "Two?"}]
    assert render(turns) == (format_prompt({"instruction": "One?"}) + " 1</s>" + format_prompt({"instruction": "Two?"}))


def test_a_lora_gguf_holds_the_adapter(run, tmp_path):
    ckpt = run / "ckpt" / "last.ckpt"
    proc = script("export_adapter.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path), "--format", "gguf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reader = gguf.GGUFReader(str(tmp_path / "adapter.gguf"))
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == 8.0
    got = read_tensors(tmp_path / "adapter.gguf")
    want = {gguf_name(k.removeprefix("model.")): v for k, v in lora_weights(ckpt).items()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert got["blk.0.attn_q.weight.lora_a"].shape == (4, 64) and got["output.weight.lora_b"].shape == (512, 4)


@pytest.mark.parametrize("fmt", ["peft", "gguf"])
def test_an_adapter_of_a_run_without_a_preset_exports(run, tmp_path, fmt):
    """model: null (the base folder's own config): export reads the shape from the base folder, which has one."""
    fit(write_tiny_config(tmp_path, tmp_path / "cache", trainer={"max_steps": 1, "limit_val_batches": 0},
                          model={"checkpoint_dir": str(run / "base"), "model": None,
                                 "lora": {"targets": ["wq", "wk"], "r": 2, "alpha": 4, "dropout": 0.0}}))
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    proc = script("export_adapter.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path / "out"), "--format", fmt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if fmt == "gguf":
        reader = gguf.GGUFReader(str(tmp_path / "out" / "adapter.gguf"))
        assert field(reader, "llama.block_count") == LlamaConfig.from_name("tiny").n_layers
    else:
        assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_random_nf4_base_merges_to_gguf_as_it_was_trained(tmp_path, cache_dir):
    """An adapter trained on a random NF4 base: the GGUF holds the dequantized base plus the update, the merge's."""
    fit(write_tiny_config(tmp_path, cache_dir, model={"base_dtype": "nf4"},
                          trainer={"max_steps": 2, "limit_val_batches": 0}))
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    tokenizer = next(cache_dir.glob("demo-tokenizer-512-*.model"))
    for fmt, dtype in (("gguf", ("--gguf_type", "f32")), ("meta", ("--base_dtype", "fp32"))):
        proc = script("merge.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path / fmt), "--format", fmt, *dtype,
                      "--tokenizer_path", str(tokenizer))
        assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_tensors(tmp_path / "gguf" / "model-f32.gguf")
    meta = build_model(checkpoint=tmp_path / "meta", plan=torch.float32).state_dict()
    assert all(torch.equal(got[gguf_name(k)], v) for k, v in meta.items())


@pytest.mark.parametrize("args, message", [
    (("--format", "gguf", "--base_dtype", "bf16"), "a GGUF's type is --gguf_type"),
    (("--format", "gguf", "--gguf_type", "q4_k"), "gguf_type"),
    (("--format", "gguf", "--tokenizer_path", "missing/tokenizer.model"), "missing/tokenizer.model"),
])
def test_a_wrong_gguf_merge_gets_one_line(run, tmp_path, args, message):
    proc = script("merge.py", "--adapter", str(run / "ckpt" / "last.ckpt"), "--out_dir", str(tmp_path), *args)
    assert proc.returncode != 0 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not list(tmp_path.iterdir())


def test_a_base_converted_alone_is_the_base(run, tmp_path):
    """merge.py with --checkpoint_dir and no adapter: the base's own weights (the GGUF llama.cpp applies --lora to),
    and no Modelfile (the base was not trained on Alpaca's prompt)."""
    proc = script("merge.py", "--checkpoint_dir", str(run / "base"), "--out_dir", str(tmp_path), "--format", "gguf",
                  "--gguf_type", "bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_tensors(tmp_path / "model-bf16.gguf")
    base, _, _ = load_checkpoint(run / "base")
    assert all(torch.equal(got[gguf_name(k)], base[k].float()) for k in base)
    assert not (tmp_path / "Modelfile").exists()
    assert "tokenizer.chat_template" not in gguf.GGUFReader(str(tmp_path / "model-bf16.gguf")).fields
    proc = script("merge.py", "--out_dir", str(tmp_path), "--format", "gguf")
    assert proc.returncode != 0 and "--checkpoint_dir alone" in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def llama3_run(tmp_path_factory):
    """A tiny Llama 3-shaped run: a Meta base with theta 500000, Llama 3.1's RoPE scaling (factor 32) and tied
    embeddings, a tiktoken BPE tokenizer, trained on chat records (so in the llama3 chat template)."""
    pytest.importorskip("tiktoken", reason="Llama 3's tokenizer needs tiktoken (pip install -e '.[llama3]')")
    import json
    import random

    from test_chat import conversations, random_text
    from test_tokenizer import write_bpe_file

    d = tmp_path_factory.mktemp("llama3")
    corpus = " ".join(random_text(random.Random(i)) for i in range(300)) + " system user assistant " * 20
    write_bpe_file(d / "tokenizer.model", corpus, merges=150)
    tok = Tokenizer(d / "tokenizer.model")
    config = LlamaConfig.from_name("tiny", vocab_size=tok.vocab_size, rope_theta=500000.0, max_seq_len=2048,
                                   tie_embeddings=True, rope_scaling={"factor": 32.0, "low_freq_factor": 1.0,
                                                                      "high_freq_factor": 4.0,
                                                                      "original_max_seq_len": 8192})
    sd = build_model(config, plan=torch.float32, seed=9).state_dict()
    for k in sd:  # sharp attention, so that a RoPE or scaling mismatch shows in the logits
        if k.endswith(("attention.wq.weight", "attention.wk.weight")):
            sd[k] = sd[k] * 12
    save_meta(sd, config, d / "base")
    (d / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(40, seed=5)))
    fit(write_tiny_config(d, tmp_path_factory.mktemp("cache"), trainer={"max_steps": 2, "limit_val_batches": 0},
                          model={"checkpoint_dir": str(d / "base"), "model": None},
                          data={"data_path": str(d / "chat.jsonl"), "format": "chat", "val_size": 4,
                                "tokenizer_path": str(d / "tokenizer.model"), "max_seq_len": 128}))
    return d


def test_a_llama3_gguf_holds_its_bpe_tokenizer_rope_factors_and_chat_template(llama3_run, tmp_path):
    from llama_lora.gguf_files import rope_factors
    from llama_lora.prompts import FORMATS

    proc = script("merge.py", "--adapter", str(llama3_run / "ckpt" / "last.ckpt"), "--out_dir", str(tmp_path),
                  "--format", "gguf", "--gguf_type", "f32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reader = gguf.GGUFReader(str(tmp_path / "model-f32.gguf"))
    tok = Tokenizer(llama3_run / "tokenizer.model")
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size and tokens[tok.special["eot"]] == "<|eot_id|>"
    assert tokens[ord("a")] == "a" and tokens[ord(" ")] == "\u0120"  # GPT-2's byte alphabet: a space is Ġ
    assert len(field(reader, "tokenizer.ggml.merges")) == len(tok.ranks) - 256  # every trained token is one merge
    assert field(reader, "tokenizer.ggml.eot_token_id") == tok.special["eot"]
    assert field(reader, "tokenizer.chat_template") == FORMATS["llama3"].jinja
    _, _, config = load_checkpoint(llama3_run / "base")
    got = read_tensors(tmp_path / "model-f32.gguf")
    assert torch.equal(got["rope_freqs.weight"], rope_factors(config)) and "output.weight" not in got
    assert {float(f) for f in rope_factors(config)} > {1.0, 32.0}  # kept, divided, and the smooth band between
    assert 'PARAMETER stop "<|eot_id|>"' in (tmp_path / "Modelfile").read_text()


def test_without_the_gguf_package_one_line_says_what_to_install(monkeypatch):
    from llama_lora.gguf_files import gguf_package

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ValueError, match=r'pip install -e "\.\[gguf\]"'):
        gguf_package()


# ----- llama.cpp itself -----

def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed; it builds llama.cpp from source (docs/performance.md: "
                    "`pip install llama-cpp-python==0.3.36`, a few minutes)")
    return llama_cpp


def open_gguf(lc, path: Path, monkeypatch, **kwargs):
    """llama.cpp's model on ``path``, computing logits for every position. On a CPU with AMX, llama.cpp's AMX
    kernels crash on a q8_0 model (ggml-org/llama.cpp#20824, open; a q8_0 file from llama.cpp's own
    convert_hf_to_gguf.py crashes the same way here): its extra buffer types are turned off there, as llama-cli's
    --no-repack does."""
    if b"AMX_INT8 = 1" in lc.llama_print_system_info():
        defaults = lc.llama_cpp.llama_model_default_params

        def no_repack():
            params = defaults()
            params.use_extra_bufts = False
            return params
        monkeypatch.setattr(lc.llama.llama_cpp, "llama_model_default_params", no_repack)
    # The KV cache in f32 (llama.cpp's default is f16): the f32 file is then compared at fp32's own precision.
    return lc.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2,
                    type_k=lc.GGML_TYPE_F32, type_v=lc.GGML_TYPE_F32, **kwargs)


def same_tokens_and_logits(llm, tok, ours, texts: list[str], bos: bool, tolerance: float) -> None:
    """llama.cpp tokenizes each text as ``tok`` does and computes ``ours``' logits over it, within ``tolerance`` of the
    largest logit."""
    for text in texts:
        ids = tok.encode(text, bos=bos)
        assert llm.tokenize(text.encode(), add_bos=bos, special=False) == ids, text
        llm.reset()
        llm.eval(ids)
        theirs = torch.tensor(llm.scores[: len(ids)])
        with torch.no_grad():
            mine = ours(torch.tensor([ids]))[0]
        scale = mine.abs().max()
        assert (theirs - mine).abs().max() <= tolerance * scale, (text, float((theirs - mine).abs().max() / scale))


@pytest.fixture(scope="module")
def peaky_run(tmp_path_factory, assets):
    """A Meta base of the small shape's kind, but tiny, with the real LLaMA-2 tokenizer (32000 pieces) and query and
    key weights scaled up, so that attention is far from uniform (a RoPE or head-order mismatch shows); a LoRA adapter
    trained on it for a few steps of real Alpaca records."""
    import shutil

    d = tmp_path_factory.mktemp("llamacpp")
    config = LlamaConfig.from_name("tiny", vocab_size=32000)
    sd = build_model(config, plan=torch.float32, seed=8).state_dict()
    for k in sd:
        if k.endswith(("attention.wq.weight", "attention.wk.weight")):
            sd[k] = sd[k] * 12
    save_meta(sd, config, d / "base")
    shutil.copyfile(assets / "tokenizer.model", d / "base" / "tokenizer.model")
    lora = {"targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"], "r": 4, "alpha": 8, "dropout": 0.0}
    config_file = write_tiny_config(d, tmp_path_factory.mktemp("cache"),
                                    trainer={"max_steps": 4, "limit_val_batches": 0},
                                    model={"checkpoint_dir": str(d / "base"), "lora": lora, "model": None},
                                    data={"data_path": str(assets / "alpaca_5000.json"), "num_samples": 64,
                                          "tokenizer_path": str(assets / "tokenizer.model"), "max_seq_len": 128})
    fit(config_file, "--model.optimizer.init_args.lr", "0.05")
    return d


TEXTS = ["Below is an instruction that describes a task.\n\n### Instruction:\nName three fruits.\n\n### Response:",
         "Bonjour 🚀 我爱你 café ❤️ fin", "  leading spaces, 12345 digits and\ttabs"]
# Relative to the logits' largest magnitude. Measured (Intel Xeon, llama-cpp-python 0.3.36): f32 4.5e-7, f16 4.1e-4,
# bf16 5e-3, q8_0 1.1e-2; q/k rows in HF's order instead of Meta's (a RoPE pairing bug) give 0.22.
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 3e-2}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_llama_cpp_computes_our_logits_and_continuation(peaky_run, tmp_path, kind, monkeypatch):
    """llama.cpp (through llama-cpp-python) on the merged GGUF: its tokenization of a few texts equals ours, its
    logits over them equal ours (f32 to 1e-5 of the largest logit; the others to the stated tolerances), and its
    greedy continuation of a prompt equals generate.py --greedy's."""
    lc = llama_cpp()
    ckpt = peaky_run / "ckpt" / "last.ckpt"
    proc = script("merge.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path), "--format", "gguf", "--gguf_type",
                  kind)
    assert proc.returncode == 0, proc.stderr[-3000:]
    llm = open_gguf(lc, tmp_path / f"model-{kind}.gguf", monkeypatch)
    tok = Tokenizer(peaky_run / "base" / "tokenizer.model")
    ours = (r := open_run(ckpt)).build(r.plan_for("cpu", "32-true"))
    same_tokens_and_logits(llm, tok, ours, TEXTS, bos=True, tolerance=TOLERANCE[kind])
    prompt = format_prompt({"instruction": "Name three fruits.", "input": ""})
    formatter = lc.llama_chat_format.Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], "</s>", "<s>")
    assert formatter(messages=[{"role": "user", "content": "Name three fruits."}]).prompt == prompt
    ids = tok.encode(prompt, bos=True)
    mine = ours.generate(ids, 12, temperature=0.0, eos_id=tok.eos_id)
    if kind == "f32":
        llm.reset()
        theirs = []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if t == tok.eos_id or len(theirs) == len(mine):
                break
            theirs.append(t)
        assert theirs == mine
        proc = script("generate.py", "--adapter", str(ckpt), "--greedy", "--precision", "32-true", "--max_new_tokens",
                      "12", "Name three fruits.")
        assert proc.returncode == 0 and proc.stdout.rstrip("\n") == tok.decode(mine).replace("\r", "\n")


@pytest.mark.slow
def test_llama_cpp_computes_a_tied_models_logits(tmp_path, cache_dir, monkeypatch):
    lc = llama_cpp()
    demo_tok = demo_tokenizer_file(512, cache_dir)
    base = tied_base(tmp_path / "base", demo_tok)
    assert script("merge.py", "--checkpoint_dir", str(base), "--out_dir", str(tmp_path / "out"), "--format", "gguf",
                  "--tokenizer_path", str(demo_tok), "--gguf_type", "f32").returncode == 0
    llm = open_gguf(lc, tmp_path / "out" / "model-f32.gguf", monkeypatch)
    ids = Tokenizer(demo_tok).encode("What is 3 plus 5? The word paper has 5 letters.", bos=True)
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[: len(ids)])
    with torch.no_grad():
        mine = build_model(checkpoint=base, plan=torch.float32)(torch.tensor([ids]))[0]
    assert (theirs - mine).abs().max() <= 1e-5 * mine.abs().max()


@pytest.mark.slow
def test_llama_cpp_applies_our_lora_gguf_to_the_base_gguf(peaky_run, tmp_path, monkeypatch):
    """One base GGUF and the adapter's LoRA GGUF, applied by llama.cpp (--lora): the merged model's logits."""
    lc = llama_cpp()
    ckpt = peaky_run / "ckpt" / "last.ckpt"
    tokenizer = str(peaky_run / "base" / "tokenizer.model")
    assert script("merge.py", "--checkpoint_dir", str(peaky_run / "base"), "--out_dir", str(tmp_path / "base"),
                  "--format", "gguf", "--gguf_type", "f32").returncode == 0
    assert script("export_adapter.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path), "--format",
                  "gguf").returncode == 0
    assert script("merge.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path / "merged"), "--format", "gguf",
                  "--gguf_type", "f32").returncode == 0
    ids = Tokenizer(tokenizer).encode(TEXTS[0], bos=True)
    logits = []
    for path, kwargs in ((tmp_path / "base" / "model-f32.gguf", {"lora_path": str(tmp_path / "adapter.gguf")}),
                         (tmp_path / "merged" / "model-f32.gguf", {})):
        llm = open_gguf(lc, path, monkeypatch, **kwargs)
        llm.eval(ids)
        logits.append(torch.tensor(llm.scores[: len(ids)]))
    assert (logits[0] - logits[1]).abs().max() <= 1e-5 * logits[1].abs().max()


@pytest.mark.slow
def test_llama_cpp_computes_a_llama3_models_tokens_logits_and_chat_prompt(llama3_run, tmp_path, monkeypatch):
    """The Llama 3-shaped run merged to an f32 GGUF: llama.cpp's BPE tokenization (gpt2 model, llama-bpe
    pre-tokenizer) equals tiktoken's; its logits over 1,200 positions equal ours (without rope_freqs.weight, they
    would not); the chat template, rendered and tokenized by llama.cpp with its special tokens, gives our
    chat_tokens' prompt."""
    import random

    from test_chat import random_text

    from llama_lora.prompts import FORMATS, chat_tokens

    lc = llama_cpp()
    ckpt = llama3_run / "ckpt" / "last.ckpt"
    assert script("merge.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path), "--format", "gguf", "--gguf_type",
                  "f32").returncode == 0
    tok = Tokenizer(llama3_run / "tokenizer.model")
    llm = lc.Llama(model_path=str(tmp_path / "model-f32.gguf"), n_ctx=2048, logits_all=True, verbose=False,
                   n_threads=2, type_k=lc.GGML_TYPE_F32, type_v=lc.GGML_TYPE_F32)
    rng = random.Random(7)
    texts = [random_text(rng) for _ in range(30)] + ["  two  spaces, 12345 digits\\n\\n\\ttab", "Bonjour 🚀 我爱你 ü"]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    ids = tok.encode(" ".join(texts * 12), bos=True)[:1200]
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[: len(ids)])
    ours = (r := open_run(ckpt)).build(r.plan_for("cpu", "32-true"))
    with torch.no_grad():
        mine = ours(torch.tensor([ids]))[0]
    # measured 1.2e-5 of the largest logit (1,200 positions of sharp attention); 0.34 without rope_freqs.weight
    assert (theirs - mine).abs().max() <= 5e-5 * mine.abs().max()
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three fruits."}]
    text = ImmutableSandboxedEnvironment().from_string(FORMATS["llama3"].jinja).render(
        messages=messages, add_generation_prompt=True, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == chat_tokens(messages, tok, "llama3", True)[0]
