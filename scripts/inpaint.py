#!/usr/bin/env python
"""``python scripts/inpaint.py --help``: the same command as the installed ``tinysd-inpaint`` (see :mod:`ldm.cli.inpaint`)."""

import sys

from ldm.cli.inpaint import main

if __name__ == "__main__":
    sys.exit(main())
