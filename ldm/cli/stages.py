"""The txt2img command's extra stages: a super-resolution stage after the base model (the cascade) and
classifier guidance during it. Kept apart from :mod:`ldm.cli.txt2img` so that file stays about prompts,
seeds and files.

* ``--upscaler PATH`` runs a super-resolution model (``pipe.upscale``) on every base image; the default
  model's own 64 -> 256 stage (``ldm/toy/default_upscaler``) runs by default when ``--model`` is not
  given, ``--base-only`` skips it. ``--upscale-steps``, ``--upscale-noise-level`` and ``--upscale-colour-fix`` tune it.
* ``--classifier-scale S --class "red bicycle"`` guides the base model with a noise-aware classifier
  (``--classifier PATH``; default: the default model's ``ldm/toy/default_classifier``).
* ``--refiner PATH --refiner-switch 0.8`` hands the base model's chain to an SDXL refiner at that fraction of
  the schedule (:mod:`ldm.refiner`), written as AUTOMATIC1111's ``Refiner`` / ``Refiner switch at``.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from ldm.cli import check_colour_fix_flag, finite_float

PACKAGE = Path(__file__).resolve().parents[1]
DEFAULT_UPSCALER = PACKAGE / "toy" / "default_upscaler"
DEFAULT_CLASSIFIER = PACKAGE / "toy" / "default_classifier"


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cascade and classifier guidance")
    group.add_argument("--upscaler", type=Path, metavar="PATH",
                       help="a super-resolution model (e.g. SD's x4 upscaler) run on every image after the base "
                       "model; default: the default model's 64->256 stage when --model is not given")
    group.add_argument("--base-only", action="store_true", help="skip the super-resolution stage (the default "
                       "model then writes its native 64x64 images)")
    group.add_argument("--upscale-steps", type=int, help="steps of the super-resolution stage (default: its model's)")
    group.add_argument("--upscale-noise-level", type=int,
                       help="augmentation noise level of the super-resolution stage (default: its model's)")
    group.add_argument("--upscale-colour-fix", type=finite_float, metavar="SIGMA",
                       help="colour correction of the super-resolution stage: content coarser than this Gaussian "
                       "sigma (output pixels) comes from the base image (0: off; default: its model's)")
    group.add_argument("--classifier-scale", type=finite_float, default=0.0,
                       help="classifier guidance strength (Dhariwal & Nichol 2021; default 0: off); needs --class")
    group.add_argument("--class", dest="target_class", metavar="TEXT",
                       help='the class classifier guidance draws, e.g. "red bicycle", "star" or "blue"')
    group.add_argument("--classifier", type=Path, metavar="PATH",
                       help="noise-aware classifier folder (default: the default model's)")
    refiner = parser.add_argument_group("SDXL refiner (ensemble of experts)")
    refiner.add_argument("--refiner", type=Path, metavar="PATH",
                         help="a refiner model (e.g. sd_xl_refiner_1.0.safetensors, or a diffusers folder) that "
                         "takes over the base model's sampling chain at --refiner-switch and decodes the image")
    refiner.add_argument("--refiner-switch", type=finite_float, metavar="FRACTION",
                         help="the fraction of the noise schedule the base model denoises before the refiner "
                         "takes over, in (0, 1) (default 0.8)")


def check_stage_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors for stage flags that cannot work together (before any model is loaded)."""
    if args.base_only and args.upscaler is not None:
        parser.error("--base-only and --upscaler exclude each other")
    if args.upscale_steps is not None and args.upscale_steps < 1:
        parser.error(f"--upscale-steps must be at least 1, got {args.upscale_steps}")
    check_colour_fix_flag(parser, "--upscale-colour-fix", args.upscale_colour_fix)
    for flag, value in (("--upscaler", args.upscaler), ("--classifier", args.classifier)):
        if value is not None and not value.exists():
            parser.error(f"{flag} {value} does not exist")
    if args.classifier_scale and not args.target_class:
        parser.error('--classifier-scale needs --class (the class to draw, e.g. --class "red bicycle")')
    if args.target_class and not args.classifier_scale:
        parser.error("--class needs --classifier-scale (how strongly to guide, e.g. 4)")
    if args.classifier_scale and args.classifier is None and args.model is not None:
        parser.error("--classifier-scale with --model needs --classifier (the default classifier reads the "
                     "default model's latents only)")
    if args.refiner is not None and not args.refiner.exists():
        parser.error(f"--refiner {args.refiner} does not exist")
    if args.refiner_switch is not None:
        if args.refiner is None:
            parser.error("--refiner-switch needs --refiner (the model that takes over)")
        if not 0 < args.refiner_switch < 1:
            parser.error(f"--refiner-switch must be between 0 and 1 (exclusive), got {args.refiner_switch:g}")


def refiner_from_png(parser: argparse.ArgumentParser, args: argparse.Namespace, fields: dict[str, str]) -> None:
    """--from-png of an image made with a refiner: its switch (unless given), and its refiner unless --refiner
    names one: the recorded name (AUTOMATIC1111's "name [hash]" too) found in the current folder or beside
    --model, else a one-line error (without the refiner the image would differ)."""
    if "Refiner" not in fields:
        return
    if args.refiner_switch is None and "Refiner switch at" in fields:
        try:
            args.refiner_switch = finite_float(fields["Refiner switch at"])
        except argparse.ArgumentTypeError:
            parser.error(f"--from-png {args.from_png}: cannot read Refiner switch at: {fields['Refiner switch at']!r}")
    if args.refiner is not None:
        return
    name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", fields["Refiner"])  # the web UI's short hash
    folders = [Path.cwd()] + ([Path(args.model).expanduser().parent] if args.model else [])
    candidates = [folder / (name + suffix) for folder in folders for suffix in ("", ".safetensors", ".ckpt")]
    found = next((path for path in candidates if path.exists()), None)
    if found is None:
        parser.error(f"--from-png {args.from_png} was made with the refiner {name!r}, not found here or beside "
                     "--model: give its path with --refiner")
    args.refiner = found


@dataclass
class Stages:
    """What :func:`load_stages` found: the upscaler pipeline and the classifier guidance (each optional)."""

    upscaler: object | None = None
    upscaler_name: str = ""
    classifier_guidance: object | None = None
    refiner: object | None = None
    refiner_switch: float | None = None

    def call_options(self, args: argparse.Namespace) -> dict:
        """Keywords for the base pipeline's call."""
        options = {}
        if self.classifier_guidance is not None:
            options |= {"classifier_guidance": self.classifier_guidance, "classifier_scale": args.classifier_scale}
        if self.refiner is not None:
            options |= {"refiner": self.refiner, "refiner_switch": self.refiner_switch}
        return options

    def upscale(self, images, prompt: str, negative_prompt: str, seed: int, args: argparse.Namespace, progress):
        """The base images enlarged by the super-resolution stage (image k with seed ``seed + k``)."""
        if self.upscaler is None:
            return images
        return self.upscaler.upscale(images, prompt, negative_prompt, seed=seed, steps=args.upscale_steps,
                                     noise_level=args.upscale_noise_level, colour_fix=args.upscale_colour_fix,
                                     progress=progress)

    def upscale_steps(self, args: argparse.Namespace) -> int:
        return 0 if self.upscaler is None else args.upscale_steps or self.upscaler.config.sampling.steps

    def png_fields(self, args: argparse.Namespace, width: int, height: int) -> dict:
        """AUTOMATIC1111-style parameter fields of the stages that ran (``width`` x ``height``: the base size)."""
        fields = {}
        if self.upscaler is not None:
            level = args.upscale_noise_level
            fields["Upscaler"] = self.upscaler_name
            fields["Upscale steps"] = self.upscale_steps(args)
            fields["Noise level"] = self.upscaler.config.upscale.noise_level if level is None else level
            fields["Upscaled size"] = "x".join(str(side * self.upscaler.vae.downsample_factor)
                                               for side in (width, height))
            sigma = self.upscaler.config.upscale.colour_fix if args.upscale_colour_fix is None else args.upscale_colour_fix
            if sigma:
                fields["Colour fix"] = f"{sigma:g}"
        if self.classifier_guidance is not None:
            fields["Classifier guidance"] = f"{args.target_class} x {args.classifier_scale:g}"
        if self.refiner is not None:  # the web UI's names for them (its Refiner is "name [hash]")
            fields["Refiner"] = Path(args.refiner).name
            fields["Refiner switch at"] = f"{self.refiner_switch:g}"
        return fields


def load_stages(args: argparse.Namespace, device, dtype) -> Stages:
    """Load the upscaler and the classifier the flags ask for (the default ones for the default model);
    nothing for commands without these flags (img2img, inpainting)."""
    from ldm.errors import ArgumentError
    from ldm.formats.classifier import load_classifier
    from ldm.pipeline import Txt2ImgPipeline
    from ldm.refiner import DEFAULT_SWITCH
    from ldm.sampling.classifier_guidance import ClassifierGuidance

    stages = Stages()
    if not hasattr(args, "base_only"):
        return stages
    upscaler = args.upscaler
    if upscaler is None and args.model is None and not args.base_only and DEFAULT_UPSCALER.is_dir():
        upscaler = DEFAULT_UPSCALER
    if upscaler is not None:
        stages.upscaler = Txt2ImgPipeline.from_pretrained(upscaler, device=device, dtype=dtype)
        stages.upscaler_name = "default" if upscaler == DEFAULT_UPSCALER else Path(upscaler).name
        if not stages.upscaler.config.is_upscaler:
            raise ArgumentError(f"--upscaler {upscaler} is not a super-resolution model (its config has no "
                                "upscale section)")
    if args.classifier_scale:
        classifier = load_classifier(args.classifier or DEFAULT_CLASSIFIER)
        stages.classifier_guidance = ClassifierGuidance(classifier, args.target_class)
    if args.refiner is not None:
        stages.refiner = Txt2ImgPipeline.from_pretrained(args.refiner, device=device, dtype=dtype)
        stages.refiner_switch = DEFAULT_SWITCH if args.refiner_switch is None else args.refiner_switch
    return stages


__all__ = ["add_stage_arguments", "check_stage_arguments", "load_stages", "refiner_from_png", "Stages",
           "DEFAULT_UPSCALER", "DEFAULT_CLASSIFIER"]
