"""The Lightning data module: seeded splits, resumable seeded batches, optional length grouping and packing."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from ..cache import default_cache_dir
from ..demo import demo_tokenizer_file, instruction_records, preference_records, prose
from ..prompts import ChatTemplateName, PromptFormat, resolve_format
from ..tokenizer import Tokenizer
from .batches import (
    DataCollatorForSupervisedDataset,
    PackedDataset,
    PreferenceCollator,
    PreferenceDataset,
    ResumableBatchSampler,
    SupervisedDataset,
)
from .records import ALPACA_URL, load_records, preference_record

log = logging.getLogger(__name__)

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
    ({instruction, input, output}, prompt masked), ``chat`` conversations (``messages`` with role/content, or
    ShareGPT's ``conversations`` with from/value; the loss on the assistant turns, in ``chat_template``: llama3 or
    llama2, by default the tokenizer's family's; a chat template chosen for Alpaca records makes each a two-turn
    conversation), ``text`` for continued pretraining (.txt, or JSON/JSONL with a
    ``text`` field; see ``text_blocks``), or ``preference`` pairs for ``model.preference`` (``records.
    preference_record`` lists the forms read; the prompt in the run's prompt format, Alpaca's unless
    ``chat_template`` names one; the demo's pairs prefer the world's answer to a plausible wrong one).
    ``tokenizer_path``: a SentencePiece or tiktoken ``tokenizer.model``, a
    ``tokenizer.json`` or a GGUF (its own tokenizer); None: fit.py takes the base's own, and with the demo data trains
    the demo's own tokenizer (``demo_vocab_size`` pieces, cached). ``num_samples``: the number of training records
    (documents for text), taken after a seeded shuffle (200 reproduces the seed experiment; None takes all).
    ``val_size``: records held out for validation, never from the training sample. ``packing``: several examples per
    row of ``max_seq_len`` tokens (first-fit decreasing), attention and RoPE positions kept within each; then
    ``micro_batch_size`` counts rows. ``demo_records``: how many of the demo's records to use (None: all of them).
    """

    def __init__(
        self,
        data_path: str = ALPACA_URL,
        format: Literal["alpaca", "chat", "text", "preference"] = "alpaca",
        chat_template: ChatTemplateName | None = None,
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
            raise ValueError("data.tokenizer_path is required unless data_path is 'demo' or model.checkpoint_dir names "
                             "the base whose tokenizer to take; point it at the "
                             "tokenizer.model that comes with the LLaMA-2 weights")
        self.save_hyperparameters()
        if format == "text" and chat_template is not None:
            raise ValueError("data.chat_template is for instruction and chat data; format text trains on raw text")
        if format == "preference" and packing:
            raise ValueError("data.packing with data.format preference is not supported (a pair's two completions "
                             "share a prompt, which packing would split); set data.packing: false")
        if format == "preference" and not mask_prompt:
            raise ValueError("data.mask_prompt false with data.format preference: the objectives compare the "
                             "completions' log-probabilities alone; set data.mask_prompt: true")
        self.data_path, self.format, self.chat_template = data_path, format, chat_template
        self.tokenizer_path, self.num_samples = tokenizer_path, num_samples
        self.val_size, self.seed, self.max_seq_len = val_size, seed, max_seq_len
        self.micro_batch_size, self.num_workers, self.mask_prompt = micro_batch_size, num_workers, mask_prompt
        self.group_by_length, self.pad_to_multiple_of = group_by_length, pad_to_multiple_of
        self.packing = packing
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.demo_records, self.demo_vocab_size = demo_records, demo_vocab_size
        self.tokenizer: Tokenizer | None = None
        self.train_set: SupervisedDataset | PreferenceDataset | None = None
        self.val_set: SupervisedDataset | PreferenceDataset | None = None
        self.train_sampler: ResumableBatchSampler | None = None
        self._sampler_state: dict[str, int] | None = None

    def prepare_data(self) -> None:
        """Runs on one process: download the data file or train the demo tokenizer, so setup() only reads."""
        self._records()
        self.tokenizer_file()

    def _records(self) -> list[dict[str, str]]:
        if self.data_path == DEMO and self.format == "text":
            return [{"text": doc} for doc in prose(*(() if self.demo_records is None else (self.demo_records,)))]
        if self.data_path == DEMO and self.format == "preference":
            return [preference_record(r, i, DEMO) for i, r in enumerate(preference_records(self.demo_records))]
        if self.data_path == DEMO:
            return instruction_records(self.demo_records)
        return load_records(self.data_path, self.cache_dir, self.format)

    def tokenizer_file(self) -> Path:
        if self.tokenizer_path is None:
            return demo_tokenizer_file(self.demo_vocab_size, self.cache_dir)
        return Path(self.tokenizer_path)

    def load_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            self.tokenizer = Tokenizer(self.tokenizer_file())
        return self.tokenizer

    @property
    def prompt_format(self) -> PromptFormat:
        """The run's prompt format (``prompts.resolve_format``): what training renders, and what the callbacks and
        later commands prompt in."""
        return resolve_format(self.format, self.chat_template, self.load_tokenizer())

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tokenizer = self.load_tokenizer()
        records = self._records()
        fmt = self.prompt_format
        train_ids, val_ids = split_records(len(records), self.num_samples, self.val_size, self.seed)
        source = str(self.data_path)
        if self.format == "preference":
            self.train_set = PreferenceDataset([records[i] for i in train_ids], tokenizer, self.max_seq_len, source,
                                               limit=self.num_samples, record_ids=train_ids, prompt_format=fmt)
            self.val_set = PreferenceDataset([records[i] for i in val_ids], tokenizer, self.max_seq_len, source,
                                             record_ids=val_ids, prompt_format=fmt) if val_ids else None
            log.info("Preference data %s in %s: %d train / %d val pairs (max_seq_len %d; %d dropped, %d truncated)",
                     source, fmt.description, len(self.train_set), len(self.val_set or []), self.max_seq_len,
                     self.train_set.stats.dropped, self.train_set.stats.truncated)
            return
        # The training set is the first num_samples records of the shuffled order that fit max_seq_len.
        self.train_set = SupervisedDataset([records[i] for i in train_ids], tokenizer, self.max_seq_len,
                                           self.mask_prompt, source, limit=self.num_samples, record_ids=train_ids,
                                           format=self.format, prompt_format=fmt)
        self.val_set = SupervisedDataset([records[i] for i in val_ids], tokenizer, self.max_seq_len, self.mask_prompt,
                                         source, record_ids=val_ids, format=self.format,
                                         prompt_format=fmt) if val_ids else None
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
            log.info("%s data %s in %s: %d train / %d val examples (max_seq_len %d; %d dropped, %d truncated)",
                     self.format.capitalize(), source, fmt.description, len(self.train_set), len(self.val_set or []),
                     self.max_seq_len, self.train_set.stats.dropped, self.train_set.stats.truncated)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def collator(self) -> DataCollatorForSupervisedDataset | PreferenceCollator:
        kind = PreferenceCollator if self.format == "preference" else DataCollatorForSupervisedDataset
        return kind(self.load_tokenizer().pad_id, self.pad_to_multiple_of)

    def _loader(self, dataset: SupervisedDataset, sampler: Sampler | list[list[int]]) -> DataLoader:
        collate = self.collator()
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
