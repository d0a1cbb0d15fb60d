"""Command-line plumbing shared by the scripts (argparse only; importing it loads nothing heavy)."""

from __future__ import annotations

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage mistake prints one line (``prog: error: ...``) and exits with status 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")
