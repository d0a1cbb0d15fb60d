#!/usr/bin/env python
"""Export procedural captioned images as an ``imagefolder`` (PNGs + metadata.jsonl).

    python scripts/toy/export_procedural.py --out data/shapes --n 10000 --seed 0 --split train

The folder loads offline with ``datasets.load_dataset("imagefolder", data_dir=OUT)``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


from ldm.toy.procedural import SPLITS, export_imagefolder


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--n", required=True, type=int, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (>= 0)")
    parser.add_argument("--split", choices=SPLITS, default="train",
                        help="train: never held-out pairs; heldout: only held-out pairs; all: every pair")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.image_size < 8:
        parser.error(f"--image-size must be >= 8, got {args.image_size}")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        export_imagefolder(args.out, args.n, seed=args.seed, split=args.split, image_size=args.image_size)
    except OSError as error:
        print(f"error: cannot write to {args.out}: {error.strerror or error}", file=sys.stderr)
        return 1
    logging.info("%d images in %.1f s", args.n, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
