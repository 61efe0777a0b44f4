"""Builds the one compiled module, ``alephsmtp._parser``; everything else is in pyproject.toml.

The extension is skipped (a pure-Python install that uses ``alephsmtp._parser_py``) when
``ALEPHSMTP_NO_EXTENSIONS`` is set to a non-empty value or the interpreter is not CPython.
"""

import os
import platform

from setuptools import Extension, setup

NO_EXTENSIONS = bool(os.environ.get("ALEPHSMTP_NO_EXTENSIONS")) or (
    platform.python_implementation() != "CPython"
)

if NO_EXTENSIONS:
    ext_modules = []
else:
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [Extension("alephsmtp._parser", ["src/alephsmtp/_parser.pyx"])],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )

setup(ext_modules=ext_modules)
