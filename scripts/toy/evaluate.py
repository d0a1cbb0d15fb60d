#!/usr/bin/env python
"""Evaluate a text-to-image model on procedural prompts it never saw verbatim, scored by the judge.

    python scripts/toy/evaluate.py                          # the shipped default model, 240 images
    python scripts/toy/evaluate.py --model path/to/model --n 240 --steps 20 --out eval/ --grid eval/grid.png

Prints a markdown table (object / colour / both-correct accuracy for seen and held-out
(colour, object) pairs, for generated images, real images through the VAE and real images;
Frechet distance on judge features beside the real-vs-real floor) and writes it to
``<out>/evaluation.md``, the numbers to ``<out>/evaluation.json`` and a grid of samples with
their prompts (``--grid``, default ``<out>/samples.png``). See :mod:`ldm.toy.evaluation`.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from ldm.cli import OneLineErrorParser, check_colour_fix_flag, sampler_name
from ldm.sampling.registry import SAMPLER_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder (default: the model shipped in the package)")
    parser.add_argument("--judge", help="judge weights (default: the judge shipped in the package)")
    parser.add_argument("--n", type=int, default=240, help="number of generated images (default 240)")
    parser.add_argument("--heldout-per-pair", type=int, default=5,
                        help="images per held-out (colour, object) pair, part of --n (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of image 0; image i uses seed + i")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--sampler", type=sampler_name, metavar="NAME",
                        help=f"sampler: {', '.join(SAMPLER_NAMES)}, or AUTOMATIC1111's name for it "
                        "(e.g. \"DPM++ 2M\", \"Euler a\"); default: the model's")
    parser.add_argument("--size", type=int, help="image side in pixels (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images sampled at once; 1 reproduces txt2img.py bit for bit (default 16)")
    parser.add_argument("--no-signal-leak", dest="signal_leak", action="store_false", default=None,
                        help="start from pure noise even when the model has signal-leak statistics")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, ...")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="precision of the model (the judge always runs in float32)")
    parser.add_argument("--upscaler", type=Path, help="a super-resolution model run on every image (the cascade: "
                        "ldm/toy/default_upscaler); real images are then rendered at the enlarged size")
    parser.add_argument("--upscale-steps", type=int, help="steps of the super-resolution stage (default: its model's)")
    parser.add_argument("--upscale-colour-fix", type=float, metavar="SIGMA",
                        help="colour fix of the super-resolution stage (default: its model's; 0: off)")
    parser.add_argument("--out", type=Path, default=Path("outputs/evaluation"), help="output folder")
    parser.add_argument("--grid", type=Path, help="sample grid PNG (default: <out>/samples.png)")
    parser.add_argument("--quiet", action="store_true", help="only the table, no progress logs")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Ranges argparse cannot check: one line and exit 2 for each mistake."""
    for flag, value, least in (("--n", args.n, 1), ("--heldout-per-pair", args.heldout_per_pair, 0),
                               ("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1),
                               ("--size", args.size, 8), ("--seed", args.seed, 0),
                               ("--upscale-steps", args.upscale_steps, 1)):
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        parser.error(f"--guidance must be a finite number, got {args.guidance}")
    check_colour_fix_flag(parser, "--upscale-colour-fix", args.upscale_colour_fix)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    import torch

    from ldm.errors import LdmError
    from ldm.toy.evaluation import EvaluationSettings, evaluate, markdown_report, write_outputs
    from ldm.toy.judge import Judge
    from ldm.pipeline import DEFAULT_MODEL_DIR, Txt2ImgPipeline

    started = time.perf_counter()
    try:
        pipe = Txt2ImgPipeline.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype))
        upscaler = None if args.upscaler is None else Txt2ImgPipeline.from_pretrained(
            args.upscaler, device=args.device, dtype=getattr(torch, args.dtype))
        judge = Judge.load(args.judge)
    except (LdmError, FileNotFoundError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
    try:
        settings = EvaluationSettings(
            n=args.n, heldout_per_pair=args.heldout_per_pair, seed=args.seed, steps=args.steps,
            guidance_scale=args.guidance, sampler=args.sampler, height=args.size, width=args.size,
            batch_size=args.batch_size, signal_leak=args.signal_leak, upscale_steps=args.upscale_steps,
            upscale_colour_fix=args.upscale_colour_fix,
        )
        result = evaluate(pipe, judge, settings, model=str(args.model or DEFAULT_MODEL_DIR), upscaler=upscaler)
    except (LdmError, ValueError) as error:  # e.g. --n too small for --heldout-per-pair, a bad --size
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
    result.seconds["total"] = time.perf_counter() - started
    paths = write_outputs(result, args.out, args.grid)
    print(markdown_report(result), end="")
    print(f"\nwrote {paths['markdown']}, {paths['json']}, {paths['grid']} "
          f"({result.seconds['total']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
