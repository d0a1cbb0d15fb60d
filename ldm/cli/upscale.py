"""Enlarge images with a diffusion super-resolution model (SD's x4 upscaler or the default cascade's stage).

    python scripts/upscale.py small.png
    python scripts/upscale.py a.png b.png --model path/to/stable-diffusion-x4-upscaler --prompt "a white cat" \\
        --noise-level 20 --steps 50 --guidance-scale 9 --sampler ddim --seed 7

Each image comes back ``f`` times larger (``f``: the model's VAE downsampling, 4 for both models), its detail
drawn by ``pipe.upscale`` (:meth:`ldm.pipeline.Txt2ImgPipeline.upscale`) conditioned on the image and the
prompt. Image ``k`` uses seed ``--seed + k`` (and is the image that seed gives alone). Output as
:mod:`ldm.cli.txt2img` writes it: numbered PNGs in --outdir (never overwriting, written atomically) with
AUTOMATIC1111 parameters, paths printed; mistakes give one line and exit code 2 (a model that is not a
super-resolution model, image sides the model cannot take, a noise level outside ``[0, max_noise_level]``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.cli import OneLineErrorParser, check_colour_fix_flag, finite_float, run_reporting_errors, sampler_name
from ldm.cli.stages import DEFAULT_UPSCALER
from ldm.cli.txt2img import advance, save_png
from ldm.cli.txt2img_args import RANDOM_SEED, check_outdir, check_text, first_seed, open_image, seed_argument
from ldm.hardware import DTYPE_NAMES
from ldm.sampling.registry import SAMPLER_NAMES

# The 64 -> 256 stage of the default model's cascade (configs/default-upscaler.yaml), shipped in the package.
logger = logging.getLogger("upscale")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="upscale.py",
        description="Enlarge images with a diffusion super-resolution model (SD's x4 upscaler form): the small "
        "image, lightly noised (--noise-level), conditions the sampling of the large one, with a prompt.",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="the images to enlarge")
    parser.add_argument("--model", help="super-resolution model: folder (ours or a diffusers "
                        "StableDiffusionUpscalePipeline), original single file (x4-upscaler-ema.safetensors) "
                        "or hub id; default: the shipped upscaler of the default model")
    parser.add_argument("--prompt", default="", help="what the image shows (default: nothing)")
    parser.add_argument("--negative-prompt", default="", help="what to steer away from (default: nothing)")
    parser.add_argument("--noise-level", type=int, help="augmentation noise added to the small image, 0 to the "
                        "model's maximum (350 for SD's x4): higher hides its flaws and invents more detail "
                        "(default: the model's, 20)")
    parser.add_argument("--colour-fix", type=finite_float, metavar="SIGMA",
                        help="take the result's content coarser than this Gaussian sigma (output pixels) from the "
                        "input, keeping its detail: corrects colour drift (0: off; default: the model's, 0 for "
                        "SD's x4, 3 for the default upscaler)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    parser.add_argument("--guidance-scale", "--scale", type=finite_float, dest="scale",
                        help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--sampler", type=sampler_name, metavar="NAME",
                        help=f"sampler: {', '.join(SAMPLER_NAMES)}, or AUTOMATIC1111's name for it; default: "
                        "the model's")
    parser.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None,
                        help="use Karras et al. (2022) sigmas (default: the model's)")
    parser.add_argument("--eta", type=finite_float, help="DDIM eta: 0 deterministic, 1 ancestral (default 0)")
    parser.add_argument("--seed", type=seed_argument, default=0,
                        help=f"seed of the first image, 0 to 2**64-1 (default 0); image k uses seed+k. "
                        f"{RANDOM_SEED}: a random seed, recorded like a given one")
    parser.add_argument("--outdir", type=Path, default=Path("outputs") / "upscale", help="output folder")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, then cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                        help="auto: float16 on GPU, float32 on CPU; fast: float16 on GPU, bfloat16 + channels-last "
                        "on CPUs with native bfloat16, else float32")
    parser.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
                        help="decode in overlapping tiles (default: automatically above 1024x1024 pixels)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or info logs")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    """Validate what needs no model (the model checks the noise level's maximum and the image sides); return
    the images, fully read."""
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.noise_level is not None and args.noise_level < 0:
        parser.error(f"--noise-level must be >= 0, got {args.noise_level}")
    if args.eta is not None and args.eta < 0:
        parser.error(f"--eta must be >= 0, got {args.eta}")
    check_colour_fix_flag(parser, "--colour-fix", args.colour_fix)
    if args.model is None and not DEFAULT_UPSCALER.is_dir():
        parser.error("no default upscaler ships with this install yet; pass --model (a super-resolution model)")
    check_text(parser, "--prompt", args.prompt)
    check_text(parser, "--negative-prompt", args.negative_prompt)
    check_outdir(parser, args.outdir)
    args.random_seed = args.seed == RANDOM_SEED
    args.seed = first_seed(parser, "--seed", args.seed, len(args.images))
    return [open_image(parser, "IMAGE", path) for path in args.images]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    images = check_arguments(parser, args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    return run_reporting_errors(parser, lambda: upscale(args, images), args.device)


def upscale(args: argparse.Namespace, images: list) -> int:
    """Load the model, enlarge the images one by one (``pipe.upscale``, image ``k`` with seed ``--seed + k``),
    write each PNG as soon as it is drawn."""
    from tqdm import tqdm

    from ldm.hardware import pick_device, pick_precision
    from ldm.pipeline import Txt2ImgPipeline

    device = pick_device(args.device, what="--device")
    if args.random_seed:
        logger.info("--seed %d: random seed %d", RANDOM_SEED, args.seed)
    precision = pick_precision(args.dtype, device)
    pipe = Txt2ImgPipeline.from_pretrained(args.model or DEFAULT_UPSCALER, device=device, dtype=precision.dtype)
    if precision.channels_last:
        pipe.to(memory_format=precision.memory_format)
    logger.info("running on %s in %s", device, precision.describe())
    for offset, small in enumerate(images):
        seed = args.seed + offset
        with tqdm(desc=f"seed {seed}", file=sys.stderr, disable=args.quiet, leave=False) as bar:
            large = pipe.upscale(small, args.prompt, args.negative_prompt, noise_level=args.noise_level,
                                 steps=args.steps, guidance_scale=args.scale, sampler=args.sampler, seed=seed,
                                 eta=args.eta, karras=args.karras, vae_tiling=args.vae_tiling,
                                 colour_fix=args.colour_fix, progress=lambda done, total: advance(bar, done, total))[0]
        print(save_png(large, args.outdir, str(seed), png_parameters(args, pipe, small, large, seed)), flush=True)
    return 0


def png_parameters(args: argparse.Namespace, pipe, small, large, seed: int) -> str:
    """AUTOMATIC1111's parameters of one enlarged image, with the settings the model filled in."""
    from ldm.images import a1111_parameters

    options = pipe.sampling_options(steps=args.steps, guidance_scale=args.scale, sampler=args.sampler,
                                    height=large.height, width=large.width, eta=args.eta, karras=args.karras,
                                    signal_leak=False)
    noise_level = pipe.config.upscale.noise_level if args.noise_level is None else args.noise_level
    extra = {"Model": Path(args.model).name if args.model else DEFAULT_UPSCALER.name, "Noise level": noise_level,
             "Upscale input": f"{small.width}x{small.height}"}
    colour_fix = pipe.config.upscale.colour_fix if args.colour_fix is None else args.colour_fix
    if colour_fix:
        extra["Colour fix"] = f"{colour_fix:g}"
    return a1111_parameters(args.prompt, args.negative_prompt, steps=options.steps, sampler=options.sampler,
                            guidance_scale=options.guidance_scale, seed=seed, width=large.width, height=large.height,
                            schedule=options.schedule, extra=extra)


if __name__ == "__main__":
    sys.exit(main())
