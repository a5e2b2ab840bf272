"""Alpaca data: preprocessing with prompt masking, batching, a resumable sampler, a DataModule.

The names ``preprocess``, ``SupervisedDataset`` and ``DataCollatorForSupervisedDataset`` follow Stanford Alpaca's
train.py; the prompt templates are in prompts.py.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import random
import re
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .demo import default_cache_dir, demo_tokenizer_file, instruction_records, prose
from .loss import IGNORE_INDEX
from .prompts import format_prompt
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
DOWNLOAD_TIMEOUT_S = 60
DOWNLOAD_MAX_BYTES = 512 * 2**20

# ----- reading and validating records -----

class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.startswith("https://"):
            raise urllib.error.URLError(f"redirected to {newurl}, which is not https")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open_url(url: str, timeout: float):
    """The response for an https URL; redirects must stay on https."""
    return urllib.request.build_opener(_HttpsOnlyRedirects).open(url, timeout=timeout)


def download(url: str, cache_dir: str | Path | None = None) -> Path:
    """Fetch an https URL once into the cache dir (atomic write, timeout, size cap) and return the local path."""
    if not url.startswith("https://"):
        raise ValueError(f"Only https URLs are downloaded, got {url!r}; pass a local path instead")
    cache = Path(cache_dir or default_cache_dir())
    target = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{Path(url).name or 'data.json'}"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log.info("Downloading %s -> %s", url, target)
    part = target.with_name(target.name + ".part")
    try:
        with _open_url(url, DOWNLOAD_TIMEOUT_S) as resp, open(part, "wb") as out:
            size = 0
            while chunk := resp.read(1 << 20):
                size += len(chunk)
                if size > DOWNLOAD_MAX_BYTES:
                    raise ValueError(f"{url} is larger than {DOWNLOAD_MAX_BYTES >> 20} MiB; download it yourself")
                out.write(chunk)
        os.replace(part, target)  # atomic: the cache never holds a half-written file under the final name
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise ValueError(
            f"Could not download {url} ({getattr(e, 'reason', e)}); download it by hand and set "
            "data_path to the local file"
        ) from None
    finally:
        part.unlink(missing_ok=True)
    return target


def load_records(path: str | Path, cache_dir: str | Path | None = None, format: str = "alpaca"
                 ) -> list[dict[str, str]]:
    """Read and validate records from a local file or an https URL.

    - ``alpaca``: a .json list or a .jsonl file of {instruction, input, output} records.
    - ``text``: a .txt file (documents separated by blank lines), or a .json list / .jsonl file of {"text": ...}
      records or of strings; each document comes back as {"text": ...}.
    """
    if str(path).startswith(("http://", "https://")):
        path = download(str(path), cache_dir)
    path = Path(path)
    kinds = ".txt, .json or .jsonl" if format == "text" else ".json/.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {path}; give a local {kinds} file or an https URL")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        what = "text data is UTF-8" if format == "text" else "Alpaca data is a JSON list or JSON lines"
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); {what}") from None
    if format == "text" and path.suffix not in (".json", ".jsonl"):
        records: list = [{"text": doc.strip()} for doc in re.split(r"\n\s*\n", text) if doc.strip()]
    elif path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: invalid JSON on line {lineno}, column {e.colno}: {e.msg}") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: the top level is a JSON {type(records).__name__}, expected a list of records")
    if format == "text":
        records = [{"text": r} if isinstance(r, str) else r for r in records]
    for i, rec in enumerate(records):
        (validate_text if format == "text" else validate_record)(rec, i, path)
    return records


def validate_text(rec: Any, index: int, source: str | Path = "data") -> None:
    if not isinstance(rec, dict):
        raise ValueError(f"{source}: record {index} is a {type(rec).__name__}, expected a string or an object with "
                         "'text'")
    if "text" not in rec:
        raise ValueError(f"{source}: record {index} has no 'text' field")
    if not isinstance(rec["text"], str):
        raise ValueError(f"{source}: record {index} field 'text' is a {type(rec['text']).__name__}, expected a string")


def validate_record(rec: Any, index: int, source: str | Path = "data") -> None:
    if not isinstance(rec, dict):
        raise ValueError(f"{source}: record {index} is a {type(rec).__name__}, expected an object with "
                         "'instruction', 'input' and 'output'")
    for field in ("instruction", "output"):
        if field not in rec:
            raise ValueError(f"{source}: record {index} has no '{field}' field")
    for field in ("instruction", "input", "output"):
        if field in rec and not isinstance(rec[field], str):
            raise ValueError(f"{source}: record {index} field '{field}' is a {type(rec[field]).__name__}, "
                             "expected a string")


# ----- tokenization -----

@dataclass
class PreprocessStats:
    kept: int = 0
    dropped: int = 0  # the prompt alone did not fit in max_seq_len
    truncated: int = 0  # the response was cut to fit


def tokenize_record(record: dict[str, str], tokenizer: Tokenizer, max_seq_len: int = 512,
                    mask_prompt: bool = True) -> tuple[list[int], list[int], bool] | None:
    """(input_ids, labels, truncated) for one record, or None when its prompt does not fit.

    ids = BOS + prompt + response + EOS. The prompt and response are tokenized separately and concatenated, so the
    prompt's tokens are exactly a prefix (SentencePiece would otherwise merge across the boundary).
    """
    prompt = tokenizer.encode(format_prompt(record), bos=True)
    target = tokenizer.encode(record["output"], eos=True)  # an empty output still trains on EOS
    if len(prompt) >= max_seq_len:
        return None
    truncated = len(prompt) + len(target) > max_seq_len
    target = target[: max_seq_len - len(prompt)]  # a truncated response loses its EOS: it did not end there
    ids = prompt + target
    labels = ([IGNORE_INDEX] * len(prompt) if mask_prompt else [IGNORE_INDEX] + prompt[1:]) + target
    return ids, labels, truncated


def preprocess(records: Sequence[dict[str, str]], tokenizer: Tokenizer, max_seq_len: int = 512,
               mask_prompt: bool = True, limit: int | None = None
               ) -> tuple[list[dict[str, list[int]]], PreprocessStats]:
    """Tokenized examples of ``records`` in order; with ``limit``, stop once that many are kept. Each example keeps the
    position of its record in ``records`` as ``index``."""
    examples, stats = [], PreprocessStats()
    for i, rec in enumerate(records):
        if limit is not None and len(examples) >= limit:
            break
        out = tokenize_record(rec, tokenizer, max_seq_len, mask_prompt)
        if out is None:
            stats.dropped += 1
            continue
        ids, labels, truncated = out
        stats.truncated += truncated
        examples.append({"input_ids": ids, "labels": labels, "index": i})
    stats.kept = len(examples)
    if stats.dropped or stats.truncated:
        log.info("preprocess: kept %d records, dropped %d (prompt longer than max_seq_len=%d), truncated %d",
                 stats.kept, stats.dropped, max_seq_len, stats.truncated)
    return examples, stats


def text_blocks(records: Sequence[dict[str, str]], tokenizer: Tokenizer, max_seq_len: int, limit: int | None = None
                ) -> tuple[list[dict[str, list[int]]], PreprocessStats]:
    """Continued pretraining on raw text: each document as BOS + text + EOS, concatenated and cut into blocks of
    ``max_seq_len`` tokens (the last one shorter), every token a target. A block may span documents, as in GPT-style
    pretraining; EOS marks where one ends. ``limit`` takes the first that many documents. Each block keeps the index
    of the document it starts in."""
    stream: list[int] = []
    starts: list[int] = []  # first stream position of each document
    for doc in records[:limit]:
        starts.append(len(stream))
        stream += tokenizer.encode(doc["text"], bos=True, eos=True)
    examples = []
    for begin in range(0, len(stream) - 1, max_seq_len):  # a block needs two tokens to hold a target
        ids = stream[begin : begin + max_seq_len]
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:],
                         "index": bisect.bisect_right(starts, begin) - 1})
    return examples, PreprocessStats(kept=len(examples))


def pack_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of example indices, each holding at most ``capacity`` tokens: examples longest first, each into the first
    row (in the order rows were opened) that has room, else into a new row. A max tree over the rows' free space
    finds that row in O(log rows)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [0] * (2 * size)  # free[size + r]: room left in row r; inner nodes: the most room below them
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a packed row holds ({capacity})")
        if free[1] >= n:
            node = 1
            while node < size:
                node = 2 * node if free[2 * node] >= n else 2 * node + 1
            r = node - size
        else:
            r = len(rows)
            rows.append([])
            free[size + r] = capacity
        rows[r].append(i)
        node = size + r
        free[node] -= n
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return rows


class Padding(int):
    """An example index handed to a rank only so that it is not empty (a short last batch over many ranks). The
    dataset returns it as a single BOS token with no target: it weighs nothing in the token-weighted loss."""


class SupervisedDataset(Dataset):
    """Tokenized examples: dicts of ``input_ids`` and ``labels`` (lists of ints, same length): Alpaca records with
    the prompt masked, or, with ``format="text"``, blocks of raw text (see ``text_blocks``).

    ``indices[i]`` is the position in ``records`` of the record example i came from (``record_ids`` maps them to the
    caller's own numbering, e.g. positions in the data file). ``limit`` keeps the first that many examples."""

    def __init__(self, records: Sequence[dict[str, str]], tokenizer: Tokenizer, max_seq_len: int = 512,
                 mask_prompt: bool = True, source: str = "data", limit: int | None = None,
                 record_ids: Sequence[int] | None = None, format: str = "alpaca") -> None:
        if format == "text":
            examples, self.stats = text_blocks(records, tokenizer, max_seq_len, limit)
        else:
            examples, self.stats = preprocess(records, tokenizer, max_seq_len, mask_prompt, limit)
        ids = record_ids if record_ids is not None else range(len(records))
        self.indices = [ids[e.pop("index")] for e in examples]
        self.examples = examples
        if not self.examples and format == "text":
            raise ValueError(f"{source}: no text to train on; give documents separated by blank lines, or JSON "
                             "records with a 'text' field")
        if not self.examples:
            raise ValueError(f"{source}: no records left after preprocessing ({self.stats.dropped} dropped because "
                             f"the prompt exceeds max_seq_len={max_seq_len}); raise max_seq_len or check the data")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):  # (index, target tokens in this batch's accumulation window), from the sampler
            return {**self[key[0]], "n_targets_window": key[1]}
        if isinstance(key, Padding):
            padding = {"input_ids": self.examples[key]["input_ids"][:1], "labels": [IGNORE_INDEX], "padding": True}
            return {**padding, "segment_ids": [1]} if "segment_ids" in self.examples[key] else padding
        return self.examples[key]

    @property
    def target_counts(self) -> list[int]:
        return [sum(x != IGNORE_INDEX for x in e["labels"][1:]) for e in self.examples]

    @property
    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]


class PackedDataset(SupervisedDataset):
    """``SupervisedDataset``'s examples packed into rows of up to ``capacity`` tokens (first-fit decreasing): each row
    is one example of the loader, with ``segment_ids`` numbering its examples 1, 2, ... so that attention stays within
    each and RoPE restarts (see ``Llama.forward``). Prompt masking and EOS are the examples' own. ``rows`` lists the
    example indices of each row; ``indices`` the records they came from."""

    def __init__(self, dataset: SupervisedDataset, capacity: int) -> None:
        self.stats = dataset.stats
        self.rows = pack_first_fit_decreasing(dataset.lengths, capacity)
        self.examples, self.indices = [], []
        for row in self.rows:
            parts = [dataset.examples[i] for i in row]
            self.examples.append({
                "input_ids": [t for e in parts for t in e["input_ids"]],
                "labels": [t for e in parts for t in e["labels"]],
                "segment_ids": [k for k, e in enumerate(parts, 1) for _ in e["input_ids"]]})
            self.indices.append([dataset.indices[i] for i in row])


@dataclass
class DataCollatorForSupervisedDataset:
    """Right-pad to the longest sequence (optionally a multiple of ``pad_to_multiple_of``): pad id / -100."""

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        T = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
        packed = "segment_ids" in examples[0]
        segment_ids = torch.zeros((len(examples), T), dtype=torch.long) if packed else None  # 0: padding
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            if packed:
                segment_ids[i, :n] = torch.tensor(e["segment_ids"])
        lengths = torch.tensor([0 if e.get("padding") else len(e["input_ids"]) for e in examples])
        batch = {
            "input_ids": input_ids,  # (B, T)
            "labels": labels,  # (B, T); position t is predicted from positions < t
            "n_tokens": lengths.sum(),  # non-pad tokens of real examples
            "n_targets": (labels[:, 1:] != IGNORE_INDEX).sum(),  # tokens the loss sees after the shift
        }
        if packed:
            batch["segment_ids"] = segment_ids  # (B, T)
        if "n_targets_window" in examples[0]:  # all ranks, all micro-batches of this optimizer step
            batch["n_targets_window"] = torch.tensor(examples[0]["n_targets_window"])
        return batch


# ----- sampling -----

class ResumableBatchSampler(Sampler[list[int]]):
    """Seeded batches that restart mid-epoch at an exact batch, shared out across data-parallel ranks.

    Each step draws a *global* batch of ``batch_size * num_replicas`` examples from a permutation seeded by
    (seed, epoch); rank r takes the r-th slice. One process with batch_size B*W therefore sees the same examples
    per step as W processes with batch_size B. A short last batch is split as evenly as possible; a rank that would
    still be empty (fewer examples than ranks) gets a ``Padding`` example that weighs nothing, because a rank without
    a batch would leave the others waiting in the gradient all-reduce. Every example is seen once per epoch (with
    ``drop_last``, a short last batch is dropped and logged). ``group_by_length`` sorts examples by length within
    windows of ``50`` global batches (then shuffles the batch order) to cut padding.

    With ``target_counts`` (target tokens per example), each index comes out as ``(index, n)``, where n counts the
    target tokens of every example in the same accumulation window (``accumulate`` consecutive global batches from
    the start of the epoch, as Lightning groups them): the denominator of a token-averaged loss, known up front.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 group_by_length: bool = False, drop_last: bool = False, num_replicas: int = 1, rank: int = 0,
                 target_counts: Sequence[int] | None = None, accumulate: int = 1) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.target_counts, self.accumulate = target_counts, max(1, accumulate)
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.shuffle, self.group_by_length, self.drop_last = shuffle, group_by_length, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self._logged_drop = False
        self.epoch = 0
        self.batch_index = 0  # batches of this epoch already consumed
        # Lightning calls set_epoch on `dataloader.sampler` and `batch_sampler.sampler`, never on a batch sampler
        # itself: exposing ourselves as `.sampler` makes Lightning's epoch counter the one that drives the shuffle.
        self.sampler = self

    def global_batches(self, epoch: int) -> list[list[int]]:
        n, size = len(self.lengths), self.batch_size * self.num_replicas
        order = list(range(n))
        rng = random.Random(f"{self.seed}-{epoch}")
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            window = size * 50
            order = [i for w in range(0, n, window)
                     for i in sorted(order[w : w + window], key=lambda j: -self.lengths[j])]
        batches = [order[i : i + size] for i in range(0, n, size)]
        if batches and len(batches[-1]) < size and self.drop_last:
            dropped = batches.pop()
            if not self._logged_drop:
                log.info("Sampler: drop_last drops the short last batch of %d examples every epoch", len(dropped))
                self._logged_drop = True
        if self.group_by_length and self.shuffle:
            rng.shuffle(batches)
        return batches

    def _rank_slice(self, batch: list[int]) -> list[int]:
        """This rank's share: batch_size each for a full batch, sizes differing by at most one for a short one."""
        base, extra = divmod(len(batch), self.num_replicas)
        start = self.rank * base + min(self.rank, extra)
        local = batch[start : start + base + (self.rank < extra)]
        return local or [Padding(batch[0])]

    def __iter__(self) -> Iterator[list[int] | list[tuple[int, int]]]:
        batches = self.global_batches(self.epoch)
        start = self.batch_index
        for i in range(start, len(batches)):
            self.batch_index = i + 1
            local = self._rank_slice(batches[i])
            if self.target_counts is None:
                yield local
            else:
                w = i - i % self.accumulate
                n = sum(self.target_counts[j] for batch in batches[w : w + self.accumulate] for j in batch)
                yield [(j, n) for j in local]
        # The epoch does not advance here: set_epoch does (Lightning calls it before every epoch). Advancing on
        # exhaustion as well made an extra, empty epoch whenever both happened.

    def __len__(self) -> int:
        # The whole epoch, also after a mid-epoch restart: Lightning counts the restored batches itself.
        return len(self.global_batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch, unless it is the epoch a restored state is in the middle of."""
        if epoch != self.epoch:
            self.epoch, self.batch_index = epoch, 0
        elif self.batch_index >= len(self.global_batches(epoch)):
            self.batch_index = 0  # the same epoch again after a full pass (a standalone loop without a new epoch)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"Sampler state is for seed {state['seed']}, this run uses seed {self.seed}; "
                             "resume with the same data.seed")
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]


# ----- Lightning -----

def split_records(n: int, num_samples: int | None, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(training candidates, validation) record indices from a permutation seeded by ``seed``.

    Validation is the last ``val_size`` records of the permutation and training draws from the others, in order,
    so the two never share a record. When the records cannot cover ``num_samples + val_size``, validation shrinks
    (one log line says so), never the training set.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    room = n - (num_samples if num_samples is not None else 1)
    n_val = max(0, min(val_size, room))
    if n_val < val_size:
        wanted = f"num_samples + val_size = {num_samples} + {val_size}" if num_samples else f"val_size {val_size} + 1"
        log.info("%d records are fewer than %s: validation shrunk to %d records", n, wanted, n_val)
    return order[: n - n_val], order[n - n_val :]


DEMO = "demo"  # data_path value for the offline synthetic set


class AlpacaDataModule(L.LightningDataModule):
    """Alpaca instruction data (or raw text, ``format: text``) for Lightning: seeded splits, resumable seeded batches,
    optional length grouping.

    ``data_path``: a local file, an https URL (downloaded once into ``cache_dir``), or ``"demo"`` for the offline
    synthetic world (its instructions, or with ``format: text`` its prose). ``format``: ``alpaca`` records
    ({instruction, input, output}, prompt masked) or ``text`` for continued pretraining (.txt, or JSON/JSONL with a
    ``text`` field; see ``text_blocks``). ``tokenizer_path``: a SentencePiece model; None with the demo data trains
    the demo's own tokenizer (``demo_vocab_size`` pieces, cached). ``num_samples``: the number of training records
    (documents for text), taken after a seeded shuffle (200 reproduces the seed experiment; None takes all).
    ``val_size``: records held out for validation, never from the training sample. ``packing``: several examples per
    row of ``max_seq_len`` tokens (first-fit decreasing), attention and RoPE positions kept within each; then
    ``micro_batch_size`` counts rows. ``demo_records``: how many of the demo's records to use (None: all of them).
    """

    def __init__(
        self,
        data_path: str = ALPACA_URL,
        format: Literal["alpaca", "text"] = "alpaca",
        tokenizer_path: str | None = "checkpoints/Llama-2-7b/tokenizer.model",
        num_samples: int | None = None,
        val_size: int = 100,
        seed: int = 42,
        max_seq_len: int = 512,
        micro_batch_size: int = 4,
        num_workers: int = 0,
        mask_prompt: bool = True,
        group_by_length: bool = False,
        packing: bool = False,
        pad_to_multiple_of: int | None = 8,
        cache_dir: str | None = None,
        demo_records: int | None = None,
        demo_vocab_size: int = 1024,
    ) -> None:
        super().__init__()
        for name, value in (("max_seq_len", max_seq_len), ("micro_batch_size", micro_batch_size)):
            if value <= 0:
                raise ValueError(f"data.{name} must be positive, got {value}")
        if num_samples is not None and num_samples <= 0:
            raise ValueError(f"data.num_samples must be positive or null (all records), got {num_samples}")
        if val_size < 0:
            raise ValueError(f"data.val_size must be >= 0, got {val_size}")
        if tokenizer_path is None and data_path != DEMO:
            raise ValueError("data.tokenizer_path is required unless data_path is 'demo'; point it at the "
                             "tokenizer.model that comes with the LLaMA-2 weights")
        self.save_hyperparameters()
        self.data_path, self.format = data_path, format
        self.tokenizer_path, self.num_samples = tokenizer_path, num_samples
        self.val_size, self.seed, self.max_seq_len = val_size, seed, max_seq_len
        self.micro_batch_size, self.num_workers, self.mask_prompt = micro_batch_size, num_workers, mask_prompt
        self.group_by_length, self.pad_to_multiple_of = group_by_length, pad_to_multiple_of
        self.packing = packing
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.demo_records, self.demo_vocab_size = demo_records, demo_vocab_size
        self.tokenizer: Tokenizer | None = None
        self.train_set: SupervisedDataset | None = None
        self.val_set: SupervisedDataset | None = None
        self.train_sampler: ResumableBatchSampler | None = None
        self._sampler_state: dict[str, int] | None = None

    def prepare_data(self) -> None:
        """Runs on one process: download the data file or train the demo tokenizer, so setup() only reads."""
        self._records()
        self._tokenizer_file()

    def _records(self) -> list[dict[str, str]]:
        if self.data_path == DEMO and self.format == "text":
            return [{"text": doc} for doc in prose(*(() if self.demo_records is None else (self.demo_records,)))]
        if self.data_path == DEMO:
            return instruction_records(self.demo_records)
        return load_records(self.data_path, self.cache_dir, self.format)

    def _tokenizer_file(self) -> Path:
        if self.tokenizer_path is None:
            return demo_tokenizer_file(self.demo_vocab_size, self.cache_dir)
        return Path(self.tokenizer_path)

    def load_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            self.tokenizer = Tokenizer(self._tokenizer_file())
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tokenizer = self.load_tokenizer()
        records = self._records()
        train_ids, val_ids = split_records(len(records), self.num_samples, self.val_size, self.seed)
        source = str(self.data_path)
        # The training set is the first num_samples records of the shuffled order that fit max_seq_len.
        self.train_set = SupervisedDataset([records[i] for i in train_ids], tokenizer, self.max_seq_len,
                                           self.mask_prompt, source, limit=self.num_samples, record_ids=train_ids,
                                           format=self.format)
        self.val_set = SupervisedDataset([records[i] for i in val_ids], tokenizer, self.max_seq_len, self.mask_prompt,
                                         source, record_ids=val_ids, format=self.format) if val_ids else None
        if self.packing:  # rows of up to max_seq_len tokens, several examples each
            examples = len(self.train_set)
            self.train_set = PackedDataset(self.train_set, self.max_seq_len)
            self.val_set = PackedDataset(self.val_set, self.max_seq_len) if self.val_set is not None else None
            log.info("Packing: %d examples into %d rows of up to %d tokens", examples, len(self.train_set),
                     self.max_seq_len)
        if self.num_samples is not None and self.packing is False and len(self.train_set) < self.num_samples:
            log.warning("data.num_samples is %d, but %s has only %d usable records for training", self.num_samples,
                        source, len(self.train_set))
        if self.format == "text":
            log.info("Text data %s: %d train / %d val blocks of up to %d tokens", source, len(self.train_set),
                     len(self.val_set or []), self.max_seq_len)
        else:
            log.info("Alpaca data %s: %d train / %d val examples (max_seq_len %d; %d dropped, %d truncated)", source,
                     len(self.train_set), len(self.val_set or []), self.max_seq_len, self.train_set.stats.dropped,
                     self.train_set.stats.truncated)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: SupervisedDataset, sampler: Sampler | list[list[int]]) -> DataLoader:
        collate = DataCollatorForSupervisedDataset(self.load_tokenizer().pad_id, self.pad_to_multiple_of)
        # A generator of its own keeps the DataLoader from drawing on the global RNG (exact resume).
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        self.train_sampler = ResumableBatchSampler(
            self.train_set.lengths, self.micro_batch_size, seed=self.seed, shuffle=True,
            group_by_length=self.group_by_length, num_replicas=world, rank=rank,
            target_counts=self.train_set.target_counts, accumulate=accumulate)
        if self._sampler_state is not None:
            self.train_sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
        return self._loader(self.train_set, self.train_sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        world, rank = self._world()
        # A fixed list of batches: validation must see the same examples every time, whatever stopped it early.
        batches = list(ResumableBatchSampler(self.val_set.lengths, self.micro_batch_size, shuffle=False,
                                             num_replicas=world, rank=rank))
        return self._loader(self.val_set, batches)

    def state_dict(self) -> dict[str, Any]:
        if self.train_sampler is None:
            return {}
        state = self.train_sampler.state_dict()
        if self.trainer is not None:
            # The DataLoader runs ahead of training (prefetch, workers): the position that counts is the number of
            # batches the loop has processed in this epoch, not the number the sampler has handed out.
            state["batch_index"] = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            state["epoch"] = self.trainer.current_epoch
        return {"sampler": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler_state = state.get("sampler")
        if self.train_sampler is not None and sampler_state is not None:
            # The loader was built before the checkpoint was restored (the LR schedule asks for the run's length).
            self.train_sampler.load_state_dict(sampler_state)
        else:
            self._sampler_state = sampler_state
