"""Shared plumbing for the scripts: logging set-up and one-line errors for mistakes a user can make."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

USER_ERRORS = (ValueError, FileNotFoundError)


class RunFailed(RuntimeError):
    """A run that started but cannot go on (diverged, out of memory); its message says what to change."""


def configure_logging(level: int = logging.INFO) -> None:
    # Logs go to stderr: stdout carries results (generate.py's responses, the run summary).
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)])


def user_message(e: BaseException) -> str:
    """One line for a user error: the innermost user error's first line (jsonargparse wraps the one that matters,
    e.g. a LoRA target that does not exist inside "Does not validate against any of the Union subtypes")."""
    while isinstance(e.__cause__, USER_ERRORS):
        e = e.__cause__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_WRAPPERS = ("Does not validate", "Subtypes:", "Errors:", "Problem with given class_path", "Given value")


def argument_message(e: argparse.ArgumentError) -> str:
    """jsonargparse's nested, multi-line parse error as one line: "model.lora.r: Expected a <class 'int'>. ..."."""
    text = str(e)
    keys = re.findall(r'Parser key "([^"]+)"', text)
    lines = [re.sub(r'Parser key "[^"]+":', "", line).strip().lstrip("- ").strip() for line in text.splitlines()]
    detail = next((line for line in lines if line and not line.startswith(_WRAPPERS) and "NoneType" not in line),
                  lines[0] if lines else "invalid arguments")
    return f"{'.'.join(keys)}: {detail}" if keys else detail


def main_guard(main: Callable[..., Any], *args: Any) -> None:
    """Run main. A user error (bad path, config, data, checkpoint) prints one line and exits with code 2; a run that
    failed on its own (RunFailed: diverged, out of memory) prints its message and exits with code 1."""
    try:
        main(*args)
    except argparse.ArgumentError as e:
        print(f"error: {argument_message(e)} (--help lists the options)", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
