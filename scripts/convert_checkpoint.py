#!/usr/bin/env python
"""``python scripts/convert_checkpoint.py --help``: the same command as the installed ``tinysd-convert-checkpoint`` (see :mod:`ldm.cli.convert_checkpoint`)."""

import sys

from ldm.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
