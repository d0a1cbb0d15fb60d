"""The ``inpaint`` mode of :mod:`ldm.cli.txt2img` (same flags, plus the mode's own): ``python scripts/inpaint.py --help``."""

from __future__ import annotations

import sys

from ldm.cli.txt2img import main as txt2img_main


def main(argv: list[str] | None = None) -> int:
    return txt2img_main(argv, mode="inpaint")


if __name__ == "__main__":
    sys.exit(main())
