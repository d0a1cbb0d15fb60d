#!/usr/bin/env python
"""Wall time of ``python scripts/txt2img.py "a red bicycle"`` as a new user runs it, then the judge's reading.

    python scripts/bench/benchmark_txt2img.py                      # the shipped default model, 3 runs
    python scripts/bench/benchmark_txt2img.py --model /path/to/model --runs 5 --prompt "a blue car"

Each run is a fresh ``python`` process (so the time includes interpreter start-up, imports,
model loading, sampling and writing the PNG), writing into a temporary folder. Prints each
run's wall time, the median, what the judge reads in each PNG, and one summary line for the
README.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TXT2IMG = REPO / "scripts" / "txt2img.py"
_PAIR = re.compile(r"\b(?:an?\s+)?(\w+)\s+(\w+)\s*$")

logger = logging.getLogger("benchmark_txt2img")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default="a red bicycle", help='prompt (default "a red bicycle")')
    parser.add_argument("--runs", type=int, default=3, help="number of timed runs (default 3)")
    parser.add_argument("--model", help="passed to txt2img.py as --model (default: none, the shipped model)")
    parser.add_argument("--judge", help="judge weights (default: the shipped judge)")
    parser.add_argument("--base-only", action="store_true",
                        help="pass --base-only (the default model's 64x64 base stage without its upscaler)")
    return parser


def txt2img_command(prompt: str, outdir: Path, model: str | None, base_only: bool = False) -> list[str]:
    """The command a user types, plus ``--outdir`` so the PNG lands in a fresh folder."""
    command = [sys.executable, str(TXT2IMG), prompt, "--outdir", str(outdir)]
    return command + (["--model", model] if model else []) + (["--base-only"] if base_only else [])


def timed_run(command: list[str]) -> tuple[float, Path]:
    """Run ``command`` from the repository root; return (wall seconds, the PNG path it printed)."""
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"txt2img failed (exit {completed.returncode}):\n{completed.stderr.strip()}")
    pngs = [line.strip() for line in completed.stdout.splitlines() if line.strip().endswith(".png")]
    if not pngs:
        raise SystemExit(f"txt2img printed no PNG path; stdout was:\n{completed.stdout}")
    return seconds, Path(pngs[0])


def expected_pair(prompt: str) -> tuple[str, str] | None:
    """(colour, object) for a prompt ending in '<colour> <object>', e.g. 'a red bicycle'."""
    match = _PAIR.search(prompt.lower())
    return (match.group(1), match.group(2)) if match else None


def cpu_name() -> str:
    """A short description of this machine's CPU, e.g. 'AMD EPYC 7B13, 2 cores'."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def open_png(path: Path):
    """The PNG as an RGB PIL image (loaded fully, so the temporary folder can go)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ldm.toy.judge import Judge

    judge = Judge.load(args.judge)
    times, readings = [], []
    with tempfile.TemporaryDirectory(prefix="bench-txt2img-") as tmp:
        for run in range(args.runs):
            command = txt2img_command(args.prompt, Path(tmp) / f"run{run}", args.model, args.base_only)
            seconds, png = timed_run(command)
            times.append(seconds)
            logger.info("run %d: %.2f s -> %s", run + 1, seconds, png.name)
            readings.append(judge.classify([open_png(png)])[0])

    median = statistics.median(times)
    reading = readings[-1]
    read_as = f"{reading['colour']} {reading['object']}"
    expected = expected_pair(args.prompt)
    verdict = "" if expected is None else (" (correct)" if (reading["colour"], reading["object"]) == expected
                                           else f" (expected {' '.join(expected)})")
    for run, r in enumerate(readings, 1):
        print(f"run {run}: {times[run - 1]:.2f} s, judge reads {r['colour']} {r['object']} "
              f"(p={r['colour_prob']:.2f}/{r['object_prob']:.2f})")
    flags = " --base-only" if args.base_only else ""
    print(f'`python scripts/txt2img.py "{args.prompt}"{flags}`: median {median:.1f} s wall over {args.runs} runs '
          f"({', '.join(f'{t:.1f}' for t in times)} s; start-up, model load, sampling and PNG included) "
          f"on {cpu_name()}; the judge reads {read_as}{verdict}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
