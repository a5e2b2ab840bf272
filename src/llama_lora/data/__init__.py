"""Alpaca data for training, by concern:

- ``records``: records from a file or an https URL, validated (download, JSON / JSON lines, text);
- ``tokenize``: records to token ids and masked labels (Alpaca's template, EOS), preference pairs to two such
  sequences, raw text to blocks;
- ``packing``: examples into rows (first-fit decreasing);
- ``batches``: the datasets, the collator and the resumable sampler, and what passes between them (``BatchItem``,
  ``Batch``);
- ``datamodule``: the Lightning data module that puts them together.
"""

from .batches import (
    Batch,
    BatchItem,
    DataCollatorForSupervisedDataset,
    PackedDataset,
    PreferenceCollator,
    PreferenceDataset,
    ResumableBatchSampler,
    SupervisedDataset,
)
from .datamodule import DEMO, AlpacaDataModule, split_records
from .packing import pack_first_fit_decreasing
from .records import ALPACA_URL, download, load_records, preference_record, validate_record, validate_text
from .tokenize import PreprocessStats, preprocess, preprocess_pairs, render_completion, text_blocks, tokenize_record

__all__ = ["ALPACA_URL", "AlpacaDataModule", "Batch", "BatchItem", "DEMO", "DataCollatorForSupervisedDataset",
           "PackedDataset", "PreferenceCollator", "PreferenceDataset", "PreprocessStats", "ResumableBatchSampler",
           "SupervisedDataset", "download", "load_records", "pack_first_fit_decreasing", "preference_record",
           "preprocess", "preprocess_pairs", "render_completion", "split_records", "text_blocks", "tokenize_record",
           "validate_record", "validate_text"]
