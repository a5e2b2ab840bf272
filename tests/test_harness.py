"""The project's model as an lm-evaluation-harness LM (``llama_lora.harness``, ``evaluate.py --tasks``), checked
against the harness's own ``hf`` backend on the merged HF folder of the same tiny trained adapter: the per-example
log-likelihoods of a local multiple-choice task within 1e-4 in fp32 and the same accuracy, the same greedy
generations and exact match on a local generation task. Local tasks: the harness's task YAML with dataset_path json
and local data_files (no internet here). Skipped without lm-eval (the `eval` extra) or transformers."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, fit, write_tiny_config

from llama_lora.config import LlamaConfig
from llama_lora.demo import WORDS
from llama_lora.weights import build_model, save_meta

COLOURS = sorted({colour for _, colour in WORDS.values()})


def local_tasks(folder: Path) -> Path:
    """Two tasks on the demo world: multiple choice (a word's colour among four) and generation (sums, exact match)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for i, (word, (_, colour)) in enumerate(sorted(WORDS.items())[:16]):
        others = [c for c in COLOURS if c != colour]
        choices = sorted([colour, *others[i % len(others):][:3], *others[:max(0, 3 - len(others[i % len(others):]))]])
        docs.append({"question": f"The colour of the {word} is", "choices": choices, "label": choices.index(colour)})
    (folder / "colours.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    sums = [{"a": a, "b": b, "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 2), (7, 1), (2, 6), (4, 4)]]
    (folder / "sums.jsonl").write_text("".join(json.dumps(d) + "\n" for d in sums))
    (folder / "demo_colours.yaml").write_text(f"""task: demo_colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'colours.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    (folder / "demo_sums.yaml").write_text(f"""task: demo_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'sums.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "What is {{{{a}}}} plus {{{{b}}}}?"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
""")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny fp32 Meta base with the demo tokenizer beside it, an adapter trained on it for a few steps, and the
    adapter merged into an HF folder (fp32: merged = unmerged to rounding)."""
    pytest.importorskip("lm_eval", reason='lm-evaluation-harness is the eval extra: pip install -e ".[eval]"')
    d, cache = tmp_path_factory.mktemp("harness"), tmp_path_factory.mktemp("cache")
    config = LlamaConfig.from_name("tiny")
    save_meta(build_model(config, plan=torch.float32, seed=4).state_dict(), config, d / "base")
    fit(write_tiny_config(d, cache, trainer={"max_steps": 4, "limit_val_batches": 0},
                          model={"checkpoint_dir": str(d / "base"), "model": None,
                                 "lora": {"targets": ["wq", "wv", "w2"], "r": 4, "alpha": 8, "dropout": 0.0}}),
        "--model.optimizer.init_args.lr", "0.05")
    shutil.copyfile(next(cache.glob("demo-tokenizer-512-*.model")), d / "base" / "tokenizer.model")
    ckpt = d / "ckpt" / "last.ckpt"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge.py"), "--adapter", str(ckpt), "--out_dir",
                           str(d / "merged"), "--format", "hf"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ckpt, d / "merged", local_tasks(d / "tasks")


def ours(ckpt: Path, tasks: Path, names: list[str], batch_size: int = 4) -> dict:
    from llama_lora import harness
    from llama_lora.trained_run import open_run

    run = open_run(ckpt)
    lm = harness.LlamaLoRALM(run.build(run.plan_for("cpu", "32-true", "fp32")), run.tokenizer(), run.prompt_format,
                             batch_size)
    return harness.run_tasks(lm, names, include_path=str(tasks))


def theirs(merged: Path, tasks: Path, names: list[str]) -> dict:
    transformers = pytest.importorskip("transformers")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=128)
    return simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(tasks)),
                           log_samples=True)


def loglikelihoods(results: dict, task: str) -> list[list[float]]:
    return [[float(r[0][0]) for r in s["resps"]] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_our_loglikelihoods_and_generations_equal_the_harness_hf_backend(trained):
    ckpt, merged, tasks = trained
    mine, reference = ours(ckpt, tasks, ["demo_colours", "demo_sums"]), theirs(merged, tasks, ["demo_colours",
                                                                                                "demo_sums"])
    a, b = loglikelihoods(mine, "demo_colours"), loglikelihoods(reference, "demo_colours")
    assert len(a) == 16 and all(len(x) == 4 for x in a)
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4), (a, b)
    assert len({round(v, 3) for row in a for v in row}) > 8  # the choices are scored differently: a test that can fail
    assert mine["results"]["demo_colours"]["acc,none"] == reference["results"]["demo_colours"]["acc,none"]
    gen = [[s["resps"][0][0] for s in sorted(r["samples"]["demo_sums"], key=lambda s: s["doc_id"])]
           for r in (mine, reference)]
    assert gen[0] == gen[1], gen
    assert mine["results"]["demo_sums"]["exact_match,none"] == reference["results"]["demo_sums"]["exact_match,none"]


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *args], capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1",
                                                       "HF_HUB_OFFLINE": "1"})


def test_one_command_evaluates_an_adapter_and_a_peft_adapter_on_a_local_task(trained, tmp_path):
    """evaluate.py --tasks on the fit.py checkpoint and on its PEFT export (with the base): the harness's results JSON,
    the same accuracy both ways, and the scores in TensorBoard beside the run's curves."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt, _, tasks = trained
    common = ["--tasks", "demo_colours", "--include_path", str(tasks), "--precision", "32-true", "--limit", "8"]
    proc = evaluate("--adapter", str(ckpt), "--out", str(tmp_path / "a.json"), "--log_dir", str(tmp_path / "tb"),
                    *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo_colours" in proc.stdout
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["results"]["demo_colours"]["acc,none"] >= 0 and len(first["samples"]["demo_colours"]) == 8
    events = EventAccumulator(str(next((tmp_path / "tb").glob("events.*")))).Reload()
    assert events.Scalars("lm_eval/demo_colours/acc")[0].value == first["results"]["demo_colours"]["acc,none"]
    export = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_adapter.py"), "--adapter", str(ckpt),
                             "--out_dir", str(tmp_path / "peft")], capture_output=True, text=True)
    assert export.returncode == 0, export.stderr[-2000:]
    proc = evaluate("--adapter", str(tmp_path / "peft"), "--checkpoint_dir", str(ckpt.parent.parent / "base"),
                    "--out", str(tmp_path / "b.json"), "--log_dir", str(tmp_path / "tb2"), *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["results"]["demo_colours"]["acc,none"] == first["results"]["demo_colours"]["acc,none"]


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "unknown lm-eval task(s) no_such_task: `lm_eval ls tasks`"),
    (["--tasks", "missing_data"], "could not be loaded"),
    (["--tasks", "demo_colours", "--model", "small"], "choose the model preset that matches the checkpoint"),
    (["--tasks", ","], "--tasks names no task"),
])
def test_bad_benchmark_input_gets_one_line(trained, tmp_path, args, message):
    ckpt, _, tasks = trained
    shutil.copytree(tasks, tmp_path / "tasks")
    text = (tmp_path / "tasks" / "demo_colours.yaml").read_text()
    (tmp_path / "tasks" / "missing.yaml").write_text(text.replace("task: demo_colours", "task: missing_data")
                                                     .replace(str(tasks / "colours.jsonl"), str(tmp_path / "no.jsonl")))
    proc = evaluate("--adapter", str(ckpt), "--include_path", str(tmp_path / "tasks"), "--out",
                    str(tmp_path / "x.json"), *args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message in errors[0], errors[0]


def test_without_lm_eval_one_line_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "llama_lora.harness", raising=False)
    with pytest.raises(ValueError, match=r'optional extra: pip install -e "\.\[eval\]"'):
        import llama_lora.harness  # noqa: F401


def test_the_shipped_demo_task_generates_what_generate_does(trained, monkeypatch):
    """benchmarks/tasks/demo_heldout (the demo's 100 held-out instructions in Alpaca's prompt, data_files relative to
    the repository root): the harness's greedy answers are the model's own generate() from the training prompt, cut
    at the first newline."""
    from llama_lora.demo import heldout_records
    from llama_lora.prompts import FORMATS
    from llama_lora.trained_run import open_run

    ckpt, _, _ = trained
    monkeypatch.chdir(ROOT)
    results = ours(ckpt, ROOT / "benchmarks" / "tasks", ["demo_heldout"])
    answers = [s["resps"][0][0] for s in sorted(results["samples"]["demo_heldout"], key=lambda s: s["doc_id"])]
    run = open_run(ckpt)
    model, tok = run.build(run.plan_for("cpu", "32-true", "fp32")), run.tokenizer()
    records = heldout_records()
    own = [tok.decode(model.generate(FORMATS["alpaca"].prompt(r, tok), 8, temperature=0.0, eos_id=tok.eos_id))
           .split("\n")[0] for r in records]
    assert answers == own
    right = sum(a.strip() == r["output"] for a, r in zip(own, records)) / len(records)
    assert results["results"]["demo_heldout"]["exact_match,none"] == pytest.approx(right)
