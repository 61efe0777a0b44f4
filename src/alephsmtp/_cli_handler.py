"""``--handler MODULE:NAME [--handler-arg KEY=VALUE ...]``: your own ``on_session`` from the
command line, so that a deployment needs no wrapper script (aiosmtpd's ``-c``).

``NAME`` (a dotted path inside ``MODULE`` is fine: ``handlers:Policy.from_cli``) is either
``on_session`` itself or a factory that makes it:

- a class is always a factory: its instance, made with the ``--handler-arg`` arguments as
  keyword arguments (strings), is ``on_session`` (it must be callable);
- any other callable is ``on_session`` itself, unless ``--handler-arg`` is given: then it is
  called with those arguments and what it returns is ``on_session``.

``MODULE`` is imported from ``PYTHONPATH`` and the current directory (as ``python -m`` finds
modules; the ``alephsmtp`` script would not look there otherwise). Everything that can go
wrong — a module that is missing or fails to import, a name it lacks, something not
callable, a factory that refuses its arguments — is said in one line, exit status 2, before
the server starts.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import traceback
from typing import Any

from ._cli_checks import CliError
from .session import OnSession

__all__ = ["add_arguments", "load"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--handler`` options, in a group of their own."""
    group = parser.add_argument_group(
        "your own handler (runs before the outputs; without any output, instead of printing)"
    )
    group.add_argument(
        "--handler",
        metavar="MODULE:NAME",
        help="on_session(session) of your own, or a factory (a class, or a function given "
        "--handler-arg) that makes it",
    )
    group.add_argument(
        "--handler-arg",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="with --handler: a keyword argument (a string) for its factory; repeatable",
    )


def _arguments(pairs: list[str]) -> dict[str, str]:
    arguments: dict[str, str] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.isidentifier():
            raise CliError(f"--handler-arg wants KEY=VALUE with KEY a Python name, not {pair!r}")
        if key in arguments:
            raise CliError(f"--handler-arg {key} is given twice")
        arguments[key] = value
    return arguments


def _failure(error: BaseException) -> str:
    """An exception in one line: its type, its text, and where it was raised."""
    where = ""
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        last = frames[-1]
        where = f" ({last.filename}, line {last.lineno})"
    elif isinstance(error, SyntaxError) and error.filename:
        where = f" ({error.filename}, line {error.lineno})"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}{where}" if text else f"{type(error).__name__}{where}"


def _import(module_name: str) -> Any:
    # The current directory, as `python -m alephsmtp` has it first; the console script not.
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (
            module_name == error.name or module_name.startswith(error.name + ".")
        ):
            raise CliError(f"--handler: no module named {module_name!r}") from None
        # The module is there; something it imports is not.
        raise CliError(f"--handler: importing {module_name} failed: {_failure(error)}") from None
    except Exception as error:  # a bug in the module: a SyntaxError, a failing import...
        raise CliError(f"--handler: importing {module_name} failed: {_failure(error)}") from None


def load(spec: str, pairs: list[str] | None) -> OnSession:
    """The ``on_session`` that ``--handler spec`` and its ``--handler-arg`` pairs name."""
    module_name, colon, name = spec.partition(":")
    if not colon or not module_name or not name:
        raise CliError(f"--handler wants MODULE:NAME (mypackage.handlers:on_session), not {spec!r}")
    arguments = _arguments(pairs or [])
    target: Any = _import(module_name)
    for part in name.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CliError(f"--handler: module {module_name} has no attribute {name!r}") from None
    if not callable(target):
        raise CliError(f"--handler: {spec} is not callable (it is a {type(target).__name__})")
    if not (inspect.isclass(target) or pairs):
        return target  # type: ignore[no-any-return]
    try:
        made = target(**arguments)
    except Exception as error:
        shown = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
        raise CliError(f"--handler: {spec}({shown}) failed: {_failure(error)}") from None
    if not callable(made):
        raise CliError(
            f"--handler: {spec}(...) made a {type(made).__name__}, not a callable on_session"
        )
    return made  # type: ignore[no-any-return]
