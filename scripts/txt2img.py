#!/usr/bin/env python
"""``python scripts/txt2img.py --help``: the same command as the installed ``tinysd-txt2img`` (see :mod:`ldm.cli.txt2img`)."""

import sys

from ldm.cli.txt2img import main

if __name__ == "__main__":
    sys.exit(main())
