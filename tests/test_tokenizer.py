import pytest

from llama_lora.tokenizer import Tokenizer, train_tokenizer

TEXTS = [f"Sort the words: {a} {b} {c}. Answer {i} + {i * 3} = {i * 4}" for i, (a, b, c) in enumerate(
    [("apple", "pear", "fig"), ("zebra", "cat", "dog"), ("red", "blue", "green")] * 40)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return Tokenizer(train_tokenizer(TEXTS, vocab_size=300, path=tmp_path_factory.mktemp("tok") / "tok.model"))


def test_trained_tokenizer_has_llama_special_ids(trained):
    assert (trained.vocab_size, trained.bos_id, trained.eos_id, trained.pad_id) == (300, 1, 2, 0)
    ids = trained.encode("Sort the words: fig apple", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert trained.decode(ids) == "Sort the words: fig apple"
    assert trained.encode("</s>") != [2]  # the string is text, not the EOS id
    assert trained.decode(trained.encode("ünïcode ✓")) == "ünïcode ✓"  # byte fallback
    assert [trained.id_to_piece(i) for i in trained.encode("123")][-3:] == ["1", "2", "3"]  # split digits


def test_missing_or_bad_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="Tokenizer not found"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="neither a SentencePiece model .* nor a tiktoken BPE file"):
        Tokenizer(tmp_path / "bad.model")


def test_real_llama2_tokenizer(assets):
    tok = Tokenizer(assets / "tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, 0)
    assert tok.encode("Hello world", bos=True) == [1, 15043, 3186]
    assert tok.encode("</s>") != [2]


UNICODE_TEXTS = ["Bonjour 🚀 我爱你 café ❤️ fin", "naïve façade — Ünïcödé, 東京タワー, 👩‍👩‍👧‍👦 and 😀😀",
                 "plain ASCII, no surprises"]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_streamed_text_equals_the_decoded_text_for_any_unicode(assets, text):
    """Streaming one token at a time (generate.py's output) holds back a character until its last byte-fallback
    piece arrives: no U+FFFD ever printed, and the pieces join to exactly the decoded text (real LLaMA-2 tokenizer:
    emoji, CJK and accented text take several byte pieces)."""
    tok = Tokenizer(assets / "tokenizer.model")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    if text != UNICODE_TEXTS[-1]:
        assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)  # byte fallback is exercised
    pieces = list(tok.stream(iter(ids)))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_an_invalid_byte_sequence_streams_as_decode_gives_it(demo_tok):
    """A reply that ends inside a character (max_new_tokens reached) still prints what decode prints."""
    tok = demo_tok
    byte = tok.sp.PieceToId("<0xE6>")  # the first byte of a 3-byte character, alone
    ids = tok.encode("abc") + [byte]
    assert "".join(tok.stream(ids)) == tok.decode(ids)


# ----- Llama 3's tiktoken BPE file -----

# Meta's split pattern, written out again here (llama-models, llama3/tokenizer.py), for the independent reference.
META_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_TEXTS = ["Hello world! It's 2026, isn't it?", "  leading spaces\tand tabs\n\nnewlines", "Bonjour café 🚀 我爱你 ❤️",
         "digits 1234567 and <|eot_id|> as plain text", "", "x" * 50 + " " * 30 + "y"]


def write_bpe_file(path, text: str, merges: int) -> dict[bytes, int]:
    """A small byte-level BPE in tiktoken's file format (base64 token, space, rank; the 256 bytes first), trained on
    ``text`` pre-split by Meta's pattern: the format of Llama 3's original/tokenizer.model, 128,000 ranks smaller."""
    import base64
    from collections import Counter

    import regex

    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in w.encode()] for w in regex.findall(META_PATTERN, text)]
    for _ in range(merges):
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


@pytest.fixture
def bpe(tmp_path):
    pytest.importorskip("tiktoken", reason="Llama 3's tokenizer needs tiktoken (pip install -e '.[llama3]')")
    corpus = " ".join(BPE_TEXTS * 20) + " the quick brown fox jumps over the lazy dog " * 40
    path = tmp_path / "tokenizer.model"  # Meta's own name: the content, not the name, says what it is
    return path, write_bpe_file(path, corpus, merges=120)


def test_a_tiktoken_file_is_read_as_llama3s_tokenizer_against_tiktoken_itself(bpe):
    import tiktoken
    import tiktoken.load

    from llama_lora.tokenizer import TiktokenTokenizer

    path, ranks = bpe
    tok = Tokenizer(path)
    assert isinstance(tok, TiktokenTokenizer) and len(ranks) == 376
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
             "<|eot_id|>", "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]
    special = {name: len(ranks) + i for i, name in enumerate(names)}
    reference = tiktoken.Encoding("ref", pat_str=META_PATTERN, mergeable_ranks=tiktoken.load.load_tiktoken_bpe(
        str(path)), special_tokens=special)
    assert tok.vocab_size == len(ranks) + 256 == reference.n_vocab
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (len(ranks), len(ranks) + 1, len(ranks) + 4)
    assert tok.special == {"bos": len(ranks), "eos": len(ranks) + 1, "eot": len(ranks) + 9, "eom": len(ranks) + 8,
                           "start_header": len(ranks) + 6, "end_header": len(ranks) + 7}
    for text in BPE_TEXTS:
        ids = reference.encode(text, disallowed_special=())
        assert tok.encode(text) == ids and tok.encode(text, bos=True, eos=True) == [tok.bos_id, *ids, tok.eos_id]
        assert tok.decode(ids) == text == "".join(tok.stream(ids))
    assert len(tok.encode("the quick brown fox")) < len(b"the quick brown fox")  # the merges apply
    assert special["<|eot_id|>"] not in tok.encode(BPE_TEXTS[3])  # special strings in data stay text
    assert tok.decode([special["<|eot_id|>"]]) == "<|eot_id|>"


def test_a_sentencepiece_model_under_any_name_is_sentencepiece(tmp_path, assets):
    import shutil

    from llama_lora.tokenizer import SentencePieceTokenizer

    shutil.copyfile(assets / "tokenizer.model", tmp_path / "tokenizer.tiktoken")
    assert isinstance(Tokenizer(tmp_path / "tokenizer.tiktoken"), SentencePieceTokenizer)


def test_without_tiktoken_one_line_says_what_to_install(bpe, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(ValueError, match=r'pip install -e "\.\[llama3\]"'):
        Tokenizer(bpe[0])


def llama2_style_tokenizer_json(sp_tok, folder):
    """LLaMA-2's tokenizer as its HF repository ships it (tokenizer.json), built here independently of the project:
    the SentencePiece pieces as a BPE vocabulary with byte fallback, the merges derived from the pieces' scores (as
    transformers' SentencePieceExtractor does), "▁" prepended and spaces replaced by it, and a tokenizer_config.json
    with BOS added."""
    import json

    tokenizers = pytest.importorskip("tokenizers", reason="pip install -e '.[tokenizers]'")
    sp = sp_tok.sp
    vocab = {sp.IdToPiece(i): i for i in range(sp.vocab_size())}
    merges = []
    for piece, i in sorted(vocab.items(), key=lambda kv: -sp.GetScore(kv[1])):
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i):
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True,
                                                    byte_fallback=True))
    n = tokenizers.normalizers
    tk.normalizer = n.Sequence([n.Prepend("▁"), n.Replace(" ", "▁")])
    d = tokenizers.decoders
    tk.decoder = d.Sequence([d.Replace("▁", " "), d.ByteFallback(), d.Fuse(), d.Strip(" ", 1, 0)])
    tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "add_bos_token": True}))
    return folder / "tokenizer.json"


def test_a_sentencepiece_style_tokenizer_json_gives_the_sentencepiece_ids(tmp_path, demo_tok):
    """LLaMA-2's and Mistral's HF repositories ship their SentencePiece BPE as a tokenizer.json (byte fallback, "▁"
    for spaces): read with HF's tokenizers, it gives the ids and text of the tokenizer.model (the real LLaMA-2 one
    where the assets are, else the demo's), BOS added as tokenizer_config.json says."""
    import os
    from pathlib import Path

    from llama_lora.tokenizer import BPETokenizer

    sources = [demo_tok]
    if os.environ.get("LLAMA_LORA_TEST_ASSETS"):
        sources.append(Tokenizer(Path(os.environ["LLAMA_LORA_TEST_ASSETS"]) / "tokenizer.model"))
    for k, sp_tok in enumerate(sources):
        (tmp_path / str(k)).mkdir()
        tok = Tokenizer(llama2_style_tokenizer_json(sp_tok, tmp_path / str(k)))
        assert isinstance(tok, BPETokenizer) and (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
        assert tok.vocab_size == sp_tok.vocab_size and tok.gguf_pre is None
        for text in TEXTS[:5] + UNICODE_TEXTS + [" leading", "two  spaces\n\nand\ttabs", "</s> typed", "12345"]:
            assert tok.encode(text, bos=True) == sp_tok.encode(text, bos=True), text
            assert tok.decode(tok.encode(text)) == sp_tok.decode(sp_tok.encode(text)), text


def test_an_embedding_padded_beyond_its_tokenizer_fits_and_another_models_does_not(demo_tok):
    """Qwen's embedding has 0.2% more rows than its tokenizer has tokens: up to 1% more is the model's own
    tokenizer; more tokens than rows, or a smaller tokenizer further off (LLaMA-2's 32,000 for Mistral's 32,768:
    2.3%), is another model's, refused in one line."""
    assert demo_tok.vocab_size == 1024
    demo_tok.check_fits(1024)
    demo_tok.check_fits(1034)
    for rows in (1023, 1035, 32000):
        with pytest.raises(ValueError, match=f"has 1024 pieces, the model {rows}: give the tokenizer"):
            demo_tok.check_fits(rows)
