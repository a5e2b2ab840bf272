"""Tokenizers, chosen by the file's content: LLaMA-2's SentencePiece model, or Llama 3's tiktoken BPE file (lines
of base64 token and rank, read with tiktoken, the library Meta's reference uses; an optional extra). Each gives
LLaMA's special ids; and tokenizer training for the offline demo."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from .weights.gguf import field, is_gguf_file, read_gguf

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"  # what a byte sequence that is not (yet) valid UTF-8 decodes to


class Tokenizer:
    """``Tokenizer(path)``: the SentencePiece or the tiktoken tokenizer, as the file's content says.

    Every tokenizer has ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id`` and ``special`` (name -> id of the
    special tokens a chat template writes); ``encode`` never turns text into special tokens (a record that contains
    "<|eot_id|>" or "</s>" is text), so they are added by id only.
    """

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    special: dict[str, int]
    chat_template: str | None = None  # the model's own Jinja template, where the tokenizer's files carry one
    add_bos: bool = True  # whether a sequence starts with BOS (LLaMA's do; some BPE models' do not)
    gguf_pre: str | None = None  # a byte-level BPE's pre-tokenizer by llama.cpp's name (GGUF_PRE_TOKENIZERS)

    def __new__(cls, path: str | Path | None = None):
        if cls is Tokenizer and path is not None:
            cls = tokenizer_class(_existing(path))
        return super().__new__(cls)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def check_fits(self, vocab_size: int) -> None:
        """Refuse, in one line, a tokenizer that is not the model's: more pieces than the embedding has rows, or
        fewer by more than 1%. A model's embedding may be padded beyond its tokenizer (Qwen's 151,936 rows for
        151,665 tokens, 0.2%); another model's is further off (LLaMA-2's 32,000 for Mistral's 32,768: 2.3%)."""
        if not self.vocab_size <= vocab_size <= self.vocab_size * 1.01:
            raise ValueError(f"The tokenizer {self.path} has {self.vocab_size} pieces, the model {vocab_size}: give "
                             "the tokenizer the model was trained with (--tokenizer_path)")

    def save_to(self, folder: Path) -> Path:
        """The tokenizer's file beside a model's weights, as the model ships it (SentencePiece and tiktoken:
        ``tokenizer.model``)."""
        out = Path(folder) / "tokenizer.model"
        shutil.copyfile(self.path, out)
        return out

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        """The text of ``ids`` piece by piece as they come, for printing while generating: joined, the pieces equal
        ``decode`` of all the ids. The whole reply is decoded each time (SentencePiece's spaces depend on the
        neighbours), and text ending in an unfinished UTF-8 character (byte pieces still to come decode to U+FFFD)
        is held back until the character is complete."""
        out: list[int] = []
        shown = ""
        for i in ids:
            out.append(int(i))
            text = self.decode(out)
            ready = text.rstrip(_REPLACEMENT)
            if ready.startswith(shown) and len(ready) > len(shown):
                yield ready[len(shown):]
                shown = ready
        text = self.decode(out)
        if text != shown:  # the end: what is left (an invalid byte sequence stays U+FFFD, as decode gives it)
            yield text[len(shown):] if text.startswith(shown) else text


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Tokenizer not found: {path}. LLaMA ships tokenizer.model beside its weights (Llama 3: in original/); "
            "the demo trains its own (see configs/demo.yaml)"
        )
    return path


CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' file for a chat template beside a tokenizer


def read_chat_template(path: Path) -> str | None:
    """The chat template a file carries: a GGUF's tokenizer.chat_template, a tokenizer_config.json's chat_template
    (of named ones, transformers' "default"), or a chat_template.jinja; None where it holds none."""
    if is_gguf_file(path):
        text = field(read_gguf(path), "tokenizer.chat_template")
    elif path.suffix == ".json":
        try:
            text = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None
        if isinstance(text, list):
            text = next((t.get("template") for t in text if t.get("name") == "default"), None)
    else:
        text = path.read_text(encoding="utf-8")
    return text if isinstance(text, str) and text.strip() else None


def tokenizer_class(path: Path) -> type[Tokenizer]:
    """The tokenizer a file holds, by its content: a GGUF's or a tokenizer.json's BPE, Llama 3's tiktoken file, or
    a SentencePiece model."""
    with open(path, "rb") as f:
        head = f.read(4)
    if is_gguf_file(path):  # SentencePiece's pieces and scores ("llama"), or a byte-level BPE
        return SentencePieceTokenizer if field(read_gguf(path), "tokenizer.ggml.model") == "llama" else BPETokenizer
    if head[:1] == b"{":
        return BPETokenizer
    return TiktokenTokenizer if is_tiktoken_file(path) else SentencePieceTokenizer


def is_tiktoken_file(path: Path) -> bool:
    """A tiktoken BPE file: its first line is a base64 token, a space and a rank (a SentencePiece model is a binary
    protobuf)."""
    with open(path, "rb") as f:
        first = f.readline(4096).rstrip(b"\r\n")
    token, _, rank = first.partition(b" ")
    try:
        base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return False
    return bool(token) and rank.isdigit()


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str | Path) -> None:
        path = _existing(path)
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            if is_gguf_file(path):
                self.sp.LoadFromSerializedProto(gguf_sentencepiece(read_gguf(path), path))
            else:
                self.sp.Load(str(path))
        except (OSError, RuntimeError):
            raise ValueError(f"{path} is neither a SentencePiece model (LLaMA-2's) nor a tiktoken BPE file (Llama "
                             "3's original/tokenizer.model)") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # LLaMA defines no pad token (pad_id() == -1). Padding uses <unk> (0) instead when there is no pad id:
        # padded positions sit after every real token (right padding, causal attention) and carry label -100,
        # so their id never reaches the loss or any real position.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else max(self.sp.unk_id(), 0)
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: the tokenizer has no BOS/EOS pieces; train it with bos_id=1, eos_id=2")
        self.special = {"bos": self.bos_id, "eos": self.eos_id}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``; BOS/EOS are added as ids (SentencePiece never maps the string '</s>' to EOS)."""
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def save_to(self, folder: Path) -> Path:
        """``tokenizer.model`` and, as LLaMA-2's HF repositories ship it, a ``tokenizer_config.json`` that makes
        transformers' tokenizer add BOS as this one does (without it, transformers 5 adds none)."""
        out = super().save_to(folder)
        piece = self.sp.IdToPiece
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": piece(self.bos_id), "eos_token": piece(self.eos_id),
            "unk_token": piece(max(self.sp.unk_id(), 0)), "legacy": False}, indent=2))
        return out


def gguf_sentencepiece(reader, path: Path) -> bytes:
    """A GGUF's "llama" tokenizer as the SentencePiece model it was written from: its pieces, scores and types (GGUF's
    token types are SentencePiece's numbers), BPE with byte fallback, whitespace escaped to U+2581 and, unless the
    file says otherwise (tokenizer.ggml.add_space_prefix), a space put before the text, as llama.cpp tokenizes it."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, scores = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    if tokens is None or scores is None or types is None or not len(tokens) == len(scores) == len(types):
        raise ValueError(f"{path}: the GGUF's SentencePiece tokenizer lacks its tokens, scores or types")
    model = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        model.pieces.add(piece=piece, score=float(score), type=int(kind))
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.BPE, len(tokens), True
    spec.unk_id = field(reader, "tokenizer.ggml.unknown_token_id", 0)
    spec.bos_id = field(reader, "tokenizer.ggml.bos_token_id", 1)
    spec.eos_id = field(reader, "tokenizer.ggml.eos_token_id", 2)
    spec.pad_id = -1
    spec.unk_piece, spec.bos_piece, spec.eos_piece = (tokens[i] for i in (spec.unk_id, spec.bos_id, spec.eos_id))
    norm = model.normalizer_spec
    norm.name, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", False, True
    norm.add_dummy_prefix = bool(field(reader, "tokenizer.ggml.add_space_prefix", True))
    return model.SerializeToString()


# Meta's Llama 3 tokenizer (llama-models, llama3/tokenizer.py): its split pattern, and 256 special tokens after the
# ranks, the named ones first (the 3.1/3.2 text models' list), the rest reserved.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_SPECIAL))]


def tiktoken_package():
    """tiktoken, imported here only, or one line that says how to get it."""
    try:
        import tiktoken
    except ImportError:
        raise ValueError('Llama 3\'s tokenizer needs tiktoken: pip install -e ".[llama3]", or pip install tiktoken'
                         ) from None
    return tiktoken


def read_bpe_ranks(path: Path) -> dict[bytes, int]:
    """The ranks of a tiktoken BPE file, read here (tiktoken's own loader caches files by their path in a temporary
    folder, so a tokenizer replaced at the same path would be read stale)."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line:
            continue
        token, _, rank = line.partition(b" ")
        try:
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (binascii.Error, ValueError):
            raise ValueError(f"{path}: line {n} is not a base64 token and a rank; is it Llama 3's "
                             "original/tokenizer.model?") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, path: str | Path) -> None:
        path = _existing(path)
        self.path = path
        tiktoken = tiktoken_package()
        ranks = read_bpe_ranks(path)
        self.ranks = ranks
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL)}
        self.model = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.vocab_size = len(ranks) + len(LLAMA3_SPECIAL)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.special = {"bos": self.bos_id, "eos": self.eos_id, "eot": self.special_tokens["<|eot_id|>"],
                        "eom": self.special_tokens["<|eom_id|>"],
                        "start_header": self.special_tokens["<|start_header_id|>"],
                        "end_header": self.special_tokens["<|end_header_id|>"]}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, special-token strings in it encoded as the text they are (Meta's default)."""
        ids = self.model.encode(text, allowed_special=set(), disallowed_special=())
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        return self.model.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.model.decode_single_token_bytes(int(i)).decode("utf-8", errors="replace")

    gguf_pre = "llama-bpe"  # Meta's split pattern

    def vocabulary(self) -> tuple[list[str], list[tuple[str, str]], list[bool]]:
        """As ``BPETokenizer.vocabulary``: the ranked tokens then the special tokens, spelled in GPT-2's byte
        alphabet (the form tokenizer.json and a GGUF's gpt2 tokenizer hold), the merges, which are special."""
        chars = byte_alphabet()

        def spell(token: bytes) -> str:
            return "".join(chars[b] for b in token)

        ranked = sorted(self.ranks, key=self.ranks.__getitem__)
        specials = sorted(self.special_tokens, key=self.special_tokens.__getitem__)
        return ([spell(t) for t in ranked] + specials, [(spell(a), spell(b)) for a, b in self.merges()],
                [False] * len(ranked) + [True] * len(specials))

    def merges(self) -> list[tuple[bytes, bytes]]:
        """The BPE's merges in rank order, as a merge-list tokenizer (HF's, llama.cpp's) needs them: each token of
        two or more bytes is the pair that BPE, with the ranks below its own, leaves its bytes in."""
        out, never = [], len(self.ranks)
        for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            if len(token) < 2:
                continue
            parts = [token[i:i + 1] for i in range(len(token))]
            while len(parts) > 2:
                pair_ranks = [self.ranks.get(a + b, never) for a, b in zip(parts, parts[1:])]
                best = pair_ranks.index(min(pair_ranks))
                if pair_ranks[best] >= rank:
                    break
                parts[best:best + 2] = [parts[best] + parts[best + 1]]
            if len(parts) == 2:
                out.append((parts[0], parts[1]))
        return out


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet, which byte-level BPE vocabularies spell tokens in: each printable byte is its own
    character, the others (spaces and controls among them) the characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    chars, extra = [], 0
    for b in range(256):
        chars.append(chr(b) if b in printable else chr(256 + extra))
        extra += b not in printable
    return chars


def tokenizers_package():
    """HF's tokenizers (the reference implementation of tokenizer.json), imported here only, or one line that says
    how to get it."""
    try:
        import tokenizers
    except ImportError:
        raise ValueError('tokenizer.json and a GGUF\'s own tokenizer need HF\'s tokenizers: pip install -e '
                         '".[tokenizers]", or pip install tokenizers') from None
    return tokenizers


# llama.cpp's pre-tokenizers (tokenizer.ggml.pre) read here, as tokenizers' pre-tokenizers: the regex llama.cpp
# splits with (llama-vocab.cpp), then GPT-2's byte alphabet.
GGUF_PRE_TOKENIZERS = ("llama-bpe", "qwen2", "smollm")


def _pre_tokenizer(tokenizers, pre: str, source: Path):
    p = tokenizers.pre_tokenizers
    if pre == "llama-bpe":  # Llama 3's split pattern
        return p.Sequence([p.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated"),
                           p.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "qwen2":  # Llama 3's pattern with each digit alone (Qwen2, 2.5 and 3)
        return p.Sequence([p.Split(tokenizers.Regex(LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")),
                                   behavior="isolated"), p.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "smollm":  # each digit alone, then GPT-2's pattern (llama.cpp: \p{N}, then GPT-2's)
        return p.Sequence([p.Digits(individual_digits=True), p.ByteLevel(add_prefix_space=False, use_regex=True)])
    raise ValueError(f"{source}: the GGUF's pre-tokenizer {pre!r} is not read yet ({', '.join(GGUF_PRE_TOKENIZERS)} "
                     "are); give the model's tokenizer.json with --tokenizer_path")


class BPETokenizer(Tokenizer):
    """A byte-level BPE as HF's tokenizers runs it: a ``tokenizer.json`` (its BOS/EOS and whether BOS is added from
    ``tokenizer_config.json`` beside it, the end of turn from ``generation_config.json``), or the vocabulary a GGUF
    carries (``tokenizer.ggml.model`` gpt2: its tokens, merges and pre-tokenizer, control tokens as special)."""

    kind = "bpe"

    def __init__(self, path: str | Path) -> None:
        path = _existing(path)
        self.path = path
        tokenizers = tokenizers_package()
        if is_gguf_file(path):
            reader = read_gguf(path)
            model = field(reader, "tokenizer.ggml.model")
            if model != "gpt2":
                raise ValueError(f"{path}: the GGUF's tokenizer is {model!r}; this version reads SentencePiece "
                                 "(llama) and byte-level BPE (gpt2) ones: give the model's tokenizer.model or "
                                 "tokenizer.json with --tokenizer_path")
            tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
            self.gguf_pre = field(reader, "tokenizer.ggml.pre", "default")
            pre_tokenizer = _pre_tokenizer(tokenizers, self.gguf_pre, path)
            merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges", [])]
            self.tk = _library_call(path, lambda: tokenizers.Tokenizer(
                tokenizers.models.BPE({t: i for i, t in enumerate(tokens or [])}, merges)))
            self.tk.pre_tokenizer = pre_tokenizer
            self.tk.decoder = tokenizers.decoders.ByteLevel()
            control = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                       for i, kind in enumerate(types) if kind in (3, 4)]  # CONTROL, USER_DEFINED
            self.tk.add_special_tokens(control)
            self.bos_id = field(reader, "tokenizer.ggml.bos_token_id")
            self.eos_id = field(reader, "tokenizer.ggml.eos_token_id")
            self.add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", True))
            eot = field(reader, "tokenizer.ggml.eot_token_id")
            pad = field(reader, "tokenizer.ggml.padding_token_id")
            self.chat_template = field(reader, "tokenizer.chat_template")
        else:
            self.tk = _library_call(path, lambda: tokenizers.Tokenizer.from_file(str(path)))
            kind = json.loads(self.tk.to_str())["model"]["type"]
            if kind != "BPE":
                raise ValueError(f"{path}: a {kind} tokenizer.json; this version reads BPE ones (Llama's, Qwen's, "
                                 "SmolLM's, Mistral's)")
            config = _json_beside(path, "tokenizer_config.json")
            self.bos_id, self.eos_id = (self._token_id(config.get(k), path, k) for k in ("bos_token", "eos_token"))
            self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_id is not None
            generation = _json_beside(path, "generation_config.json").get("eos_token_id")
            eot = generation[-1] if isinstance(generation, list) else generation
            pad = self._token_id(config.get("pad_token"), path, "pad_token")
            self.gguf_pre = _gguf_pre_name(tokenizers, self.tk)
            self.chat_template = next((t for f in (path.with_name(CHAT_TEMPLATE_FILE),
                                                   path.with_name("tokenizer_config.json"))
                                       if f.is_file() and (t := read_chat_template(f)) is not None), None)
        self.tk.encode_special_tokens = True  # text is text: a "<|im_end|>" typed in a record stays text
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.pad_id = pad if pad is not None else self.eos_id
        self.special = {"bos": self.bos_id, "eos": self.eos_id}
        if eot is not None and eot != self.eos_id:
            self.special["eot"] = eot
        # Llama 3's header tokens, where the vocabulary is Llama 3's (its tokenizer.json): the llama3 template's
        for name, token in (("start_header", "<|start_header_id|>"), ("end_header", "<|end_header_id|>"),
                            ("eot", "<|eot_id|>")):
            if self.special.get(name) is None and (i := self.tk.token_to_id(token)) is not None:
                self.special[name] = i

    def _token_id(self, token, path: Path, what: str) -> int | None:
        if isinstance(token, dict):  # {"content": ..., ...} as transformers writes an AddedToken
            token = token.get("content")
        if token is None:
            return None
        i = self.tk.token_to_id(token)
        if i is None:
            raise ValueError(f"{path}: {what} {token!r} of tokenizer_config.json is not in the vocabulary")
        return i

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token strings in it stay text); ``bos``: as the model starts a sequence
        (nothing where its tokenizer adds no BOS)."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * (bos and self.add_bos) + ids + [self.eos_id] * eos

    def encode_rendered(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of a chat template's output, its special tokens parsed as such."""
        self.tk.encode_special_tokens = False
        try:
            out = self.tk.encode(text, add_special_tokens=False)
        finally:
            self.tk.encode_special_tokens = True
        return out.ids, out.offsets

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.tk.id_to_token(int(i))

    def token_text(self, i: int | None) -> str | None:
        return None if i is None else self.tk.id_to_token(int(i))

    def save_to(self, folder: Path) -> Path:
        """``tokenizer.json``, with a ``tokenizer_config.json`` holding BOS, EOS, padding and whether BOS is added, and
        a ``generation_config.json`` with the end of turn where it is not EOS: as an HF folder ships them."""
        folder = Path(folder)
        self.tk.encode_special_tokens = False  # the library's default, as the file is read elsewhere
        try:
            self.tk.save(str(folder / "tokenizer.json"))
        finally:
            self.tk.encode_special_tokens = True
        config = {"bos_token": self.token_text(self.bos_id), "eos_token": self.token_text(self.eos_id),
                  "pad_token": self.token_text(self.pad_id), "add_bos_token": self.add_bos}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
        if self.special.get("eot", self.eos_id) != self.eos_id:
            (folder / "generation_config.json").write_text(json.dumps(
                {"eos_token_id": [self.eos_id, self.special["eot"]]}))
        return folder / "tokenizer.json"

    def token_id(self, text: str) -> int | None:
        """The id of a token spelled ``text`` (a special token's), or None where the vocabulary has none."""
        return self.tk.token_to_id(text)

    def vocabulary(self) -> tuple[list[str], list[tuple[str, str]], list[bool]]:
        """Every token as the vocabulary spells it (GPT-2's byte alphabet), in id order; the merges in rank order;
        and which tokens are special (control tokens to llama.cpp). What a GGUF's gpt2 tokenizer holds."""
        model = json.loads(self.tk.to_str())["model"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        tokens = [self.tk.id_to_token(i) for i in range(self.vocab_size)]
        special = {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        return tokens, merges, [i in special for i in range(self.vocab_size)]


def _library_call(path: Path, make):
    """``make()``, a call into HF's tokenizers on a file's contents; what the library says of a file it cannot read
    (an error, or a Rust panic, which Python sees as a BaseException) becomes one line."""
    try:
        return make()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable tokenizer ({first}); is the file complete?") from None


def _gguf_pre_name(tokenizers, tk) -> str | None:
    """The llama.cpp pre-tokenizer (of ``GGUF_PRE_TOKENIZERS``) a tokenizer.json's pre-tokenizer splits text as, by
    its splits of a probe text (None: none of them)."""
    if tk.pre_tokenizer is None:
        return None
    probe = "Hello, it's 2026! 12345 café  我爱你\n\n\t spaces   end's ÜBER x=3;🚀"
    theirs = tk.pre_tokenizer.pre_tokenize_str(probe)
    for name in GGUF_PRE_TOKENIZERS:
        if _pre_tokenizer(tokenizers, name, Path()).pre_tokenize_str(probe) == theirs:
            return name
    return None


def _json_beside(path: Path, name: str) -> dict:
    other = path.with_name(name)
    if not other.is_file():
        return {}
    try:
        return json.loads(other.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{other}: invalid JSON at line {e.lineno}: {e.msg}") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path) -> Path:
    """Train a LLaMA-style BPE SentencePiece model (unk 0, bos 1, eos 2, byte fallback) and write it atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        prefix = os.path.join(tmp, "sp")
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(texts),
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,  # as LLaMA: one token per digit, which arithmetic tasks need
            # As LLaMA: no normalisation, whitespace kept (the Alpaca template's newlines must survive a round trip).
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        os.replace(prefix + ".model", path)
    log.info("Trained a %d-piece SentencePiece tokenizer: %s", vocab_size, path)
    return path
