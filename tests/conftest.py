"""Shared fixtures."""

from __future__ import annotations

import asyncio
import importlib
import os
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
import trustme

T = TypeVar("T")

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


# --- event loops: asyncio's own and uvloop ---------------------------------------------------


@pytest.fixture(params=["asyncio", "uvloop"])
def run_on_each_loop(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Runs a coroutine to its end on a new event loop: asyncio's, then (a second test) uvloop's,
    whose transports and TLS layer are its own."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run  # type: ignore[no-any-return]
    return asyncio.run


# --- real TLS: one test CA per run (trustme) ---------------------------------------------------


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path
