"""Tokenizers, chosen by the file's content: LLaMA-2's SentencePiece model, or Llama 3's tiktoken BPE file (lines
of base64 token and rank, read with tiktoken, the library Meta's reference uses; an optional extra). Each gives
LLaMA's special ids; and tokenizer training for the offline demo."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
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

    def __new__(cls, path: str | Path | None = None):
        if cls is Tokenizer and path is not None:
            cls = tokenizer_class(_existing(path))
        return super().__new__(cls)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

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


def tokenizer_class(path: Path) -> type[Tokenizer]:
    """The tokenizer a file holds, by its content: a GGUF's or a tokenizer.json's BPE, Llama 3's tiktoken file, or
    a SentencePiece model."""
    with open(path, "rb") as f:
        head = f.read(4)
    if is_gguf_file(path) or head[:1] == b"{":
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
GGUF_PRE_TOKENIZERS = ("llama-bpe", "smollm")


def _pre_tokenizer(tokenizers, pre: str, source: Path):
    p = tokenizers.pre_tokenizers
    if pre == "llama-bpe":  # Llama 3's split pattern
        return p.Sequence([p.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated"),
                           p.ByteLevel(add_prefix_space=False, use_regex=False)])
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
                raise ValueError(f"{path}: the GGUF's tokenizer is {model!r}; this version reads its byte-level BPE "
                                 "(gpt2) alone: give the model's tokenizer.model or tokenizer.json with "
                                 "--tokenizer_path")
            tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
            merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
            self.tk = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges))
            self.tk.pre_tokenizer = _pre_tokenizer(tokenizers, field(reader, "tokenizer.ggml.pre", "default"), path)
            self.tk.decoder = tokenizers.decoders.ByteLevel()
            control = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                       for i, kind in enumerate(types) if kind in (3, 4)]  # CONTROL, USER_DEFINED
            self.tk.add_special_tokens(control)
            self.bos_id = field(reader, "tokenizer.ggml.bos_token_id")
            self.eos_id = field(reader, "tokenizer.ggml.eos_token_id")
            self.add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", True))
            eot = field(reader, "tokenizer.ggml.eot_token_id")
            pad = field(reader, "tokenizer.ggml.padding_token_id")
        else:
            try:
                self.tk = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:  # noqa: BLE001 - not JSON, or not a tokenizer the library reads
                raise ValueError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]})") from None
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
        self.tk.encode_special_tokens = True  # text is text: a "<|im_end|>" typed in a record stays text
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.pad_id = pad if pad is not None else self.eos_id
        self.special = {"bos": self.bos_id, "eos": self.eos_id}
        if eot is not None and eot != self.eos_id:
            self.special["eot"] = eot

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
