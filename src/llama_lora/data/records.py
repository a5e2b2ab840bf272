"""Alpaca records from a local file or an https URL: read, validated, downloaded once into the cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..cache import default_cache_dir
from ..prompts import check_conversation

log = logging.getLogger(__name__)

ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
DOWNLOAD_TIMEOUT_S = 60
DOWNLOAD_MAX_BYTES = 512 * 2**20

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
        where = "" if path.is_absolute() else f" (a relative path is read from the working directory, {Path.cwd()})"
        raise FileNotFoundError(f"Data file not found: {path}{where}; give a local {kinds} file or an https URL")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 byte-order mark (Windows editors write one) is dropped
    except UnicodeDecodeError as e:
        what = "text data is UTF-8" if format == "text" else "Alpaca data is a JSON list or JSON lines"
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); {what}") from None
    if format == "text" and path.suffix not in (".json", ".jsonl"):
        records: list = [{"text": doc.strip()} for doc in re.split(r"\n\s*\n", text) if doc.strip()]
    elif path.suffix == ".jsonl":
        records = _json_lines(text, path)
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
            records = _json_lines(text, path)  # JSON lines saved as .json: one object per line
            log.info("%s holds JSON lines (one record per line): read as such", path)
        if not isinstance(records, list):
            raise ValueError(f"{path}: the top level is a JSON {type(records).__name__}, expected a list of records")
    if format == "text":
        records = [{"text": r} if isinstance(r, str) else r for r in records]
    if format == "chat":
        return [chat_record(rec, i, path) for i, rec in enumerate(records)]
    if format == "preference":
        return [preference_record(rec, i, path) for i, rec in enumerate(records)]
    for i, rec in enumerate(records):
        (validate_text if format == "text" else validate_record)(rec, i, path)
        if format != "text" and rec.get("input") is None:
            rec["input"] = ""  # "input": null or none at all: the no-input template (as alpaca-lora's prompter)
    return records


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def chat_record(rec: Any, index: int, source: str | Path = "data") -> dict[str, list[dict[str, str]]]:
    """A conversation as {"messages": [{"role", "content"}, ...]}: from the messages form (OpenAI's, TRL's) or the
    ShareGPT form ({"conversations": [{"from": human/gpt/system, "value"}]}), checked turn by turn."""

    where = f"{source}: record {index}"
    if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
        turns, role_key, text_key, roles = rec["messages"], "role", "content", {r: r for r in ("system", "user",
                                                                                              "assistant")}
    elif isinstance(rec, dict) and isinstance(rec.get("conversations"), list):
        turns, role_key, text_key, roles = rec["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        raise ValueError(f"{where} has neither 'messages' (a list of role/content turns) nor 'conversations' "
                         "(ShareGPT's from/value turns)")
    messages = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get(role_key) not in roles or not isinstance(turn.get(text_key), str):
            raise ValueError(f"{where}, turn {n}: expected {{'{role_key}': one of {sorted(roles)}, '{text_key}': a "
                             f"string}}, got {turn!r:.80}")
        messages.append({"role": roles[turn[role_key]], "content": turn[text_key]})
    check_conversation(messages, where)
    return {"messages": messages}


PREFERENCE_FORMS = ("{instruction, input, chosen, rejected}; {prompt, chosen, rejected} as strings or as messages; or "
                    "chosen and rejected alone, whole conversations that share their prompt")


def preference_record(rec: Any, index: int, source: str | Path = "data") -> dict[str, Any]:
    """A preference pair as {"prompt": ..., "chosen": str, "rejected": str}, the completions being the assistant's
    answer alone. The prompt is an Alpaca prompt ({instruction, input}), a conversation ({"messages": [...]}, ending
    with the user's turn), or, for whole conversations given as strings (Anthropic HH), the text they share
    ({"text": ...}, used as written: it carries its own turns). From the forms people have:

    - Alpaca-style: ``instruction`` (and ``input``), ``chosen``, ``rejected``;
    - TRL's standard form: ``prompt``, ``chosen``, ``rejected`` as strings; its conversational form: ``prompt`` a
      list of messages, ``chosen`` and ``rejected`` lists holding the assistant's turn;
    - whole conversations: ``chosen`` and ``rejected`` alone, message lists (UltraFeedback-binarized) or strings
      (Anthropic HH) that share their prefix, which is the prompt."""
    where = f"{source}: record {index}"
    if not isinstance(rec, dict):
        raise ValueError(f"{where} is a {type(rec).__name__}, expected an object: {PREFERENCE_FORMS}")
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise ValueError(f"{where} has no '{key}' field; preference records are {PREFERENCE_FORMS}")
    chosen, rejected = rec["chosen"], rec["rejected"]
    whole = isinstance(chosen, list) and isinstance(rejected, list) and any(
        isinstance(t, dict) and t.get("role") != "assistant" for t in chosen + rejected)
    if whole:  # whole conversations (UltraFeedback-binarized has its prompt as a string beside them): the shared turns
        chosen, rejected = _messages(chosen, f"{where}, chosen"), _messages(rejected, f"{where}, rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = {"messages": chosen[:shared]}, chosen[shared:], rejected[shared:]
    elif "instruction" in rec:
        validate_record({**rec, "output": ""}, index, source)
        prompt: dict[str, Any] = {"instruction": rec["instruction"], "input": rec.get("input") or ""}
    elif "prompt" in rec and isinstance(rec["prompt"], str):
        prompt = {"instruction": rec["prompt"], "input": ""}
    elif "prompt" in rec and isinstance(rec["prompt"], list):
        prompt = {"messages": _messages(rec["prompt"], f"{where}, prompt")}
    elif "prompt" in rec:
        raise ValueError(f"{where} field 'prompt' is a {type(rec['prompt']).__name__}, expected a string or a list "
                         "of messages")
    elif isinstance(chosen, str) and isinstance(rejected, str):  # Anthropic HH: the shared text, TRL's cut
        shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        if shared and chosen[shared - 1] == " ":
            shared -= 1  # the answer keeps its leading space
        prompt, chosen, rejected = {"text": chosen[:shared]}, chosen[shared:], rejected[shared:]
    else:
        raise ValueError(f"{where} has no 'instruction' or 'prompt', and chosen and rejected are not both strings or "
                         f"both whole conversations; preference records are {PREFERENCE_FORMS}")
    out = {"prompt": prompt, "chosen": _answer(chosen, f"{where}, chosen"),
           "rejected": _answer(rejected, f"{where}, rejected")}
    if "messages" in prompt:
        check_conversation(prompt["messages"] + [{"role": "assistant", "content": out["chosen"]}], where)
    return out


def _messages(turns: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise ValueError(f"{where}: expected a list of {{'role', 'content'}} messages, got a {type(turns).__name__}")
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant") or not isinstance(
                turn.get("content"), str):
            raise ValueError(f"{where}, turn {n}: expected {{'role': system, user or assistant, 'content': a string}}, "
                             f"got {turn!r:.80}")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def _answer(completion: Any, where: str) -> str:
    """A completion: a string, or a list holding the assistant's one turn."""
    if isinstance(completion, str):
        return completion
    turns = _messages(completion, where)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise ValueError(f"{where}: the completion must be the assistant's one turn, got roles "
                         f"{[t['role'] for t in turns]}")
    return turns[0]["content"]


def _json_lines(text: str, path: Path) -> list:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON on line {lineno}, column {e.colno}: {e.msg}") from None
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
        if field in rec and not isinstance(rec[field], str) and not (field == "input" and rec[field] is None):
            raise ValueError(f"{source}: record {index} field '{field}' is a {type(rec[field]).__name__}, "
                             "expected a string")
