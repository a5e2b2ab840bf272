"""Records to token ids and labels: Alpaca prompts masked (-100), EOS appended; raw text cut into blocks."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ..loss import IGNORE_INDEX
from ..prompts import FORMATS, ChatFormat, PromptFormat
from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

DROP_WARNING = 0.1  # more than this share of records dropped for length is a warning, not a note

@dataclass
class PreprocessStats:
    kept: int = 0
    dropped: int = 0  # the prompt alone did not fit in max_seq_len
    longest_dropped: int = 0  # the longest prompt dropped, in tokens: max_seq_len above it keeps every record
    truncated: int = 0  # the response was cut to fit
    identical: int = 0  # preference pairs whose chosen equals rejected: nothing to prefer
    empty: int = 0  # preference pairs with an empty completion


ALPACA = FORMATS["alpaca"]


def tokenize_record(record: dict, tokenizer: Tokenizer, max_seq_len: int = 512, mask_prompt: bool = True,
                    prompt_format: PromptFormat = ALPACA) -> tuple[list[int], list[int], bool] | None:
    """(input_ids, labels, truncated) for one record rendered in ``prompt_format`` (``PromptFormat.render``), or None
    when nothing to train on fits in ``max_seq_len`` (an Alpaca prompt, or a conversation's first assistant turn, starts
    beyond it). Labels are the ids where the record trains (the response and its EOS; each assistant turn and its end of
    turn) and -100 elsewhere, or, with ``mask_prompt`` off, every id after the first. A cut response loses its end
    token: it did not end there."""
    ids, trained = prompt_format.render(record, tokenizer)
    if True not in trained or trained.index(True) >= max_seq_len:
        return None
    truncated = len(ids) > max_seq_len
    ids, trained = ids[:max_seq_len], trained[:max_seq_len]
    if mask_prompt:
        labels = [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]
    else:
        labels = [IGNORE_INDEX] + ids[1:]
    return ids, labels, truncated


def preprocess(records: Sequence[dict], tokenizer: Tokenizer, max_seq_len: int = 512, mask_prompt: bool = True,
               limit: int | None = None, prompt_format: PromptFormat = ALPACA
               ) -> tuple[list[dict[str, list[int]]], PreprocessStats]:
    """Tokenized examples of ``records`` in order; with ``limit``, stop once that many are kept. Each example keeps the
    position of its record in ``records`` as ``index``."""
    examples, stats = [], PreprocessStats()
    for i, rec in enumerate(records):
        if limit is not None and len(examples) >= limit:
            break
        out = tokenize_record(rec, tokenizer, max_seq_len, mask_prompt, prompt_format)
        if out is None:
            stats.dropped += 1
            _, trained = prompt_format.render(rec, tokenizer)
            stats.longest_dropped = max(stats.longest_dropped, trained.index(True) if True in trained else 0)
            continue
        ids, labels, truncated = out
        stats.truncated += truncated
        examples.append({"input_ids": ids, "labels": labels, "index": i})
    stats.kept = len(examples)
    _report(stats, max_seq_len)
    return examples, stats


def _report(stats: PreprocessStats, max_seq_len: int) -> None:
    total = stats.kept + stats.dropped + stats.identical + stats.empty
    if stats.dropped > DROP_WARNING * total:
        log.warning("%d of %d records dropped: their prompt alone is longer than max_seq_len=%d; data.max_seq_len %d "
                    "keeps them all", stats.dropped, total, max_seq_len, stats.longest_dropped + 1)
    elif stats.dropped or stats.truncated:
        log.info("preprocess: kept %d records, dropped %d (prompt longer than max_seq_len=%d), truncated %d",
                 stats.kept, stats.dropped, max_seq_len, stats.truncated)
    if stats.identical or stats.empty:
        log.warning("preprocess: dropped %d preference pairs whose chosen equals rejected and %d with an empty "
                    "completion, of %d", stats.identical, stats.empty, total)


def render_completion(prompt: dict, completion: str, tokenizer: Tokenizer, prompt_format: PromptFormat
                      ) -> tuple[list[int], list[bool]]:
    """A preference completion after its prompt (``records.preference_record``'s forms): the ids, and which of them
    are the completion, its end of turn included. The prompt is rendered in ``prompt_format``; a conversation's
    earlier assistant turns are prompt, not completion. A text prompt (Anthropic HH's shared turns) is used as
    written: BOS, the text, then the completion and EOS."""
    if "text" in prompt:
        head = tokenizer.encode(prompt["text"], bos=True)
        tail = tokenizer.encode(completion, eos=True)
        return head + tail, [False] * len(head) + [True] * len(tail)
    if "messages" in prompt:
        messages = prompt["messages"] + [{"role": "assistant", "content": completion}]
        if isinstance(prompt_format, ChatFormat):
            ids, trained = prompt_format.render({"messages": messages}, tokenizer)
        elif [m["role"] for m in prompt["messages"]] == ["user"]:  # one question: Alpaca's prompt can ask it
            ids, trained = prompt_format.render({"instruction": messages[0]["content"], "input": "",
                                                 "output": completion}, tokenizer)
        else:
            raise ValueError(f"a preference prompt of {len(prompt['messages'])} messages needs a chat template, and "
                             f"the run's prompt is {prompt_format.description}; set data.chat_template")
    else:
        ids, trained = prompt_format.render({**prompt, "output": completion}, tokenizer)
    last = len(trained) - 1 - trained[::-1].index(True)  # the completion: the last trained span alone
    first = last
    while first > 0 and trained[first - 1]:
        first -= 1
    return ids, [first <= i <= last for i in range(len(ids))]


def preprocess_pairs(records: Sequence[dict], tokenizer: Tokenizer, max_seq_len: int = 512, limit: int | None = None,
                     prompt_format: PromptFormat = ALPACA) -> tuple[list[dict], PreprocessStats]:
    """Tokenized preference pairs: each a dict of ``chosen`` and ``rejected`` (input_ids, labels) with the prompt
    and anything after the completion masked (-100), and ``index``, the record's position. Pairs whose chosen equals
    rejected or with an empty completion are dropped and counted, as are those whose prompt does not fit in
    ``max_seq_len`` (SFT's warning); a completion that does not fit is cut, and loses its end of turn."""
    examples, stats = [], PreprocessStats()
    for i, rec in enumerate(records):
        if limit is not None and len(examples) >= limit:
            break
        if rec["chosen"] == rec["rejected"]:
            stats.identical += 1
            continue
        if not rec["chosen"].strip() or not rec["rejected"].strip():
            stats.empty += 1
            continue
        pair, truncated = {"index": i}, False
        for side in ("chosen", "rejected"):
            ids, trained = render_completion(rec["prompt"], rec[side], tokenizer, prompt_format)
            start = trained.index(True)
            if start >= max_seq_len:
                stats.longest_dropped = max(stats.longest_dropped, start)
                break
            truncated |= len(ids) > max_seq_len
            ids, trained = ids[:max_seq_len], trained[:max_seq_len]
            pair[side] = (ids, [t if m else IGNORE_INDEX for t, m in zip(ids, trained)])
        else:
            stats.truncated += truncated
            examples.append(pair)
            continue
        stats.dropped += 1
    stats.kept = len(examples)
    _report(stats, max_seq_len)
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
