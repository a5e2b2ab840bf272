"""Shared plumbing for the scripts: typed functions run through jsonargparse, logging, one-line errors."""

from __future__ import annotations

import argparse
import inspect
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import docstring_parser
import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser
from rich.console import Console
from rich.logging import RichHandler

USER_ERRORS = (ValueError, OSError)  # OSError: FileNotFoundError, and a folder that cannot be written


def script_arguments(function: Callable[..., Any], argv: Sequence[str], description: str | None = None, *,
                     positional: str | None = None, skip: Sequence[str] = (),
                     borrowed: Sequence[tuple[Any, Sequence[str]]] = ()) -> dict[str, Any]:
    """The arguments of ``function`` from the command line, as fit.py takes them: typed options from its signature
    (help from its docstring), ``--config`` YAML files and ``--print_config``.

    ``positional`` names a list parameter taken as positional arguments; ``skip`` parameters are not options.
    ``borrowed`` adds parameters of library
    functions, classes or methods, e.g. ``((Llama, "generate_stream"), ["temperature", "top_p"])``: their defaults then
    live in the library alone, and they come back in the result beside the function's own.
    """
    check_config_files(argv)
    parser = ArgumentParser(description=description, exit_on_error=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (see --print_config)")
    if positional is not None:
        # SUPPRESS: with none on the command line, the positional is absent (an empty list would replace the one a
        # --config file gives); the function's default comes back below.
        parser.add_argument(positional, nargs="*", type=str, default=argparse.SUPPRESS)
    # Booleans are flags (--greedy, --no_greedy): jsonargparse's own take an optional value, which would swallow
    # the prompt in `--greedy "What is 3 plus 5?"`.
    params = inspect.signature(function).parameters
    flags = [name for name, p in params.items() if p.annotation in (bool, "bool") and name not in skip]
    docs = {p.arg_name: p.description for p in docstring_parser.parse(function.__doc__ or "").params}
    for name in flags:
        parser.add_argument(f"--{name}", action=ActionYesNo, default=params[name].default, help=docs.get(name))
    parser.add_function_arguments(function, nested_key=None, skip={*skip, *flags, positional} - {None})
    for source, names in borrowed:
        if isinstance(source, tuple):  # (class, method name)
            others = set(inspect.signature(getattr(*source)).parameters) - set(names) - {"self"}
            parser.add_method_arguments(*source, nested_key=None, skip=others)
        elif inspect.isclass(source):
            others = set(inspect.signature(source).parameters) - set(names)
            parser.add_class_arguments(source, nested_key=None, skip=others)
        else:
            others = set(inspect.signature(source).parameters) - set(names)
            parser.add_function_arguments(source, nested_key=None, skip=others)
    args = parser.parse_args(list(argv)).as_dict()
    args.pop("config", None)
    if positional is not None and not args.get(positional):
        args[positional] = list(inspect.signature(function).parameters[positional].default)
    return args


def check_config_files(argv: Sequence[str]) -> None:
    """Each ``--config`` file is valid YAML, or one line names the file, the line and the problem (jsonargparse says
    only "Problems parsing config"). Relative paths inside a config (data, tokenizer, weights, logs) are read from the
    working directory; ``extends:`` (fit.py) from the config file's own folder."""
    args = iter(argv)
    for a in args:
        path = next(args, None) if a == "--config" else a.split("=", 1)[1] if a.startswith("--config=") else None
        if path is None or not Path(path).is_file():
            continue
        try:
            yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark
            raise ValueError(f"{path}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
                             ) from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a YAML config ({str(e).splitlines()[0]})") from None


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
    """Run main. A user error (bad path, config, data, checkpoint; Trainer settings Lightning rejects) prints one line
    and exits with code 2; a run that failed on its own (resilience.RunFailed: diverged, out of memory) prints its
    message and exits with code 1."""
    try:
        main(*args)
    except argparse.ArgumentError as e:
        print(f"error: {argument_message(e)} (--help lists the options)", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        # Only a training run raises these (resilience.RunFailed: the run failed on its own; Lightning's own checks of
        # the Trainer's settings: a user error), so their modules are imported when they can occur.
        resilience = sys.modules.get("llama_lora.resilience")
        lightning = sys.modules.get("lightning.fabric.utilities.exceptions")
        if resilience is not None and isinstance(e, resilience.RunFailed):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        if lightning is not None and isinstance(e, lightning.MisconfigurationException):
            print(f"error: trainer: {user_message(e)}", file=sys.stderr)
            sys.exit(2)
        raise
