#!/usr/bin/env python
"""``python scripts/fit_signal_leak.py --help``: the same command as the installed ``tinysd-fit-signal-leak`` (see :mod:`ldm.cli.fit_signal_leak`)."""

import sys

from ldm.cli.fit_signal_leak import main

if __name__ == "__main__":
    sys.exit(main())
