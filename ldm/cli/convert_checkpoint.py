"""Convert Stable Diffusion weights between an original single file, this package's folder and diffusers.

    # an original SD 2.1 768-v file -> a diffusers folder, in half precision
    python scripts/convert_checkpoint.py v2-1_768-ema-pruned.safetensors sd21-diffusers --to diffusers \\
        --config configs/sd-v2-inference-v.yaml --fp16
    # a diffusers folder -> one original .safetensors file (plus a CompVis YAML beside it)
    python scripts/convert_checkpoint.py sd15-diffusers sd15.safetensors --to original
    # keep only the EMA U-Net of a "full" training checkpoint
    python scripts/convert_checkpoint.py sd-v1-4-full-ema.ckpt sd14-ema.safetensors --to original --ema-only

IN is an original single file (``.safetensors``, or ``.ckpt`` read weights-only: code inside a
pickle never runs), a folder in this package's format, or a diffusers folder. ``--to original``
writes a ``.safetensors`` file and, when the model can be described by one, a CompVis YAML with
the same name beside it (AUTOMATIC1111 and ComfyUI read it; it matters for v-prediction models).

EMA weights: when an original file holds both U-Nets, ``--to original`` keeps both (lossless);
``--ema-only`` keeps only the EMA one (the better one for generating), ``--no-ema`` only the
training one (to resume training). ``--to native`` / ``--to diffusers`` hold one U-Net: the EMA one
unless ``--no-ema``. Weights are written in float32 unless ``--fp16``.

An existing output (a file, or a folder that is not empty) is only replaced with ``--overwrite``;
an existing CompVis YAML beside an original output is kept unless ``--overwrite``. Outputs are
written under a temporary name beside them and renamed when complete; temporaries that a killed
conversion left are removed when the same output is written again.

Errors a user can fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


from ldm.cli import OneLineErrorParser

TARGETS = ("original", "native", "diffusers")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="convert_checkpoint.py",
        description="Convert Stable Diffusion 1.x/2.x weights between formats.",
    )
    parser.add_argument("input", type=Path,
                        help="original single file (.safetensors/.ckpt), our folder or a diffusers folder")
    parser.add_argument("output", type=Path, help="output .safetensors file (--to original) or folder")
    parser.add_argument("--to", choices=TARGETS, required=True, help="output format")
    parser.add_argument("--fp16", action="store_true", help="store weights in float16 (default float32)")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema-only", action="store_true", help="single-file input: keep only the EMA U-Net weights")
    ema.add_argument("--no-ema", action="store_true", help="single-file input: keep only the non-EMA U-Net weights")
    parser.add_argument("--config", type=Path, help="single-file input: CompVis YAML or this package's config.yaml")
    parser.add_argument("--prediction", choices=("eps", "v"), help="single-file input: eps or v prediction")
    parser.add_argument("--vae", type=Path, help="single-file input: replace its VAE with this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file or folder")
    parser.add_argument("--quiet", action="store_true", help="no info logs")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.input.exists():
        parser.error(f"input not found: {args.input}")
    if args.input.resolve() == args.output.resolve():
        parser.error("output must differ from input")
    single_file_options = [flag for flag, value in (
        ("--ema-only", args.ema_only), ("--no-ema", args.no_ema), ("--config", args.config),
        ("--prediction", args.prediction), ("--vae", args.vae)) if value]
    if args.input.is_dir() and single_file_options:
        parser.error(f"{', '.join(single_file_options)} apply to single-file input, not to a folder")
    if args.to == "original" and args.output.suffix != ".safetensors":
        parser.error(f"--to original writes a .safetensors file, got {args.output}")
    if args.to != "original" and args.output.suffix in (".safetensors", ".ckpt"):
        parser.error(f"--to {args.to} writes a folder, got the file name {args.output}")
    if not args.overwrite and _occupied(args.output):
        parser.error(f"output {args.output} exists: pass --overwrite to replace it")


def _occupied(path: Path) -> bool:
    """Whether writing ``path`` would replace something: a file, or a folder with anything in it."""
    return path.is_file() or path.is_symlink() or (path.is_dir() and any(path.iterdir()))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    from ldm.errors import LdmError

    try:
        convert(args)
    except LdmError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def ema_choice(args: argparse.Namespace) -> bool | str:
    """The ``ema`` argument of the single-file reader for the EMA flags."""
    return True if args.ema_only else False if args.no_ema else "auto"


def convert(args: argparse.Namespace) -> None:
    import torch

    from ldm.formats.checkpoints import remove_stale_temporaries

    for leftover in remove_stale_temporaries(args.output):
        logging.getLogger(__name__).info("removed %s, left by a conversion that was killed", leftover.name)
    dtype = torch.float16 if args.fp16 else torch.float32
    if args.input.is_file() and args.to == "original":
        convert_single_file_to_single_file(args, dtype)
        return
    pipe = load_pipeline(args)
    if args.to == "original":
        from ldm.formats.single_file_write import save_single_file

        written = save_single_file(pipe, args.output, dtype=dtype)
        write_yaml_beside(written, args.output, overwrite=args.overwrite)
    else:
        pipe.save_pretrained(args.output, format=args.to, dtype=dtype)
    logging.getLogger(__name__).info("wrote %s", args.output)


def load_pipeline(args: argparse.Namespace):
    from ldm.pipeline import Txt2ImgPipeline

    if args.input.is_file():
        return Txt2ImgPipeline.from_single_file(args.input, args.config, prediction=args.prediction, vae=args.vae,
                                                ema=ema_choice(args))
    return Txt2ImgPipeline.from_pretrained(args.input)


def convert_single_file_to_single_file(args: argparse.Namespace, dtype) -> None:
    """Original -> original without building the networks: rename, check strictly on the meta device, write.

    Both U-Net weight sets are kept unless an EMA flag picks one.
    """
    from ldm.formats import single_file, single_file_write

    checkpoint = single_file.read_single_file(args.input, args.config, prediction=args.prediction, vae=args.vae,
                                              ema=ema_choice(args))
    single_file_write.check_fits(checkpoint)
    parts = dict(checkpoint.parts)
    ema_unet = None
    keep_both = ema_choice(args) == "auto" and checkpoint.ema_unet is not None and checkpoint.non_ema_unet is not None
    if keep_both:
        parts["unet"], ema_unet = checkpoint.non_ema_unet, checkpoint.ema_unet
    written = single_file_write.write_single_file(
        args.output, checkpoint.config, parts, ema_unet=ema_unet,
        ema_buffers=checkpoint.ema_buffers if keep_both else None, dtype=dtype)
    write_yaml_beside(written, args.output, overwrite=args.overwrite)
    logging.getLogger(__name__).info("wrote %s%s", args.output, " (EMA and non-EMA U-Nets)" if keep_both else "")


def write_yaml_beside(config, output: Path, *, overwrite: bool = False) -> None:
    """A CompVis YAML next to the file, for tools that need one; skipped when no YAML can describe the model,
    and (with a warning) when a YAML is already there, unless ``overwrite``."""
    from ldm.errors import ConfigError
    from ldm.formats.compvis import save_compvis_yaml

    path = output.with_suffix(".yaml")
    if path.exists() and not overwrite:
        logging.getLogger(__name__).warning("kept the existing %s (pass --overwrite to replace it)", path)
        return
    try:
        save_compvis_yaml(config, path)
    except ConfigError as error:
        logging.getLogger(__name__).info("no CompVis YAML written beside %s (%s)", output.name, error)


if __name__ == "__main__":
    sys.exit(main())
