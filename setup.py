"""Builds the one compiled module, ``alephsmtp._parser``; everything else is in pyproject.toml.

The extension is skipped (a pure-Python install that uses ``alephsmtp._parser_py``) when
``ALEPHSMTP_NO_EXTENSIONS`` is set to a non-empty value or the interpreter is not CPython.
``scripts/kernel-variants`` imports :func:`extensions` to build the same module with another
of its block kernels forced.
"""

import os
import platform
from collections.abc import Sequence

from setuptools import Extension, setup

NO_EXTENSIONS = bool(os.environ.get("ALEPHSMTP_NO_EXTENSIONS")) or (
    platform.python_implementation() != "CPython"
)

COMPILER_DIRECTIVES = {
    "language_level": "3",
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
}


def extensions(
    source: str = "src/alephsmtp/_parser.pyx", macros: Sequence[tuple[str, str]] = ()
) -> list[Extension]:
    """The compiled core, cythonized (``macros``: C defines such as ``ALEPH_FORCE``)."""
    from Cython.Build import cythonize

    extension = Extension("alephsmtp._parser", [source], define_macros=list(macros))
    return cythonize([extension], compiler_directives=COMPILER_DIRECTIVES, quiet=True)


if __name__ == "__main__":  # also how setuptools' build backend runs this file
    setup(ext_modules=[] if NO_EXTENSIONS else extensions())
