"""Shared fixtures."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

# --- the parsing core: every parser test runs against both implementations -------------------

NO_EXTENSIONS = bool(os.environ.get("ALEPHSMTP_NO_EXTENSIONS"))


def _load_compiled() -> tuple[ModuleType | None, str]:
    """The compiled core, or None and why it is not available."""
    if NO_EXTENSIONS:
        return None, "ALEPHSMTP_NO_EXTENSIONS is set"
    try:
        return importlib.import_module("alephsmtp._parser"), ""
    except ImportError as exc:  # not built
        return None, f"alephsmtp._parser is not built ({exc})"


COMPILED_PARSER, COMPILED_SKIP_REASON = _load_compiled()
PYTHON_PARSER = importlib.import_module("alephsmtp._parser_py")


@pytest.fixture(params=["cython", "python"])
def parser(request: pytest.FixtureRequest) -> ModuleType:
    """The parsing core module: ``alephsmtp._parser`` (compiled) or ``alephsmtp._parser_py``."""
    if request.param == "python":
        return PYTHON_PARSER
    if COMPILED_PARSER is None:
        pytest.skip(f"compiled parser unavailable: {COMPILED_SKIP_REASON}")
    return COMPILED_PARSER
