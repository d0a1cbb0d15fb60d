#!/usr/bin/env python
"""``python scripts/train.py --help``: the same command as the installed ``tinysd-train`` (see :mod:`ldm.cli.train`)."""

import sys

from ldm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
