"""The prompt formats are decided in one place: prompts.py writes every template, and its one rule
(``resolve_format``) is asked by the two places a run's format comes from, the data module (training) and the
trained run (every later command)."""

import re

from conftest import ROOT

SOURCES = sorted((ROOT / "src" / "llama_lora").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))


def _offenders(pattern: str, allowed: set[str]) -> list[str]:
    regex = re.compile(pattern)
    return [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES if p.relative_to(ROOT).as_posix() not in allowed
            for i, line in enumerate(p.read_text().splitlines(), 1) if regex.search(line)]


def test_only_prompts_py_writes_a_template():
    """A prompt built, a template's text or a stop token chosen anywhere else is a second place deciding a format.
    (demo.py writes Alpaca prompts into its tokenizer's training corpus, not a prompt format.)"""
    templates = (r"format_prompt\(|chat_tokens\(|PROMPT_(NO_)?INPUT|\[INST\]|<<SYS>>|<\|start_header_id\|>|"
                 r"### Response|eos_id=tok\.eos_id|\.special\[\"eot\"\]")
    offenders = _offenders(templates, {"src/llama_lora/prompts.py", "src/llama_lora/demo.py",
                                       "src/llama_lora/tokenizer.py", "src/llama_lora/gguf_files.py"})
    assert not offenders, offenders


def test_a_runs_format_is_resolved_in_two_places_by_one_rule():
    callers = _offenders(r"resolve_format\(", {"src/llama_lora/prompts.py"})
    assert sorted(c.rsplit(":", 1)[0] for c in callers) == ["src/llama_lora/data/datamodule.py",
                                                           "src/llama_lora/trained_run.py"], callers
    assert not _offenders(r"data_format == \"chat\"|format == \"chat\"",
                          {"src/llama_lora/prompts.py", "src/llama_lora/trained_run.py",
                           "src/llama_lora/data/records.py"}), "a second rule for a run's format"
