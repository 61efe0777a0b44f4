"""``python -m alephsmtp``: see [`alephsmtp.cli`][alephsmtp.cli]."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
