"""Shared plumbing for the scripts: logging set-up and one-line errors for mistakes a user can make."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from rich.logging import RichHandler

USER_ERRORS = (ValueError, FileNotFoundError)


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=False)])


def main_guard(main: Callable[..., Any], *args: Any) -> None:
    """Run main; a user error (bad path, config, data, checkpoint) prints one line and exits with code 2."""
    try:
        main(*args)
    except USER_ERRORS as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
