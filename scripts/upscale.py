#!/usr/bin/env python
"""``python scripts/upscale.py --help``: the same command as the installed ``tinysd-upscale`` (see :mod:`ldm.cli.upscale`)."""

import sys

from ldm.cli.upscale import main

if __name__ == "__main__":
    sys.exit(main())
