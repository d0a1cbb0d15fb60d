#!/usr/bin/env python
"""``python scripts/img2img.py --help``: the same command as the installed ``tinysd-img2img`` (see :mod:`ldm.cli.img2img`)."""

import sys

from ldm.cli.img2img import main

if __name__ == "__main__":
    sys.exit(main())
