"""The parsing core in use: the compiled ``_parser`` when it was built, else the pure twin.

The choice is made once, at import. ``ALEPHSMTP_NO_EXTENSIONS=1`` forces the pure-Python twin
(the same variable skips the build in ``setup.py``). ``IMPLEMENTATION`` says which one won.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

__all__ = [
    "IMPLEMENTATION",
    "BdatReader",
    "BufferPool",
    "DataReader",
    "LineReader",
    "scan_path",
    "split_command",
]

NO_EXTENSIONS: bool = bool(os.environ.get("ALEPHSMTP_NO_EXTENSIONS"))

IMPLEMENTATION: Literal["cython", "python"]

if TYPE_CHECKING or NO_EXTENSIONS:
    # The twin is what type checkers read: one API, typed once.
    from ._parser_py import (
        BdatReader,
        BufferPool,
        DataReader,
        LineReader,
        scan_path,
        split_command,
    )

    IMPLEMENTATION = "python"
else:
    try:
        from ._parser import (  # type: ignore[no-redef]
            BdatReader,
            BufferPool,
            DataReader,
            LineReader,
            scan_path,
            split_command,
        )

        IMPLEMENTATION = "cython"
    except ImportError:  # not built (sdist without a compiler, or another interpreter)
        from ._parser_py import (
            BdatReader,
            BufferPool,
            DataReader,
            LineReader,
            scan_path,
            split_command,
        )

        IMPLEMENTATION = "python"
