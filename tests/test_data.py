import io
import json
import re

import pytest

from llama_lora.data import (
    AlpacaDataModule,
    DataCollatorForSupervisedDataset,
    ResumableBatchSampler,
    SupervisedDataset,
    load_records,
    preprocess,
    tokenize_record,
)
from llama_lora.demo import instruction_records
from llama_lora.loss import IGNORE_INDEX
from llama_lora.prompts import format_prompt

REC_INPUT = {"instruction": "Sort the words.", "input": "pear apple", "output": "apple pear"}
REC_NO_INPUT = {"instruction": "Name a color.", "input": "", "output": "Green."}


def test_templates_exact():
    assert format_prompt(REC_INPUT) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSort the words.\n\n### Input:\npear apple\n\n### Response:")
    assert format_prompt(REC_NO_INPUT) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.\n\n### Response:")
    assert format_prompt({"instruction": "x", "output": "y"}) == format_prompt({"instruction": "x", "input": "",
                                                                              "output": "y"})


@pytest.mark.parametrize("rec", [REC_INPUT, REC_NO_INPUT])
def test_masking_and_prefix(demo_tok, rec):
    ids, labels, truncated = tokenize_record(rec, demo_tok, 512)
    prompt_ids = [demo_tok.bos_id] + demo_tok.encode(format_prompt(rec))
    assert ids[: len(prompt_ids)] == prompt_ids and not truncated  # prefix property
    n = len(prompt_ids)
    assert labels[:n] == [IGNORE_INDEX] * n  # BOS and prompt masked
    assert demo_tok.decode(ids[1:n]) == format_prompt(rec)  # masked positions are exactly the template
    assert labels[n] == demo_tok.encode(rec["output"])[0]  # first label: first response token
    assert labels[-1] == ids[-1] == demo_tok.eos_id == 2  # EOS is the last label, as id 2
    assert demo_tok.decode(labels[n:-1]) == rec["output"]
    unmasked = tokenize_record(rec, demo_tok, 512, mask_prompt=False)[1]
    assert unmasked[0] == IGNORE_INDEX and unmasked[1:] == ids[1:]


def test_empty_output_trains_on_eos(demo_tok):
    ids, labels, _ = tokenize_record({"instruction": "Say nothing.", "input": "", "output": ""}, demo_tok)
    assert [x for x in labels if x != IGNORE_INDEX] == [demo_tok.eos_id]


def test_truncation_and_drop_counts(demo_tok):
    short = {"instruction": "Hi.", "input": "", "output": "apple " * 100}
    prompt_len = 1 + len(demo_tok.encode(format_prompt(short)))
    long_prompt = {"instruction": "apple " * 200, "input": "", "output": "x"}
    examples, stats = preprocess([short, long_prompt, REC_NO_INPUT], demo_tok, max_seq_len=prompt_len + 10)
    assert (stats.kept, stats.dropped, stats.truncated) == (2, 1, 1)
    cut = examples[0]
    assert len(cut["input_ids"]) == prompt_len + 10 and cut["labels"][-1] != demo_tok.eos_id
    # A prompt that exactly fills max_seq_len leaves no target: dropped too.
    assert tokenize_record(short, demo_tok, max_seq_len=prompt_len) is None


def test_collator_padding(demo_tok):
    a = {"input_ids": [1, 5, 6, 7, 2], "labels": [-100, -100, 6, 7, 2]}
    b = {"input_ids": [1, 9, 2], "labels": [-100, -100, 2]}
    batch = DataCollatorForSupervisedDataset(pad_id=0)([a, b])
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 9, 2, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7, 2], [-100, -100, 2, -100, -100]]
    assert batch["n_tokens"].item() == 8 and batch["n_targets"].item() == 4
    padded = DataCollatorForSupervisedDataset(pad_id=0, pad_to_multiple_of=8)([a, b])
    assert padded["input_ids"].shape == (2, 8) and padded["labels"][:, 5:].eq(-100).all()


def test_sampler_determinism_and_epochs():
    lengths = list(range(50))
    a = list(ResumableBatchSampler(lengths, 4, seed=3))
    b = list(ResumableBatchSampler(lengths, 4, seed=3))
    assert a == b and sorted(item.index for batch in a for item in batch) == lengths
    assert a != list(ResumableBatchSampler(lengths, 4, seed=4))
    s = ResumableBatchSampler(lengths, 4, seed=3)
    first = list(s)
    s.set_epoch(1)  # as Lightning does before every epoch (it reaches us as the batch sampler's `.sampler`)
    second = list(s)
    assert first == a and second != first and s.state_dict() == {"seed": 3, "epoch": 1, "batch_index": 13}
    assert list(s) == [] and s.sampler is s  # no epoch of its own: exhausted until set_epoch moves on


def test_sampler_mid_epoch_restart():
    lengths = [i % 17 for i in range(60)]
    for group in (False, True):
        full = ResumableBatchSampler(lengths, 4, seed=1, group_by_length=group)
        full.set_epoch(2)
        expected = list(full)
        s = ResumableBatchSampler(lengths, 4, seed=1, group_by_length=group)
        s.set_epoch(2)
        it = iter(s)
        head = [next(it) for _ in range(5)]
        state = s.state_dict()
        assert state == {"seed": 1, "epoch": 2, "batch_index": 5}
        resumed = ResumableBatchSampler(lengths, 4, seed=1, group_by_length=group)
        resumed.load_state_dict(state)
        assert len(resumed) == len(expected)  # the epoch's length, as Lightning expects
        assert head + list(resumed) == expected
    with pytest.raises(ValueError, match="same data.seed"):
        ResumableBatchSampler(lengths, 4, seed=2).load_state_dict(state)


def test_sampler_ranks_partition_the_global_batch():
    lengths = list(range(38))  # the 2-example tail splits across 2 ranks
    single = list(ResumableBatchSampler(lengths, 4, seed=0))
    ranks = [list(ResumableBatchSampler(lengths, 2, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch


def test_length_grouping_cuts_padding():
    import random

    lengths = [random.Random(i).randint(10, 500) for i in range(400)]

    def padded(s):
        return sum(len(b) * max(lengths[item.index] for item in b) for b in s)

    plain, grouped = ResumableBatchSampler(lengths, 8, seed=0), ResumableBatchSampler(lengths, 8, seed=0,
                                                                                      group_by_length=True)
    assert sorted(item.index for b in grouped for item in b) == list(range(400))
    assert padded(grouped) < 0.75 * padded(plain)


def test_datamodule_demo_end_to_end(tmp_path, demo_tok):
    dm = AlpacaDataModule(data_path="demo", tokenizer_path=str(demo_tok.path), val_size=50, micro_batch_size=8, seed=7,
                          cache_dir=str(tmp_path))
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == len(instruction_records()) and len(dm.val_set) == 50
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] % 8 == 0
    # Seeded split: the same seed gives the same validation set, another seed another.
    same = AlpacaDataModule(data_path="demo", tokenizer_path=str(demo_tok.path), val_size=50, seed=7)
    other = AlpacaDataModule(data_path="demo", tokenizer_path=str(demo_tok.path), val_size=50, seed=8)
    same.setup(), other.setup()
    assert same.val_set.examples == dm.val_set.examples != other.val_set.examples
    # num_samples takes a seeded subset.
    sub = AlpacaDataModule(data_path="demo", tokenizer_path=str(demo_tok.path), num_samples=200, val_size=20)
    sub.setup()
    assert len(sub.train_set) == 200 and len(sub.val_set) == 20


def test_demo_tokenizer_is_trained_and_cached(tmp_path):
    dm = AlpacaDataModule(data_path="demo", tokenizer_path=None, cache_dir=str(tmp_path), demo_records=300,
                          demo_vocab_size=400)
    dm.prepare_data()
    files = list(tmp_path.glob("demo-tokenizer-400-*.model"))
    assert len(files) == 1 and dm.load_tokenizer().vocab_size == 400
    mtime = files[0].stat().st_mtime_ns
    AlpacaDataModule(data_path="demo", tokenizer_path=None, cache_dir=str(tmp_path), demo_records=300,
                     demo_vocab_size=400).prepare_data()
    assert files[0].stat().st_mtime_ns == mtime


def test_local_jsonl_and_cached_url(tmp_path, monkeypatch):
    recs = [REC_INPUT, REC_NO_INPUT]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert load_records(tmp_path / "d.jsonl") == recs
    # A URL already in the cache is read from there, with no network access.
    import hashlib

    url = "https://example.invalid/alpaca_data.json"
    cached = tmp_path / "cache" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-alpaca_data.json"
    cached.parent.mkdir()
    cached.write_text(json.dumps(recs))
    assert load_records(url, cache_dir=tmp_path / "cache") == recs


# ----- bad input: one clear error each -----

def write(tmp_path, content, name="data.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_bad_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Data file not found: .*nope.json"):
        load_records(tmp_path / "nope.json")


def test_bad_invalid_json(tmp_path):
    with pytest.raises(ValueError, match=r"data.json: invalid JSON at line 3, column 5"):
        load_records(write(tmp_path, '[\n{"instruction": "a",\n    oops}\n]'))
    with pytest.raises(ValueError, match=r"data.jsonl: invalid JSON on line 2"):
        load_records(write(tmp_path, '{"instruction": "a", "output": "b"}\n{bad\n', "data.jsonl"))


def test_bad_top_level(tmp_path):
    with pytest.raises(ValueError, match="top level is a JSON dict, expected a list"):
        load_records(write(tmp_path, {"instruction": "a"}))


def test_bad_record_not_object(tmp_path):
    with pytest.raises(ValueError, match="data.json: record 1 is a str, expected an object"):
        load_records(write(tmp_path, [REC_INPUT, "just text"]))


@pytest.mark.parametrize("field", ["instruction", "output"])
def test_bad_missing_field(tmp_path, field):
    rec = {k: v for k, v in REC_INPUT.items() if k != field}
    with pytest.raises(ValueError, match=f"data.json: record 2 has no '{field}' field"):
        load_records(write(tmp_path, [REC_INPUT, REC_NO_INPUT, rec]))


def test_bad_non_string_field(tmp_path):
    with pytest.raises(ValueError, match="record 0 field 'input' is a int, expected a string"):
        load_records(write(tmp_path, [{**REC_INPUT, "input": 3}]))


def test_bad_empty_after_filtering(demo_tok):
    with pytest.raises(ValueError, match="no records left after preprocessing .*raise max_seq_len"):
        SupervisedDataset([REC_INPUT], demo_tok, max_seq_len=5, source="data.json")


def test_bad_unfetchable_url(tmp_path):
    with pytest.raises(ValueError, match="Could not download https://127.0.0.1:9/a.json .*local file"):
        load_records("https://127.0.0.1:9/a.json", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Only https URLs"):
        load_records("http://example.com/a.json", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written left in the cache


# ----- the real LLaMA-2 tokenizer on real Alpaca records -----

def test_real_alpaca_token_stats(assets):
    from llama_lora.tokenizer import Tokenizer

    tok = Tokenizer(assets / "tokenizer.model")
    records = load_records(assets / "alpaca_5000.json")
    assert len(records) == 5000 and sum(bool(r["input"]) for r in records) == 1943
    lengths = sorted(len(tokenize_record(r, tok, 10**6)[0]) for r in records)
    _, stats = preprocess(records, tok, max_seq_len=512)
    pct = {p: lengths[int(p / 100 * (len(lengths) - 1))] for p in (50, 90, 99)}
    print(f"\nalpaca_5000 token lengths: min {lengths[0]} median {pct[50]} p90 {pct[90]} p99 {pct[99]} "
          f"max {lengths[-1]} mean {sum(lengths) / len(lengths):.1f}; at 512: kept {stats.kept}, "
          f"dropped {stats.dropped}, truncated {stats.truncated}")
    assert stats.dropped == sum(1 for r in records if len(tokenize_record(r, tok, 10**6)[0])
                                - len(tok.encode(r["output"])) - 1 >= 512)
    assert stats.truncated == sum(n > 512 for n in lengths) - stats.dropped
    assert stats.kept + stats.dropped == 5000
    assert 40 <= pct[50] <= 400 and lengths[-1] > 512  # Alpaca has a long tail past 512


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_size_cap_timeout_and_atomic_write(tmp_path, monkeypatch):
    """Over the size cap: refused, nothing left in the cache. A timeout: one line suggesting a local file. Each
    request carries a timeout. A complete download lands under its final name only at the end."""
    import llama_lora.data.records as data

    seen = []

    def fake_open(url, timeout):
        seen.append(timeout)
        return _FakeResponse(json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 50).encode())

    monkeypatch.setattr(data, "_open_url", fake_open)
    monkeypatch.setattr(data, "DOWNLOAD_MAX_BYTES", 100)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="larger than"):
        data.download("https://example.invalid/big.json", cache)
    assert list(cache.iterdir()) == [] and seen == [data.DOWNLOAD_TIMEOUT_S]

    def timing_out(url, timeout):
        raise TimeoutError("timed out")

    monkeypatch.setattr(data, "_open_url", timing_out)
    with pytest.raises(ValueError, match="Could not download .*timed out.*local file"):
        data.download("https://example.invalid/slow.json", cache)
    assert list(cache.iterdir()) == []

    monkeypatch.setattr(data, "_open_url", fake_open)
    monkeypatch.setattr(data, "DOWNLOAD_MAX_BYTES", 1 << 20)
    path = data.download("https://example.invalid/ok.json", cache)
    assert [p.name for p in cache.iterdir()] == [path.name] and len(data.load_records(path)) == 50


def test_download_refuses_a_redirect_to_http():
    import urllib.error

    from llama_lora.data.records import _HttpsOnlyRedirects

    handler = _HttpsOnlyRedirects()
    with pytest.raises(urllib.error.URLError, match="not https"):
        handler.redirect_request(None, None, 302, "Found", {}, "http://example.invalid/alpaca.json")


# ----- regression: the user's paths (issue "Real users' paths") -----

def test_num_samples_is_the_number_of_training_examples_on_real_alpaca(assets):
    """lora_amp.yaml's data settings with --data.num_samples 200, as the README tells users to reproduce the seed:
    exactly 200 training examples, and a non-empty validation set that shares no record with them."""
    import yaml
    from conftest import ROOT

    data = yaml.safe_load((ROOT / "configs" / "lora_amp.yaml").read_text())["data"]
    data.update(data_path=str(assets / "alpaca_5000.json"), tokenizer_path=str(assets / "tokenizer.model"),
                num_samples=200, num_workers=0)
    dm = AlpacaDataModule(**data)
    dm.setup("fit")
    assert len(dm.train_set) == 200
    assert dm.val_set is not None and len(dm.val_set) > 0
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)


def test_validation_shrinks_never_the_training_set(demo_tok, caplog):
    """Fewer records than num_samples + val_size: validation takes what is left, with one line saying so."""
    import logging

    with caplog.at_level(logging.INFO):
        dm = AlpacaDataModule(data_path="demo", tokenizer_path=str(demo_tok.path), demo_records=300,
                              num_samples=250, val_size=100)
        dm.setup()
    assert len(dm.train_set) == 250 and len(dm.val_set) == 50
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    assert any("validation shrunk to 50" in r.getMessage() for r in caplog.records)
    everything = AlpacaDataModule(data_path="demo", tokenizer_path=str(demo_tok.path), demo_records=300,
                                  num_samples=400, val_size=10)
    everything.setup()
    assert len(everything.train_set) == 300 and everything.val_set is None


def _rank_batches(n, batch_size, world, group, accumulate, counts):
    lengths = [(i * 37) % 23 + 1 for i in range(n)]
    return [list(ResumableBatchSampler(lengths, batch_size, seed=n, group_by_length=group, num_replicas=world,
                                       rank=r, target_counts=counts, accumulate=accumulate)) for r in range(world)]


def test_sampler_every_rank_gets_an_example_on_every_step_and_the_union_is_the_epoch():
    """World sizes 1-8, micro-batches 1-8, accumulation 1-4, dataset sizes 1-200, length grouping on and off: no rank
    is ever empty, every rank has the same number of steps, and the real examples of all ranks and steps are the
    epoch, each record exactly once. Padding examples (to fill a rank) carry no targets and no window weight."""
    checked = 0
    for world in range(1, 9):
        for batch_size in range(1, 9):
            for n in sorted({1, 2, 3, world - 1, world, world + 1, batch_size * world - 1, batch_size * world + 1,
                             *range(1 + (world * batch_size) % 7, 201, 9), 200} - {0}):
                group, accumulate = (n + world) % 2 == 0, 1 + (n + batch_size) % 4
                counts = [(i % 5) + 1 for i in range(n)]
                ranks = _rank_batches(n, batch_size, world, group, accumulate, counts)
                steps = {len(r) for r in ranks}
                assert len(steps) == 1, (world, batch_size, n)
                seen = []
                for step in range(steps.pop()):
                    windows = set()
                    for r in ranks:
                        local = r[step]
                        assert local, f"empty rank: world {world}, micro-batch {batch_size}, {n} examples"
                        assert len(local) <= batch_size
                        windows |= {item.window_targets for item in local}
                        seen += [item.index for item in local if not item.padding]
                    assert len(windows) == 1  # every rank divides by the same window total
                assert sorted(seen) == list(range(n)), (world, batch_size, n)
                checked += 1
    assert checked > 1500


@pytest.mark.parametrize("world, n, expected", [(3, 4, [2, 1, 1]), (4, 5, [2, 1, 1, 1]), (6, 200, None)])
def test_short_last_batch_splits_evenly(world, n, expected):
    ranks = [list(ResumableBatchSampler(list(range(n)), 4, shuffle=False, num_replicas=world, rank=r))
             for r in range(world)]
    last = [len(r[-1]) for r in ranks]
    if expected is not None:
        assert last == expected
    assert all(len(b) >= 1 for r in ranks for b in r)  # validation with val_size 200 on 6 ranks: none empty


def test_padding_example_weighs_nothing(demo_tok):
    from llama_lora.data import BatchItem

    ds = SupervisedDataset(instruction_records(10), demo_tok, 128)
    collate = DataCollatorForSupervisedDataset(pad_id=0)
    batch = collate([ds[BatchItem(3, 17, padding=True)]])
    assert batch["n_targets"].item() == 0 and batch["n_tokens"].item() == 0
    assert batch["labels"].eq(IGNORE_INDEX).all() and batch["n_targets_window"].item() == 17


# ----- raw text for continued pretraining (format: text) -----

def test_text_documents_become_blocks_of_every_token(tmp_path, demo_tok):
    """A .txt file's blank-line-separated documents, each as BOS + text + EOS, concatenated and cut into blocks of
    max_seq_len: every token is a target (but the first of a block), nothing is lost, and JSON/JSONL with a text field
    read the same documents."""
    docs = ["apple is red. " * 9, "A lemon is yellow.", "7 plus 5 is 12. " * 30]
    (tmp_path / "d.txt").write_text("\n\n".join(docs) + "\n\n\n")
    (tmp_path / "d.json").write_text(json.dumps([docs[0], {"text": docs[1]}, docs[2]]))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    records = [{"text": d.strip()} for d in docs]
    for name in ("d.txt", "d.json", "d.jsonl"):
        assert [{"text": r["text"].strip()} for r in load_records(tmp_path / name, format="text")] == records
    ds = SupervisedDataset(records, demo_tok, max_seq_len=32, format="text")
    stream = [t for r in records for t in demo_tok.encode(r["text"], bos=True, eos=True)]
    assert [t for e in ds.examples for t in e["input_ids"]] == stream
    assert all(len(e["input_ids"]) == 32 for e in ds.examples[:-1]) and len(ds.examples[-1]["input_ids"]) <= 32
    assert all(e["labels"] == [IGNORE_INDEX] + e["input_ids"][1:] for e in ds.examples)
    dm = AlpacaDataModule(data_path=str(tmp_path / "d.txt"), format="text", tokenizer_path=str(demo_tok.path),
                          val_size=1, max_seq_len=32)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) >= len(ds.examples) - 1


@pytest.mark.parametrize("name, content, message", [
    ("d.json", '[{"body": "x"}]', "record 0 has no 'text' field"),
    ("d.json", '[{"text": 3}]', "record 0 field 'text' is a int, expected a string"),
    ("d.jsonl", '{"text": "a"}\n[1, 2]\n', "record 1 is a list, expected a string or an object with 'text'"),
    ("d.txt", b"\xff\xfe text", "not UTF-8 text (byte 0); text data is UTF-8"),
])
def test_bad_text_data_says_what_is_wrong(tmp_path, name, content, message):
    path = write(tmp_path, content, name) if isinstance(content, str) else tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_records(path, format="text")


def test_empty_text_has_nothing_to_train_on(tmp_path, demo_tok):
    (tmp_path / "e.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no text to train on"):
        SupervisedDataset(load_records(tmp_path / "e.txt", format="text"), demo_tok, 32, source="e.txt",
                          format="text")


# ----- packing -----

def _first_fit_decreasing_by_hand(lengths, capacity):
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = next((r for r in range(len(rows)) if room[r] >= lengths[i]), None)
        if r is None:
            rows.append([]), room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def test_packing_is_first_fit_decreasing():
    import random

    from llama_lora.data import pack_first_fit_decreasing

    for seed in range(20):
        rng = random.Random(seed)
        lengths = [rng.randint(1, 128) for _ in range(rng.randint(1, 300))]
        rows = pack_first_fit_decreasing(lengths, 128)
        assert rows == _first_fit_decreasing_by_hand(lengths, 128)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in r) <= 128 for r in rows)


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_packed_rows_keep_each_examples_tokens_labels_and_segment(demo_tok, mask_prompt):
    """Each example keeps its tokens and targets in its row; its first token, which nothing predicts alone, is no
    target in the row either (else the previous example's EOS would learn to predict the next one's BOS)."""
    from llama_lora.data import PackedDataset

    ds = SupervisedDataset(instruction_records(40), demo_tok, 128, mask_prompt=mask_prompt)
    packed = PackedDataset(ds, 128)
    assert len(packed) < len(ds) / 2 and all(len(e["input_ids"]) <= 128 for e in packed.examples)
    seen = []
    for row, e in zip(packed.rows, packed.examples):
        start = 0
        for k, i in enumerate(row, 1):
            n = len(ds.examples[i]["input_ids"])
            assert e["input_ids"][start : start + n] == ds.examples[i]["input_ids"]
            assert e["labels"][start : start + n] == [-100] + ds.examples[i]["labels"][1:]
            assert e["segment_ids"][start : start + n] == [k] * n
            start += n
        seen += row
    assert sorted(seen) == list(range(len(ds)))
    assert sum(packed.target_counts) == sum(ds.target_counts)  # the loss weighs the same tokens
    batch = DataCollatorForSupervisedDataset(pad_id=0)([packed[0], packed[1]])
    assert batch["segment_ids"].shape == batch["input_ids"].shape
    assert batch["segment_ids"][batch["labels"] != -100].min() > 0  # every target inside an example


# ----- data as users have it -----

def test_data_as_users_have_it_is_read(tmp_path):
    """A UTF-8 byte-order mark, "input": null, and JSON lines saved as .json are read, not refused."""
    records = [{"instruction": "Say hi.", "input": None, "output": "Hi."}, {"instruction": "Add.", "input": "1 2",
                                                                          "output": "3"}]
    bom = tmp_path / "bom.json"
    bom.write_bytes("\ufeff".encode() + json.dumps(records).encode())
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for path in (bom, lines):
        got = load_records(path)
        assert got[0]["input"] == "" and got[1] == records[1], path
    assert format_prompt(load_records(bom)[0]) == format_prompt({"instruction": "Say hi.", "input": ""})
    broken = tmp_path / "broken.json"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(ValueError, match="invalid JSON on line 2"):
        load_records(broken)


def test_dropping_many_records_for_length_warns_with_the_length_that_keeps_them(demo_tok, caplog):
    import logging

    records = [{"instruction": "word " * 80, "input": "", "output": "x"}] * 3 + instruction_records(7)
    fits = 2 + max(len(demo_tok.encode(format_prompt(r), bos=True)) for r in records[3:])
    with caplog.at_level(logging.INFO):
        examples, stats = preprocess(records, demo_tok, max_seq_len=fits)
    longest = len(demo_tok.encode(format_prompt(records[0]), bos=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert stats.dropped == 3 and len(warnings) == 1
    assert "3 of 10 records dropped" in warnings[0] and f"data.max_seq_len {longest + 1} keeps them all" in warnings[0]
