#!/usr/bin/env python
"""Is the super-resolution stage sharper than bicubic? Real 64x64 renders in, real 256x256 renders as truth.

    python scripts/toy/upscaler_eval.py --out runs/upscaler-eval

For ``--n`` scenes of the procedural world never used in training (their own seed stream), the 64x64
render is enlarged 4x by (a) bicubic interpolation, (b) Lanczos, (c) the default upscaler (``pipe.upscale``
with the scene's caption, the model's steps, at ``--noise-levels``), and each result is compared with the
same scene rendered directly at 256x256:

* PSNR (dB) against the 256x256 render;
* both for the stage's raw output and, when the model has a default colour fix
  (``upscale.colour_fix``, :func:`ldm.upscaling.colour_fix`), for the corrected one;
* edge sharpness (scenes whose render has edges at all): on the truth's edges (pixels whose Sobel gradient magnitude is at least half the truth's
  largest; flat-colour renders have edges on 2-3% of their pixels),
  the mean gradient magnitude of the image divided by the truth's (1.0 = edges as steep as the truth's
  where the truth has them; interpolation spreads an edge over more pixels, < 1).

Writes ``upscaler_eval.md`` / ``.json`` and a comparison strip (64 -> bicubic -> upscaler -> truth) to --out.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.cli import OneLineErrorParser

EVAL_SEED = 7_777  # a procedural stream no training run uses
MIN_EDGE = 0.05  # Sobel magnitude (luminance 0..1) below which a render counts as having no edges


def psnr(image: Image.Image, truth: Image.Image) -> float:
    a = np.asarray(image, dtype=np.float64) / 255
    b = np.asarray(truth, dtype=np.float64) / 255
    return float(10 * np.log10(1 / max(np.mean((a - b) ** 2), 1e-12)))


def sobel_magnitude(image: Image.Image) -> np.ndarray:
    """Sobel gradient magnitude of the luminance (0..1 scale), ``[H, W]``."""
    grey = np.asarray(image.convert("L"), dtype=np.float64) / 255
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(grey, 1, mode="edge"), (3, 3))
    return np.hypot((windows * kx).sum(axis=(-1, -2)), (windows * kx.T).sum(axis=(-1, -2)))


def edge_sharpness(image: Image.Image, truth: Image.Image) -> float:
    """Mean gradient magnitude of ``image`` on the truth's strong edges, over the truth's there; None for a
    truth without edges (an object whose colour is its background's, up to jitter)."""
    truth_gradient = sobel_magnitude(truth)
    if truth_gradient.max() < MIN_EDGE:
        return None
    edges = truth_gradient >= 0.5 * truth_gradient.max()
    return float(sobel_magnitude(image)[edges].mean() / truth_gradient[edges].mean())


def main(argv=None) -> int:
    parser = OneLineErrorParser(prog="upscaler_eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="super-resolution model (default: the shipped one)")
    parser.add_argument("--n", type=int, default=64, help="scenes (default 64)")
    parser.add_argument("--noise-levels", default="0,20", help="augmentation levels to run (comma-separated)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    parser.add_argument("--out", type=Path, default=Path("outputs/upscaler-eval"))
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    levels = [int(level) for level in args.noise_levels.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from ldm.cli.stages import DEFAULT_UPSCALER
    from ldm.image_inputs import image_to_tensor, to_pil
    from ldm.images import make_grid
    from ldm.upscaling import colour_fix
    from ldm.pipeline import Txt2ImgPipeline
    from ldm.toy.procedural import ProceduralDataset

    started = time.perf_counter()
    pipe = Txt2ImgPipeline.from_pretrained(args.model or DEFAULT_UPSCALER)
    factor = pipe.vae.downsample_factor
    small_set = ProceduralDataset(seed=EVAL_SEED, split="all", image_size=64)
    large_set = ProceduralDataset(seed=EVAL_SEED, split="all", image_size=64 * factor)
    sigma = pipe.config.upscale.colour_fix
    variants = [f"upscaler, noise {level}{suffix}" for level in levels
                for suffix in ("", f", colour fix {sigma:g}" if sigma else None) if suffix is not None]
    methods = {"bicubic": [], "lanczos": [], **{name: [] for name in variants}}
    strip = []
    for i in range(args.n):
        small, truth = small_set.sample(i), large_set.sample(i).image
        size = truth.size
        results = {"bicubic": small.image.resize(size, Image.Resampling.BICUBIC),
                   "lanczos": small.image.resize(size, Image.Resampling.LANCZOS)}
        for level in levels:
            raw = pipe.upscale(small.image, small.caption, seed=i, noise_level=level, steps=args.steps,
                               colour_fix=0, output_type="pt")
            results[f"upscaler, noise {level}"] = to_pil(raw)[0]
            if sigma:
                fixed = colour_fix(raw, image_to_tensor(small.image, *small.image.size), sigma)
                results[f"upscaler, noise {level}, colour fix {sigma:g}"] = to_pil(fixed)[0]
        for name, image in results.items():
            methods[name].append((psnr(image, truth), edge_sharpness(image, truth)))
        if i < 6:
            strip += [small.image.resize(size, Image.Resampling.NEAREST), results["bicubic"],
                      results[variants[-1]], truth]
        logging.info("scene %d/%d", i + 1, args.n)
    summary = {name: {"psnr_db": float(np.mean([p for p, _ in values])),
                      "edge_sharpness": float(np.mean([s for _, s in values if s is not None]))}
               for name, values in methods.items()}
    lines = [f"{args.n} scenes, 64x64 render -> {64 * factor}x{64 * factor}, against the scene rendered at that size",
             "", "| method | PSNR (dB) | edge sharpness (1 = truth) |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {row['psnr_db']:.2f} | {row['edge_sharpness']:.3f} |" for name, row in summary.items()]
    report = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "upscaler_eval.md").write_text(report, encoding="utf-8")
    (args.out / "upscaler_eval.json").write_text(json.dumps(
        {"n": args.n, "steps": args.steps, "summary": summary, "seconds": round(time.perf_counter() - started)},
        indent=2) + "\n", encoding="utf-8")
    make_grid(strip, columns=4).save(args.out / "comparison.png")  # rows: 64 (nearest), bicubic, upscaler, truth
    print(report, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
