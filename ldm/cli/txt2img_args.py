"""The txt2img command's arguments after argparse: everything :func:`ldm.cli.txt2img.build_parser` cannot
check itself, refused in one line with exit code 2 before the model loads (``parser.error``).

* :func:`check_arguments` is the entry point: it fills options from ``--from-png`` (an AUTOMATIC1111 PNG's
  parameters, :func:`apply_png_parameters`), then checks numbers, files, images and seeds and reads the
  prompts (:func:`read_prompts`);
* the argparse ``type=`` converters of the parser (``--seed``, ``WxH`` sizes, ``--schedule``) live here too,
  so that ``--from-png`` reads its fields with the same rules as the command line.

Nothing here imports torch or the networks (``--help`` and usage errors answer at once).
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
from pathlib import Path

from ldm.cli import finite_float, sampler_name
from ldm.cli.stages import check_stage_arguments, refiner_from_png
from ldm.sampling.registry import AUTOMATIC, resolve_schedule_name

MAX_SAMPLES = 10_000  # --n-samples above this is a typo, not a plan (each image is kept for the grid)
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes seeds in [0, 2**64)
RANDOM_SEED = -1  # AUTOMATIC1111's "random seed": one is drawn, used and recorded like a given one


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Validate what argparse cannot; return the prompts."""
    if getattr(args, "from_png", None) is not None:
        apply_png_parameters(parser, args)
    fill_defaults(args)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    for flag, value in (("--H", args.height), ("--W", args.width)):
        if value is not None and (value < 8 or value % 8):
            parser.error(f"{flag} must be a positive multiple of 8, got {value}")
    for flag, value in (("--n-samples", args.n_samples), ("--batch-size", args.batch_size)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.n_samples > MAX_SAMPLES:
        parser.error(f"--n-samples must be at most {MAX_SAMPLES}, got {args.n_samples}")
    if args.eta is not None and args.eta < 0:
        parser.error(f"--eta must be >= 0, got {args.eta}")
    if args.clip_skip is not None and args.clip_skip < 1:
        parser.error(f"--clip-skip must be at least 1, got {args.clip_skip}")
    single_file_options = [flag for flag, value in (("--config", args.config), ("--prediction", args.prediction),
                                                    ("--vae", args.vae)) if value is not None]
    if single_file_options and (args.model is None or Path(args.model).expanduser().is_dir()):
        parser.error(f"{', '.join(single_file_options)} apply to a single-file checkpoint (--model FILE)")
    args.lora = [parse_lora(parser, spec) for spec in args.lora]
    if args.embeddings is not None and not args.embeddings.is_dir():
        parser.error(f"--embeddings {args.embeddings} is not a folder")
    check_image_arguments(parser, args)
    if hasattr(args, "base_only"):
        check_stage_arguments(parser, args)
    check_outdir(parser, args.outdir)
    check_text(parser, "--negative-prompt", args.negative_prompt)
    prompts = read_prompts(parser, args)
    if not 0 <= args.subseed_strength <= 1:
        parser.error(f"--subseed-strength must be in [0, 1], got {args.subseed_strength:g}")
    check_seeds(parser, args, len(prompts) * args.n_samples)
    return prompts


def fill_defaults(args: argparse.Namespace) -> None:
    """Defaults of the options --from-png may fill (they are None until then)."""
    args.negative_prompt = "" if args.negative_prompt is None else args.negative_prompt
    args.seed = 0 if args.seed is None else args.seed
    args.subseed_strength = 0.0 if args.subseed_strength is None else args.subseed_strength
    if hasattr(args, "hires_strength"):
        args.hires_strength = 0.5 if args.hires_strength is None else args.hires_strength
        args.hires_upscaler = args.hires_upscaler or "latent"


def apply_png_parameters(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill every option not given on the command line from the AUTOMATIC1111 parameters of --from-png."""
    from ldm.images import read_a1111_parameters

    text = open_image(parser, "--from-png", args.from_png).info.get("parameters")
    if not text:
        parser.error(f"--from-png {args.from_png} carries no AUTOMATIC1111 parameters")
    fields = read_a1111_parameters(text)
    if "Denoising strength" in fields and "Hires upscale" not in fields:
        parser.error(f"--from-png {args.from_png} was made from an image (img2img or inpainting): "
                     "use img2img.py or inpaint.py with that image")

    def fill(option: str, key: str, convert) -> None:
        if getattr(args, option) is None and key in fields:
            try:
                setattr(args, option, convert(fields[key]))
            except (ValueError, KeyError, IndexError, argparse.ArgumentTypeError):
                parser.error(f"--from-png {args.from_png}: cannot read {key}: {fields[key]!r}")

    def size(part: int):
        return lambda value: int(value.lower().split("x")[part])

    for option, key, convert in (
        ("prompt", "Prompt", str), ("negative_prompt", "Negative prompt", str), ("steps", "Steps", int),
        ("subseed", "Variation seed", seed_argument), ("subseed_strength", "Variation seed strength", finite_float),
        ("seed_resize_from", "Seed resize from", size_argument),
        ("sampler", "Sampler", sampler_name), ("scale", "CFG scale", finite_float), ("seed", "Seed", seed_argument),
        ("width", "Size", size(0)), ("height", "Size", size(1)), ("clip_skip", "Clip skip", int),
        ("schedule", "Schedule type", schedule_name),
        ("hires_scale", "Hires upscale", finite_float), ("hires_steps", "Hires steps", int),
        ("hires_upscaler", "Hires upscaler", lambda value: {"latent": "latent", "lanczos": "lanczos"}[value.lower()]),
    ):
        fill(option, key, convert)
    if "Hires upscale" in fields:
        fill("hires_strength", "Denoising strength", finite_float)
    refiner_from_png(parser, args, fields)


def read_prompts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The prompt, or the non-empty lines of --from-file (UTF-8 text)."""
    if args.from_file is None:
        if args.prompt is None:
            parser.error("a prompt is required (or --from-file)")
        check_text(parser, "the prompt", args.prompt)
        return [args.prompt]
    if args.prompt is not None:
        parser.error("give a prompt or --from-file, not both")
    try:
        lines = args.from_file.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        parser.error(f"cannot read --from-file {args.from_file}: {error.strerror or error}")
    except UnicodeDecodeError as error:
        parser.error(f"--from-file {args.from_file} is not UTF-8 text: byte 0x{error.object[error.start]:02x} "
                     f"at offset {error.start}")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        parser.error(f"--from-file {args.from_file} holds no prompts")
    return prompts


def check_text(parser: argparse.ArgumentParser, what: str, text: str) -> None:
    """Refuse text that cannot be written as UTF-8: bytes of another encoding in the command line
    arrive as lone surrogates (``\\udcff``), which the PNG parameters could not hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        parser.error(f"{what} is not valid UTF-8 text (is the terminal's encoding UTF-8?): {ascii(text)}")


def check_seeds(parser: argparse.ArgumentParser, args: argparse.Namespace, images: int) -> None:
    """--seed and --subseed: draw the ones given as -1, refuse runs whose last image's seed is past 2**64 - 1."""
    args.random_seed = args.seed == RANDOM_SEED
    args.seed = first_seed(parser, "--seed", args.seed, images)
    if args.subseed is not None:
        args.subseed = first_seed(parser, "--subseed", args.subseed, images)


def first_seed(parser: argparse.ArgumentParser, flag: str, seed: int, images: int) -> int:
    """``seed``, or a random one for -1; one line when ``seed + images - 1`` is past the largest seed."""
    if seed == RANDOM_SEED:
        seed = secrets.randbelow(2**32)  # AUTOMATIC1111 draws 32-bit seeds too
    last = seed + images - 1
    if last > MAX_SEED:
        parser.error(f"{flag} {seed} with {images} images needs seeds up to {last}, past the largest, 2**64 - 1")
    return seed


def check_outdir(parser: argparse.ArgumentParser, outdir: Path) -> None:
    """Refuse an --outdir that is a file, lies under a file, or sits in a folder this user cannot write to.

    Nothing is created here (a failed model load leaves no folder behind); writing can still fail
    later (a full disk), which :func:`save_png` reports in one line.
    """
    if outdir.exists():
        if not outdir.is_dir():
            parser.error(f"--outdir {outdir} is a file, not a folder")
        existing = outdir
    else:
        existing = next((parent for parent in outdir.absolute().parents if parent.exists()), Path("/"))
        if not existing.is_dir():
            parser.error(f"--outdir {outdir} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--outdir {outdir} is not writable ({existing}: permission denied or read-only)")


def parse_lora(parser: argparse.ArgumentParser, spec: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:SCALE`` -> (path, scale); the file must exist."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = spec
    if not math.isfinite(scale):
        parser.error(f"--lora {spec}: the scale must be a finite number, got {tail!r}")
    if not Path(path).is_file():
        parser.error(f"--lora file not found: {path}")
    return Path(path), scale


def check_image_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """img2img / inpaint: read the images, check strength, padding, blur and --outpaint."""
    if not hasattr(args, "strength"):
        args.images = {}
        if args.hires_scale is not None and args.hires_scale <= 1:
            parser.error(f"--hires-scale must be > 1, got {args.hires_scale:g}")
        if not 0 < args.hires_strength <= 1:
            parser.error(f"--hires-strength must be in (0, 1], got {args.hires_strength:g}")
        if args.hires_steps is not None and args.hires_steps < 1:
            parser.error(f"--hires-steps must be at least 1, got {args.hires_steps}")
        return
    if not 0 < args.strength <= 1:
        parser.error(f"--strength must be in (0, 1], got {args.strength:g}")
    if hasattr(args, "init_img"):
        args.images = {"image": open_image(parser, "--init-img", args.init_img)}
        return
    for flag, value in (("--padding", args.padding), ("--mask-blur", args.mask_blur)):
        if value < 0:
            parser.error(f"{flag} must be >= 0, got {value:g}")
    if args.outpaint is not None:
        try:
            args.outpaint = tuple(int(part) for part in args.outpaint.split(","))
        except ValueError:
            args.outpaint = ()
        if len(args.outpaint) != 4 or min(args.outpaint) < 0 or sum(args.outpaint) == 0:
            parser.error("--outpaint takes LEFT,RIGHT,TOP,BOTTOM: four pixel counts >= 0, not all 0")
    elif args.mask is None:
        parser.error("--mask is required (or --outpaint)")
    image = open_image(parser, "--image", args.image)
    mask = open_image(parser, "--mask", args.mask) if args.mask is not None else None
    if mask is not None and mask.size != image.size:
        parser.error(f"--mask is {mask.size[0]}x{mask.size[1]} but --image is {image.size[0]}x{image.size[1]}: "
                     "they must be the same size")
    args.images = {"image": image, "mask_image": mask}


def open_image(parser: argparse.ArgumentParser, flag: str, path: Path):
    """Open and fully read an image file, or exit with a one-line error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        parser.error(f"{flag} file not found: {path}")
    except (UnidentifiedImageError, OSError) as error:
        parser.error(f"{flag} {path} is not a readable image ({error.__class__.__name__})")


def seed_argument(text: str) -> int:
    """argparse ``type=`` for ``--seed``: an integer torch can seed with, or -1 for a random seed."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value != RANDOM_SEED and not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64 - 1] (or {RANDOM_SEED} for a random seed), "
                                         f"got {text}")
    return value


def size_argument(text: str) -> tuple[int, int]:
    """argparse ``type=`` for ``WxH`` sizes in pixels (``512x768``) -> ``(height, width)``."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() and int(part) >= 8 for part in parts):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, each at least 8 (e.g. 512x512), got {text!r}")
    return int(parts[1]), int(parts[0])


def schedule_name(text: str) -> str:
    """argparse ``type=`` for ``--schedule``: ours (``sgm_uniform``), the web UI's label (``"SGM Uniform"``), or
    ``Automatic`` (kept as given: the pipeline resolves it for the sampler in use)."""
    if text.strip().lower() == AUTOMATIC:
        return AUTOMATIC
    try:
        return resolve_schedule_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
