"""Batches: the datasets of tokenized examples (plain or packed), the collator, and the resumable sampler that
shares each global batch out across ranks. The sampler hands the dataset ``BatchItem``s; the collator makes a
``Batch``."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict

import torch
from torch.utils.data import Dataset, Sampler

from ..loss import IGNORE_INDEX
from ..prompts import PromptFormat
from ..tokenizer import Tokenizer
from .packing import pack_first_fit_decreasing
from .tokenize import ALPACA, preprocess, preprocess_pairs, text_blocks

log = logging.getLogger(__name__)

class BatchItem(NamedTuple):
    """One example of a micro-batch, as the sampler hands it to the dataset.

    - ``index``: the example's position in the dataset.
    - ``window_targets``: the target tokens of every example in the same accumulation window (all ranks, all
      micro-batches of the optimizer step): the denominator of the token-averaged loss, known up front. None outside
      training (validation).
    - ``padding``: handed to a rank only so that it is not empty (a short last batch over many ranks): the dataset
      returns it as a single BOS token with no target, so it weighs nothing in the token-weighted loss.
    """

    index: int
    window_targets: int | None = None
    padding: bool = False


class Batch(TypedDict, total=False):
    """What the collator makes of a micro-batch, and the module reads (B examples padded to T tokens)."""

    input_ids: torch.Tensor  # (B, T), right-padded with the pad id
    labels: torch.Tensor  # (B, T); -100 where no target (prompt, padding); position t is predicted from positions < t
    segment_ids: torch.Tensor  # (B, T), packed rows only: examples numbered 1, 2, ... and 0 for padding
    n_tokens: torch.Tensor  # () non-pad tokens of real examples
    n_targets: torch.Tensor  # () tokens the loss sees after the shift
    n_targets_window: torch.Tensor  # () BatchItem.window_targets: the loss's denominator (training only)
    pair_weight: torch.Tensor  # (P,) preference batches only: 1 per pair, 0 for a padding pair (rows 2P: chosen first)
    reference_logps: torch.Tensor  # (P, 2) preference batches with a precomputed reference: chosen, rejected


class SupervisedDataset(Dataset):
    """Tokenized examples: dicts of ``input_ids`` and ``labels`` (lists of ints, same length): Alpaca records with
    the prompt masked, conversations with the assistant turns alone trained (``prompt_format``: ``prompts.py``), or,
    with ``format="text"``, blocks of raw text (see ``text_blocks``).

    ``indices[i]`` is the position in ``records`` of the record example i came from (``record_ids`` maps them to the
    caller's own numbering, e.g. positions in the data file). ``limit`` keeps the first that many examples."""

    def __init__(self, records: Sequence[dict[str, str]], tokenizer: Tokenizer, max_seq_len: int = 512,
                 mask_prompt: bool = True, source: str = "data", limit: int | None = None,
                 record_ids: Sequence[int] | None = None, format: str = "alpaca",
                 prompt_format: PromptFormat = ALPACA) -> None:
        if format == "text":
            examples, self.stats = text_blocks(records, tokenizer, max_seq_len, limit)
        else:
            examples, self.stats = preprocess(records, tokenizer, max_seq_len, mask_prompt, limit, prompt_format)
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

    def __getitem__(self, item: int | BatchItem) -> dict[str, Any]:
        if not isinstance(item, BatchItem):
            return self.examples[item]
        example = self.examples[item.index]
        if item.padding:
            example = {"input_ids": example["input_ids"][:1], "labels": [IGNORE_INDEX], "padding": True,
                       **({"segment_ids": [1]} if "segment_ids" in example else {})}
        return example if item.window_targets is None else {**example, "n_targets_window": item.window_targets}

    @property
    def target_counts(self) -> list[int]:
        return [sum(x != IGNORE_INDEX for x in e["labels"][1:]) for e in self.examples]

    @property
    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]


class PreferenceDataset(Dataset):
    """Tokenized preference pairs (``tokenize.preprocess_pairs``): each a dict of ``chosen`` and ``rejected``
    (input_ids, labels). The sampler weighs each pair 1 (``target_counts``): the loss is the mean over the pairs of
    the accumulation window, on all ranks. ``indices`` as ``SupervisedDataset``'s."""

    def __init__(self, records: Sequence[dict], tokenizer: Tokenizer, max_seq_len: int = 512, source: str = "data",
                 limit: int | None = None, record_ids: Sequence[int] | None = None,
                 prompt_format: PromptFormat = ALPACA) -> None:
        examples, self.stats = preprocess_pairs(records, tokenizer, max_seq_len, limit, prompt_format)
        ids = record_ids if record_ids is not None else range(len(records))
        self.indices = [ids[e.pop("index")] for e in examples]
        self.examples = examples
        self.reference: torch.Tensor | None = None  # (n, 2) the reference's log-probabilities, when precomputed
        if not self.examples:
            raise ValueError(f"{source}: no preference pairs left after preprocessing ({self.stats.dropped} with a "
                             f"prompt longer than max_seq_len={max_seq_len}, {self.stats.identical} with chosen equal "
                             f"to rejected, {self.stats.empty} with an empty completion)")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, item: int | BatchItem) -> dict[str, Any]:
        if not isinstance(item, BatchItem):
            return self.examples[item]
        pair = {**self.examples[item.index], "padding": item.padding}  # a padding pair weighs 0
        if self.reference is not None:
            pair["reference"] = self.reference[item.index].tolist()
        return pair if item.window_targets is None else {**pair, "n_targets_window": item.window_targets}

    @property
    def target_counts(self) -> list[int]:
        return [1] * len(self.examples)

    @property
    def lengths(self) -> list[int]:
        return [max(len(e["chosen"][0]), len(e["rejected"][0])) for e in self.examples]


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

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> Batch:
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


@dataclass
class PreferenceCollator:
    """P pairs as one batch of 2P rows, the chosen completions first, then the rejected ones in the same order:
    the policy's forward and backward over both in one pass. ``pair_weight`` is 0 for a padding pair."""

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, pairs: Sequence[dict[str, Any]]) -> Batch:
        rows = [{"input_ids": p[side][0], "labels": p[side][1], "padding": p.get("padding", False)}
                for side in ("chosen", "rejected") for p in pairs]
        batch = DataCollatorForSupervisedDataset(self.pad_id, self.pad_to_multiple_of)(rows)
        batch["pair_weight"] = torch.tensor([0.0 if p.get("padding") else 1.0 for p in pairs])
        if "reference" in pairs[0]:  # precomputed: (P, 2) chosen, rejected
            batch["reference_logps"] = torch.tensor([p["reference"] for p in pairs], dtype=torch.float32)
        if "n_targets_window" in pairs[0]:  # pairs of the accumulation window, on all ranks
            batch["n_targets_window"] = torch.tensor(pairs[0]["n_targets_window"])
        return batch


# ----- sampling -----

class ResumableBatchSampler(Sampler[list[BatchItem]]):
    """Seeded batches that restart mid-epoch at an exact batch, shared out across data-parallel ranks.

    Each step draws a *global* batch of ``batch_size * num_replicas`` examples from a permutation seeded by
    (seed, epoch); rank r takes the r-th slice. One process with batch_size B*W therefore sees the same examples
    per step as W processes with batch_size B. A short last batch is split as evenly as possible; a rank that would
    still be empty (fewer examples than ranks) gets a padding item that weighs nothing, because a rank without
    a batch would leave the others waiting in the gradient all-reduce. Every example is seen once per epoch (with
    ``drop_last``, a short last batch is dropped and logged). ``group_by_length`` sorts examples by length within
    windows of ``50`` global batches (then shuffles the batch order) to cut padding.

    Each micro-batch is a list of ``BatchItem``s. With ``target_counts`` (target tokens per example), each carries
    ``window_targets``: the target tokens of every example in the same accumulation window (``accumulate``
    consecutive global batches from the start of the epoch, as Lightning groups them).
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

    def _rank_slice(self, batch: list[int], window_targets: int | None) -> list[BatchItem]:
        """This rank's share: batch_size each for a full batch, sizes differing by at most one for a short one."""
        base, extra = divmod(len(batch), self.num_replicas)
        start = self.rank * base + min(self.rank, extra)
        local = batch[start : start + base + (self.rank < extra)]
        if not local:
            return [BatchItem(batch[0], window_targets, padding=True)]
        return [BatchItem(i, window_targets) for i in local]

    def __iter__(self) -> Iterator[list[BatchItem]]:
        batches = self.global_batches(self.epoch)
        start = self.batch_index
        for i in range(start, len(batches)):
            self.batch_index = i + 1
            n = None
            if self.target_counts is not None:
                w = i - i % self.accumulate
                n = sum(self.target_counts[j] for batch in batches[w : w + self.accumulate] for j in batch)
            yield self._rank_slice(batches[i], n)
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
