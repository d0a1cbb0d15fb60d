#!/usr/bin/env python
"""``python scripts/serve.py --help``: the same command as the installed ``tinysd-serve`` (see :mod:`ldm.cli.serve`)."""

import sys

from ldm.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
