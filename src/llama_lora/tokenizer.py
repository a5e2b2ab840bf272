"""Tokenizers, chosen by the file's content: LLaMA-2's SentencePiece model, or Llama 3's tiktoken BPE file (lines
of base64 token and rank, read with tiktoken, the library Meta's reference uses; an optional extra). Each gives
LLaMA's special ids; and tokenizer training for the offline demo."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

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
            cls = TiktokenTokenizer if is_tiktoken_file(_existing(path)) else SentencePieceTokenizer
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
