"""What a user installs: the distribution's metadata, the compiled core's size, and the
fallback to the pure-Python core when no C compiler is there (a warning, not a failure, unless
the build is asked to be strict)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every CPython the wheels are built for ([tool.cibuildwheel] build in pyproject.toml).
PYTHONS = ["3.10", "3.11", "3.12", "3.13", "3.14"]


def metadata() -> importlib.metadata.PackageMetadata:
    return importlib.metadata.metadata("alephsmtp")


def test_testing_extra_brings_what_the_fixtures_need_and_no_more() -> None:
    assert "testing" in (metadata().get_all("Provides-Extra") or [])
    testing = [
        requirement.split(";")[0].strip()
        for requirement in metadata().get_all("Requires-Dist") or []
        if 'extra == "testing"' in requirement
    ]
    # SmtpTestServer(tls=True) and the plugin's tls marker need trustme; nothing else.
    assert [name.split(">")[0].split("=")[0] for name in testing] == ["trustme"]


def test_metadata_names_the_project_urls_and_each_python() -> None:
    urls = dict(url.split(", ", 1) for url in metadata().get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Source", "Issues", "Changelog"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())
    classifiers = set(metadata().get_all("Classifier") or [])
    for version in PYTHONS:
        assert f"Programming Language :: Python :: {version}" in classifiers
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert running in PYTHONS, f"Python {running} is not among the versions the wheels cover"


def elf_section_names(path: Path) -> list[str]:
    """The section names of an ELF file, read from its section header table (ELF spec)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", path
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    (table,) = struct.unpack_from(order + ("Q" if wide else "I"), data, 0x28 if wide else 0x20)
    entry_size, count, names_index = struct.unpack_from(order + "HHH", data, 0x3A if wide else 0x2E)
    layout = order + ("IIQQQQ" if wide else "IIIIII")  # name, type, flags, addr, offset, size

    def section(index: int) -> tuple[int, int, int]:
        name, _, _, _, offset, size = struct.unpack_from(layout, data, table + index * entry_size)
        return name, offset, size

    _, names_offset, names_size = section(names_index)
    names = data[names_offset : names_offset + names_size]
    return [
        names[start : names.index(b"\0", start)].decode("ascii")
        for start, _, _ in map(section, range(count))
    ]


def test_the_compiled_core_carries_no_debug_information() -> None:
    spec = importlib.util.find_spec("alephsmtp._parser")
    if spec is None or spec.origin is None or not spec.origin.endswith(".so"):
        pytest.skip("no compiled core installed here (a pure-Python install)")
    if not sys.platform.startswith("linux"):
        pytest.skip("debug information is left out of Linux (ELF) builds only")
    sections = elf_section_names(Path(spec.origin))
    assert ".text" in sections  # the parser read the table
    assert [name for name in sections if name.startswith(".debug")] == []


def _build_wheel(source: Path, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``pip wheel`` as pip builds an sdist, but offline: this environment's setuptools and
    Cython (no build isolation), no index."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("ALEPHSMTP_NO_EXTENSIONS", "ALEPHSMTP_REQUIRE_EXTENSIONS")
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "-v",
            "-w",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**environment, **env},
    )


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's build files and package, copied: building writes nothing here."""
    if not (ROOT / "setup.py").is_file():
        pytest.skip("needs the project's setup.py (a checkout or an unpacked sdist)")
    if sys.platform == "win32":
        pytest.skip("CC does not choose the compiler on Windows (MSVC), so none can be hidden")
    try:
        import Cython  # noqa: F401
        import setuptools
    except ImportError as missing:
        pytest.skip(f"building needs {missing.name} here (the test extra installs it)")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("pyproject.toml needs setuptools>=77 (the test extra installs it)")
    tree = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(
        ROOT / "src",
        tree / "src",
        ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "__pycache__", "*.egg-info"),
    )
    return tree


def test_without_a_compiler_the_pure_core_is_installed_with_a_warning(
    source_tree: Path, tmp_path: Path
) -> None:
    built = _build_wheel(source_tree, tmp_path, CC="/nonexistent/cc")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "alephsmtp/_parser_py.py" in names
    assert [name for name in names if name.endswith((".so", ".pyd"))] == []
    said = built.stdout + built.stderr
    assert "the compiled core (alephsmtp._parser) could not be built" in said
    assert "pure-Python core" in said


def test_a_strict_build_fails_without_a_compiler(source_tree: Path, tmp_path: Path) -> None:
    built = _build_wheel(
        source_tree, tmp_path, CC="/nonexistent/cc", ALEPHSMTP_REQUIRE_EXTENSIONS="1"
    )
    assert built.returncode != 0
    assert list(tmp_path.glob("*.whl")) == []
    assert "ALEPHSMTP_REQUIRE_EXTENSIONS" in built.stdout + built.stderr
