"""The user commands, installed as console scripts and run by the thin files in ``scripts/``:

* ``tinysd-txt2img`` = ``scripts/txt2img.py`` (:mod:`ldm.cli.txt2img`)
* ``tinysd-img2img`` = ``scripts/img2img.py`` and ``tinysd-inpaint`` = ``scripts/inpaint.py``: the same
  command in its image modes (:mod:`ldm.cli.img2img`, :mod:`ldm.cli.inpaint`)
* ``tinysd-train`` = ``scripts/train.py`` (:mod:`ldm.cli.train`)
* ``tinysd-convert-checkpoint`` = ``scripts/convert_checkpoint.py`` (:mod:`ldm.cli.convert_checkpoint`)
* ``tinysd-fit-signal-leak`` = ``scripts/fit_signal_leak.py`` (:mod:`ldm.cli.fit_signal_leak`)

Each command parses its arguments before importing the networks (``--help`` and usage errors
answer at once). This module holds the shared argparse plumbing and loads nothing heavy.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

from ldm.sampling.registry import resolve_sampler_name


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage mistake prints one line (``prog: error: ...``) and exits with status 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def finite_float(text: str) -> float:
    """argparse ``type=`` for float options: a finite number (``nan`` and ``inf`` are refused by name)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


MAX_COLOUR_FIX = 64  # output pixels: ldm.upscaling.check_colour_fix's bound, here without importing torch


def check_colour_fix_flag(parser: argparse.ArgumentParser, flag: str, sigma: float | None) -> None:
    """One line and exit 2 unless ``sigma`` (a super-resolution colour fix, ``None`` = the model's) is in
    ``[0, MAX_COLOUR_FIX]``; NaN is refused too."""
    if sigma is not None and not 0 <= sigma <= MAX_COLOUR_FIX:
        parser.error(f"{flag} must be a sigma in 0..{MAX_COLOUR_FIX} output pixels, got {sigma:g}")


def sampler_name(text: str) -> str:
    """argparse ``type=`` for ``--sampler``: our name (``dpmpp_2m``) or AUTOMATIC1111's (``"DPM++ 2M"``)."""
    try:
        return resolve_sampler_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run_reporting_errors(parser: argparse.ArgumentParser, work: Callable[[], int], device: str = "auto") -> int:
    """``work()``, with a user error (:class:`ldm.errors.LdmError`, or a device torch cannot use when one was
    named) printed as one line ``PROG: error: ...`` and exit code 2; anything else is a bug and propagates."""
    from ldm.errors import LdmError

    try:
        return work()
    except LdmError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if "device" in str(error).lower() and device != "auto":
            print(f"{parser.prog}: error: device {device!r} is not usable: {str(error).splitlines()[0]}",
                  file=sys.stderr)
            return 2
        raise
