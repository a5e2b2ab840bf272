"""SentencePiece tokenizer wrapper with LLaMA's special ids, and tokenizer training for the offline demo."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"  # what a byte sequence that is not (yet) valid UTF-8 decodes to


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Tokenizer not found: {path}. LLaMA-2 ships tokenizer.model beside its weights; "
                "the demo trains its own (see configs/demo.yaml)"
            )
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a SentencePiece model: {e}") from None
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # LLaMA defines no pad token (pad_id() == -1). Padding uses <unk> (0) instead when there is no pad id:
        # padded positions sit after every real token (right padding, causal attention) and carry label -100,
        # so their id never reaches the loss or any real position.
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else max(self.sp.unk_id(), 0)
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: the tokenizer has no BOS/EOS pieces; train it with bos_id=1, eos_id=2")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``; BOS/EOS are added as ids (SentencePiece never maps the string '</s>' to EOS)."""
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        """The text of ``ids`` piece by piece as they come, for printing while generating: joined, the pieces equal
        ``decode`` of all the ids. The whole reply is decoded each time (SentencePiece's spaces depend on the
        neighbours), and text ending in an unfinished UTF-8 character (byte-fallback pieces still to come decode to
        U+FFFD) is held back until the character is complete."""
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

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))


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
