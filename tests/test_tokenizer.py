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
    with pytest.raises(ValueError, match="not a SentencePiece model"):
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
