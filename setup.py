"""Builds the one compiled module, ``alephsmtp._parser``; everything else is in pyproject.toml.

The extension is skipped (a pure-Python install that uses ``alephsmtp._parser_py``) when
``ALEPHSMTP_NO_EXTENSIONS`` is set to a non-empty value or the interpreter is not CPython.
When it cannot be built (no C compiler, no Python headers) the install goes on without it,
with a warning: the pure-Python twin gives the same results, more slowly. Setting
``ALEPHSMTP_REQUIRE_EXTENSIONS`` makes that an error instead; the wheel builds, CI and
``scripts/wheel-proof`` set it, so what we publish always carries the compiled core.

Linux builds leave out debug information (``-g0``; Python's own CFLAGS ask for ``-g``): it is
most of the module's size. ``ALEPHSMTP_DEBUG_SYMBOLS=1`` keeps it, for gdb.

``scripts/kernel-variants`` imports :func:`extensions` to build the same module with another
of its block kernels forced.
"""

import os
import platform
import sys
from collections.abc import Sequence

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError, CompileError

NO_EXTENSIONS = bool(os.environ.get("ALEPHSMTP_NO_EXTENSIONS")) or (
    platform.python_implementation() != "CPython"
)
REQUIRE_EXTENSIONS = bool(os.environ.get("ALEPHSMTP_REQUIRE_EXTENSIONS"))
DEBUG_SYMBOLS = bool(os.environ.get("ALEPHSMTP_DEBUG_SYMBOLS"))

COMPILER_DIRECTIVES = {
    "language_level": "3",
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
}

FALLBACK_WARNING = """
********************************************************************************
WARNING: the compiled core (alephsmtp._parser) could not be built:
    {error}
alephsmtp is installed with its pure-Python core instead: the same results, with
the byte work done more slowly (alephsmtp.IMPLEMENTATION == "python"). To build
the compiled core, install a C compiler and the Python headers (Debian/Ubuntu:
apt install gcc python3-dev), then pip install --no-cache-dir --force-reinstall
alephsmtp. ALEPHSMTP_NO_EXTENSIONS=1 skips this attempt;
ALEPHSMTP_REQUIRE_EXTENSIONS=1 makes it an error.
********************************************************************************
"""

STRICT_ERROR = """
alephsmtp: the compiled core (alephsmtp._parser) could not be built, and
ALEPHSMTP_REQUIRE_EXTENSIONS is set, so this build fails: {error}
"""


class BuildCompiledCore(build_ext):
    """setuptools' build_ext, saying plainly what happens when the build fails.

    The extension is ``optional`` unless the build is strict, so setuptools goes on without it
    (as for any optional extension) after the warning printed here."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, CompileError, BaseError) as error:
            message = FALLBACK_WARNING if ext.optional else STRICT_ERROR
            sys.stderr.write(message.format(error=error))
            raise


def extensions(
    source: str = "src/alephsmtp/_parser.pyx", macros: Sequence[tuple[str, str]] = ()
) -> list[Extension]:
    """The compiled core, cythonized (``macros``: C defines such as ``ALEPH_FORCE``)."""
    from Cython.Build import cythonize

    # -g0 after Python's CFLAGS (which say -g) wins; gcc and clang both take it. MSVC builds
    # carry no debug information unless asked.
    strip = sys.platform.startswith("linux") and not DEBUG_SYMBOLS
    extension = Extension(
        "alephsmtp._parser",
        [source],
        define_macros=list(macros),
        extra_compile_args=["-g0"] if strip else [],
    )
    built = cythonize([extension], compiler_directives=COMPILER_DIRECTIVES, quiet=True)
    for each in built:  # set here: cythonize's new Extension objects drop ``optional``
        each.optional = not REQUIRE_EXTENSIONS
    return built


if __name__ == "__main__":  # also how setuptools' build backend runs this file
    setup(
        ext_modules=[] if NO_EXTENSIONS else extensions(),
        cmdclass={"build_ext": BuildCompiledCore},
    )
