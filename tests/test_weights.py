import dataclasses
import json
from pathlib import Path

import pytest
import torch

from llama_lora.layout import permute_from_hf, permute_to_hf
from llama_lora.weights import (
    build_model,
    detect_format,
    load_checkpoint,
    save_hf,
    save_llama2c,
    save_meta,
)


@pytest.fixture
def sd(tiny_model):
    return {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}


def load_logits(path, tokens, config=None):
    return build_model(config, checkpoint=path, plan=torch.float32)(tokens)


def test_permutation_is_inverse_and_moves_pairs():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)  # 2 heads of head_dim 8
    assert torch.equal(permute_from_hf(permute_to_hf(w, 2), 2), w)
    # Meta's pair (0, 1) of head 0 becomes HF rows 0 and head_dim/2 = 4 (rotate-half layout).
    hf = permute_to_hf(w, 2)
    assert torch.equal(hf[0], w[0]) and torch.equal(hf[4], w[1]) and torch.equal(hf[8], w[8])


def test_same_weights_in_all_layouts_give_identical_logits(tmp_path, tiny_model, tiny_config, sd, tokens):
    expected = tiny_model(tokens)
    save_meta(sd, tiny_config, tmp_path / "meta")
    save_hf(sd, tiny_config, tmp_path / "hf_st")
    save_hf(sd, tiny_config, tmp_path / "hf_bin", safetensors=False, max_shard_bytes=100_000)
    save_hf(sd, tiny_config, tmp_path / "hf_st_sharded", max_shard_bytes=100_000)
    save_llama2c(sd, tiny_config, tmp_path / "model.bin")
    assert [detect_format(tmp_path / n) for n in ("meta", "hf_st", "hf_bin", "model.bin")] == [
        "meta", "hf", "hf", "llama2c"]
    assert len(list((tmp_path / "hf_bin").glob("pytorch_model-*.bin"))) > 1
    assert (tmp_path / "hf_st_sharded" / "model.safetensors.index.json").is_file()
    for name in ("meta", "hf_st", "hf_bin", "hf_st_sharded", "model.bin"):
        assert torch.equal(load_logits(tmp_path / name, tokens), expected), name


def test_meta_hf_meta_round_trip(tmp_path, tiny_config, sd):
    save_hf(sd, tiny_config, tmp_path / "hf")
    hf_sd, _, config = load_checkpoint(tmp_path / "hf")
    assert config == tiny_config
    save_meta(hf_sd, config, tmp_path / "meta")
    back, _, config2 = load_checkpoint(tmp_path / "meta")
    assert config2 == tiny_config and back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # The HF file really is in HF's names and permuted layout.
    from safetensors.torch import load_file

    raw = load_file(tmp_path / "hf" / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in raw and "lm_head.weight" in raw
    assert not torch.equal(raw["model.layers.0.self_attn.q_proj.weight"], sd["layers.0.attention.wq.weight"])


@pytest.mark.parametrize("n_shards", [2, 8])
def test_sharded_meta_merge(tmp_path, tiny_config, sd, n_shards, tokens, tiny_model):
    save_meta(sd, tiny_config, tmp_path, n_shards=n_shards)
    shards = sorted(tmp_path.glob("consolidated.*.pth"))
    assert len(shards) == n_shards
    first = torch.load(shards[0], weights_only=True)
    assert first["layers.0.attention.wq.weight"].shape[0] == tiny_config.dim // n_shards  # split on dim 0
    assert first["layers.0.attention.wo.weight"].shape[1] == tiny_config.dim // n_shards  # split on dim 1
    assert first["tok_embeddings.weight"].shape[1] == tiny_config.dim // n_shards
    assert first["norm.weight"].shape == (tiny_config.dim,)  # replicated
    merged, _, _ = load_checkpoint(tmp_path)
    assert all(torch.equal(merged[k], sd[k]) for k in sd)
    assert torch.equal(load_logits(tmp_path, tokens), tiny_model(tokens))


def test_base_dtype_and_rope_freqs_ignored(tmp_path, tiny_config, sd, tokens):
    sd["rope.freqs"] = torch.zeros(8)  # Meta's files carry it; the model recomputes RoPE
    save_meta({k: v.bfloat16() for k, v in sd.items()}, tiny_config, tmp_path)
    model = build_model(checkpoint=tmp_path, plan=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model16 = build_model(checkpoint=tmp_path, plan=torch.float16)
    assert model16.output.weight.dtype == torch.float16


# ----- bad checkpoints -----

def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="Checkpoint not found: .*Accepted layouts"):
        build_model(checkpoint=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no LLaMA weights"):
        build_model(checkpoint=tmp_path)


def test_missing_key_names_file_and_tensor(tmp_path, tiny_config, sd):
    del sd["layers.1.feed_forward.w2.weight"]
    save_meta(sd, tiny_config, tmp_path)
    with pytest.raises(ValueError, match=r"consolidated.00.pth: missing tensor 'layers.1.feed_forward.w2.weight'"):
        build_model(checkpoint=tmp_path)


def test_unknown_key(tmp_path, tiny_config, sd):
    sd["layers.0.attention.wqq.weight"] = torch.zeros(2, 2)
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated.00.pth: unknown tensor 'layers.0.attention.wqq.weight'"):
        build_model(tiny_config, checkpoint=tmp_path)


def test_shape_mismatch_names_both_shapes(tmp_path, tiny_config, sd):
    from llama_lora.config import LlamaConfig

    save_meta(sd, tiny_config, tmp_path)
    other = LlamaConfig.from_name("tiny", hidden_dim=192)
    with pytest.raises(ValueError, match=r"consolidated.00.pth: tensor 'layers.0.feed_forward.w1.weight' has shape "
                                         r"\(176, 64\), .* expects \(192, 64\)"):
        build_model(other, checkpoint=tmp_path)


def test_hf_missing_shard(tmp_path, tiny_config, sd):
    save_hf(sd, tiny_config, tmp_path, max_shard_bytes=100_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing: {victim.name}"):
        build_model(checkpoint=tmp_path)


def test_meta_shard_gap(tmp_path, tiny_config, sd):
    save_meta(sd, tiny_config, tmp_path, n_shards=2)
    (tmp_path / "consolidated.01.pth").rename(tmp_path / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match="without gaps"):
        build_model(checkpoint=tmp_path)


def test_truncated_files(tmp_path, tiny_config, sd):
    save_meta(sd, tiny_config, tmp_path / "meta")
    f = tmp_path / "meta" / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ValueError, match="consolidated.00.pth: not a readable"):
        build_model(checkpoint=tmp_path / "meta")
    save_llama2c(sd, tiny_config, tmp_path / "m.bin")
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "m.bin").write_bytes(data[:-400])
    with pytest.raises(ValueError, match="truncated"):
        build_model(checkpoint=tmp_path / "m.bin")
    save_hf(sd, tiny_config, tmp_path / "hf")
    st = tmp_path / "hf" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:3000])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors"):
        build_model(checkpoint=tmp_path / "hf")


class Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    torch.save({"tok_embeddings.weight": Exploit()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match="weights-only"):
        build_model(checkpoint=tmp_path)
    assert "pickled code ran" not in capsys.readouterr().out


def test_hf_without_config(tmp_path, tiny_config, sd):
    save_hf(sd, tiny_config, tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        build_model(checkpoint=tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(ValueError, match="not a LLaMA config.json"):
        build_model(checkpoint=tmp_path)


def test_full_hf_download_with_both_formats_sharded_loads(tmp_path, tiny_model, tiny_config, sd, tokens):
    """meta-llama/Llama-2-7b-hf ships sharded safetensors and sharded .bin side by side, each with its own index.
    The safetensors are taken, only their index is consulted, and the logits are those of the weights written."""
    save_hf(sd, tiny_config, tmp_path, max_shard_bytes=100_000)
    save_hf(sd, tiny_config, tmp_path, max_shard_bytes=100_000, safetensors=False)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert (tmp_path / "pytorch_model.bin.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and len(list(tmp_path.glob("pytorch_model-*.bin"))) > 1
    _, sources, _ = load_checkpoint(tmp_path)
    assert all(s.endswith(".safetensors") for s in sources.values())
    assert torch.equal(load_logits(tmp_path, tokens), tiny_model(tokens))
    # A .bin shard missing beside complete safetensors does not matter; a missing safetensors shard does.
    sorted(tmp_path.glob("pytorch_model-*.bin"))[-1].unlink()
    assert torch.equal(load_logits(tmp_path, tokens), tiny_model(tokens))
    sorted(tmp_path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json names shard"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("layout", ["meta-1", "meta-4", "hf", "hf-bin", "llama2c"])
def test_rows_read_a_ranks_shard_without_the_rest(tmp_path, tiny_config, sd, layout):
    """What a rank of an FSDP2 model reads (rows start..stop of each tensor, through Meta's shard concatenation and
    HF's q/k permutation) equals the same rows of the fully loaded tensor, for 2, 3, 4 and 8 ranks."""
    if layout.startswith("meta"):
        save_meta(sd, tiny_config, tmp_path, n_shards=int(layout[-1]))
    elif layout.startswith("hf"):
        save_hf(sd, tiny_config, tmp_path, max_shard_bytes=100_000, safetensors=layout == "hf")
    else:
        save_llama2c(sd, tiny_config, tmp_path / "m.bin")
    path = tmp_path / "m.bin" if layout == "llama2c" else tmp_path
    for world in (2, 3, 4, 8):
        lazy, _, _ = load_checkpoint(path)
        for key, full in sd.items():
            chunk = -(-full.shape[0] // world)
            got = [lazy.rows(key, min(r * chunk, len(full)), min((r + 1) * chunk, len(full))) for r in range(world)]
            assert torch.equal(torch.cat(got), full), (key, world)
            assert lazy.shape(key) == full.shape


def test_llama2c_shared_classifier_is_one_tied_parameter_written_once(tmp_path, tiny_config, sd, tokens):
    """llama2.c's stories models share the classifier with the embedding (positive vocab in the header): one
    parameter after loading, counted once, and written once by every export."""
    from safetensors import safe_open

    from llama_lora.lora import count_params

    sd["output.weight"] = sd["tok_embeddings.weight"]
    save_llama2c(sd, tiny_config, tmp_path / "tied.bin")
    model = build_model(checkpoint=tmp_path / "tied.bin", plan=torch.float32)
    assert model.output.weight is model.tok_embeddings.weight and model.config.tie_embeddings
    assert count_params(model)[1] == model.config.n_params == tiny_config.n_params - 512 * 64
    expected = model(tokens)
    save_hf(model.state_dict(), model.config, tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    save_meta(model.state_dict(), model.config, tmp_path / "meta")
    save_llama2c(model.state_dict(), model.config, tmp_path / "again.bin")
    assert (tmp_path / "again.bin").stat().st_size == (tmp_path / "tied.bin").stat().st_size
    for path in (tmp_path / "hf", tmp_path / "meta", tmp_path / "again.bin"):
        back = build_model(checkpoint=path, plan=torch.float32)
        assert back.output.weight is back.tok_embeddings.weight, path
        assert torch.equal(back(tokens), expected), path


def _resident_bytes(path) -> int:
    """Bytes of ``path``'s mappings resident in this process (Linux's /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_a_released_tensor_leaves_memory_and_reads_the_same_again(tmp_path, tiny_config, layout):
    """release(key): the pages of a read tensor leave RSS (streaming a 7B base through the GGUF writer stays near
    one layer), and nothing is lost: a clean page is read again from the file. HF's q rows, permuted in place on
    first read, are the exception the streaming writers never meet: they read each tensor once."""
    sd = {"tok_embeddings.weight": torch.randn(8192, 1024)}  # 32 MiB
    save_meta(sd, tiny_config, tmp_path / "meta") if layout == "meta" else save_hf(sd, tiny_config, tmp_path / "hf")
    lazy, _, _ = load_checkpoint(tmp_path / layout)
    file = next((tmp_path / layout).glob("*.pth" if layout == "meta" else "*.safetensors"))
    before = lazy["tok_embeddings.weight"].sum()  # every page read
    assert _resident_bytes(file) >= 30 * 2**20
    lazy.release("tok_embeddings.weight")
    assert _resident_bytes(file) < 2**20
    assert torch.equal(lazy["tok_embeddings.weight"].sum(), before)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_a_base_cast_to_the_plans_dtype_leaves_none_of_the_files_pages_behind(tmp_path, tiny_config, monkeypatch):
    """A base stored in another dtype (an fp32 checkpoint, an f16 GGUF) read into a bf16 plan: each tensor's pages
    leave RSS once its cast copy is made, so the peak is the model plus one tensor, not the model plus the file (a 7B
    f16 GGUF read as bf16 peaked at 20.9 GiB before, the file's 12.6 GiB of pages kept). Measured when every tensor
    is ready, before the model takes them. Failed before the release (the whole 32 MiB embedding resident)."""
    from llama_lora.model import Llama

    config = dataclasses.replace(tiny_config, vocab_size=8192, dim=1024, n_heads=8, n_kv_heads=8, n_layers=1)
    sd = build_model(config, plan=torch.float32, seed=0).state_dict()
    save_meta(sd, config, tmp_path / "meta")
    file, resident = tmp_path / "meta" / "consolidated.00.pth", []
    original = Llama.load_state_dict

    def load_state_dict(self, *args, **kwargs):
        resident.append(_resident_bytes(file))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Llama, "load_state_dict", load_state_dict)
    model = build_model(checkpoint=tmp_path / "meta", plan=torch.bfloat16)
    assert resident[0] < 2**20, resident
    assert torch.equal(model.tok_embeddings.weight, sd["tok_embeddings.weight"].bfloat16())
    kept = build_model(checkpoint=tmp_path / "meta", plan=torch.float32)  # placed as they are: the file is the model
    assert torch.equal(kept.tok_embeddings.weight, sd["tok_embeddings.weight"])


@pytest.mark.parametrize("window", [None, 2048])
def test_a_mistral_folder_written_by_transformers_computes_its_logits(tmp_path, window):
    """Mistral (v0.3: no window; v0.1: a sliding window, here 2,048, longer than the 1,500 positions compared) from a
    tiny random MistralForCausalLM written by transformers' save_pretrained, with queries and keys scaled so attention
    is far from uniform: our logits equal transformers' within 1e-5 in fp32, and theta 1e6 matters (LLaMA-2's 10,000
    gives other logits)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                     sliding_window=window, rms_norm_eps=1e-5)
    hf = transformers.MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    hf.save_pretrained(tmp_path)
    ours = build_model(checkpoint=tmp_path, plan=torch.float32).eval()
    assert ours.config.rope_theta == 1e6 and ours.config.sliding_window == window
    assert ours.config.max_seq_len == (window or 4096)
    tokens = torch.randint(0, 512, (1, 1500), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, mine = hf(input_ids=tokens).logits, ours(tokens)
    scale = theirs.abs().max()
    assert (mine - theirs).abs().max() <= 1e-5 * scale, float((mine - theirs).abs().max() / scale)
    other = build_model(dataclasses.replace(ours.config, rope_theta=10000.0), plan=torch.float32).eval()
    other.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (other(tokens) - theirs).abs().max() > 1e-3 * scale
