"""Generate images from text prompts, and (the same command in other modes) from images: img2img and inpainting.

    python scripts/txt2img.py "a red bicycle"
    python scripts/txt2img.py "a castle" --model path/to/stable-diffusion-v1-5 --steps 25 --seed 7
    python scripts/txt2img.py "a castle" --model v2-1_768-ema-pruned.safetensors --prediction v
    python scripts/img2img.py "a blue bicycle" --init-img bicycle.png --strength 0.6
    python scripts/inpaint.py "a green ball" --image photo.png --mask mask.png --mask-blur 4 --only-masked
    python scripts/inpaint.py "a sunny field" --image photo.png --outpaint 0,128,0,0

Writes numbered PNGs into --outdir (never overwriting a file, never leaving a half-written one
under a numbered name), each carrying its generation parameters in the AUTOMATIC1111 "parameters"
text chunk, and prints their paths. Bad values (NaN or infinite numbers, seeds outside [0, 2**64),
an --outdir that cannot be written, a device this machine lacks, ...) are refused in one line with
exit code 2 before the model loads (:mod:`ldm.cli.txt2img_args`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.cli import OneLineErrorParser, finite_float, run_reporting_errors, sampler_name
from ldm.cli.stages import add_stage_arguments, load_stages
from ldm.cli.txt2img_args import (MAX_SAMPLES, RANDOM_SEED, check_arguments, schedule_name, seed_argument,
                                  size_argument)
from ldm.hardware import DTYPE_NAMES
from ldm.sampling.registry import SAMPLER_NAMES, SCHEDULE_NAMES


MODES = {
    "txt2img": "Generate images from a text prompt with a Stable-Diffusion-style model.",
    "img2img": "Redraw an image after a text prompt (SDEdit: noise it part way, then denoise with the prompt).",
    "inpaint": "Repaint the white part of a mask (or a new border: --outpaint) after a text prompt.",
}


def build_parser(mode: str = "txt2img") -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=f"{mode}.py",
        description=MODES[mode],
        epilog="Prompts are read as AUTOMATIC1111 reads them: (word) or (word:1.3) weighs words up, [word] down, "
        "\\( \\) are literal brackets, BREAK starts a new chunk. The CLIP text encoder reads 77 tokens at a "
        "time (75 words or word pieces; 32 tokens for the small default model): longer prompts are "
        "encoded in chunks of 75 tokens and joined.",
    )
    parser.add_argument("prompt", nargs="?", help="what to draw (or use --from-file)")
    parser.add_argument("--negative-prompt", help="what to steer away from (default: nothing)")
    parser.add_argument("--from-file", type=Path, help="read prompts from this file, one per line")
    parser.add_argument("--model", help="model folder (ours or diffusers), original single-file checkpoint "
                        "(.safetensors/.ckpt) or hub id; default: the shipped model")
    parser.add_argument("--config", type=Path, help="single-file --model: CompVis YAML (e.g. "
                        "configs/sd-v2-inference-v.yaml), Stability's SDXL YAML (sd_xl_base.yaml) or this "
                        "package's config.yaml")
    parser.add_argument("--prediction", choices=("eps", "v"),
                        help="single-file --model: the U-Net predicts noise (eps) or velocity (v: SD 2.x 768-v)")
    parser.add_argument("--vae", type=Path, help="single-file --model: use this VAE file instead of the checkpoint's")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    parser.add_argument("--scale", type=finite_float, help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--sampler", type=sampler_name, metavar="NAME",
                        help=f"sampler: {', '.join(SAMPLER_NAMES)}, or AUTOMATIC1111's name for it "
                        "(e.g. \"DPM++ 2M\", \"Euler a\"); default: the model's")
    parser.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None,
                        help="use Karras et al. (2022) sigmas (default: the model's); the same as --schedule karras")
    parser.add_argument("--schedule", type=schedule_name, metavar="NAME",
                        help=f"sigma spacing (AUTOMATIC1111's Schedule type): {', '.join(SCHEDULE_NAMES)}, or the "
                        "web UI's label (\"SGM Uniform\"; \"Automatic\": the sampler's preference there, e.g. "
                        "Karras for DPM++ 2M); default: the sampler's diffusers spacing, or karras with --karras")
    parser.add_argument("--eta", type=finite_float, help="DDIM eta: 0 deterministic, 1 ancestral (default 0)")
    parser.add_argument("--clip-skip", type=int, help="AUTOMATIC1111's Clip skip: 1 = the text encoder's own "
                        "layer, 2 = one block earlier (default: the model's, usually 1)")
    parser.add_argument("--seed", type=seed_argument,
                        help=f"seed of the first image, 0 to 2**64-1 (default 0); image k uses seed+k. {RANDOM_SEED}: "
                        "a random seed, recorded in the file names and PNG parameters like a given one")
    parser.add_argument("--subseed", type=seed_argument, help="variation seed (AUTOMATIC1111): image k's noise "
                        "is moved towards the noise of subseed+k by --subseed-strength")
    parser.add_argument("--subseed-strength", type=finite_float, help="variation strength in [0, 1] (default 0)")
    parser.add_argument("--seed-resize-from", type=size_argument, metavar="WxH",
                        help="AUTOMATIC1111's Resize seed from: draw each seed's noise at this size and centre it "
                        "in the noise of the new size, to keep a seed's composition at another size")
    parser.add_argument("--n-samples", type=int, default=1, help=f"images per prompt (at most {MAX_SAMPLES})")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images sampled together as one batch (faster on a GPU). 1 (default): each image "
                        "is bitwise the one its seed gives alone; larger batches agree with that to within "
                        "float rounding on the CPU, not bitwise")
    size_default = "the model's" if mode == "txt2img" else "the input image's"
    parser.add_argument("--H", type=int, dest="height", help=f"image height in pixels, multiple of 8 (default: {size_default})")
    parser.add_argument("--W", type=int, dest="width", help=f"image width in pixels, multiple of 8 (default: {size_default})")
    parser.add_argument("--outdir", type=Path, default=Path("outputs") / mode, help="output folder")
    parser.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                        help="also save a grid of all images when there is more than one")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, then cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                        help="auto: float16 on GPU, float32 on CPU; fast: float16 on GPU, bfloat16 + channels-last "
                        "on CPUs with native bfloat16 (AVX512-BF16/AMX), else float32")
    parser.add_argument("--embeddings", type=Path, metavar="DIR",
                        help="a folder of textual-inversion embeddings (AUTOMATIC1111 .pt/.safetensors, diffusers "
                        "learned_embeds): each file's name is its trigger word, in the prompt or the negative prompt")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="apply a LoRA file with strength SCALE (default 1); repeatable, effects add up")
    parser.add_argument("--compile", action="store_true",
                        help="compile the U-Net with torch.compile (the first image waits for the compiler; "
                        "pays off over many images of one size)")
    parser.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
                        help="decode the image in overlapping tiles (bounded memory for large images; "
                        "default: automatically above 1024x1024 pixels)")
    parser.add_argument("--no-signal-leak", dest="signal_leak", action="store_false", default=None,
                        help="start from pure noise even when the model has signal-leak statistics")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or info logs")
    add_mode_arguments = {"txt2img": add_txt2img_arguments, "img2img": add_img2img_arguments,
                          "inpaint": add_inpaint_arguments}[mode]
    add_mode_arguments(parser)
    return parser


def add_txt2img_arguments(parser: argparse.ArgumentParser) -> None:
    """txt2img's own flags: the hires fix, the cascade and classifier-guidance stages, --from-png."""
    parser.add_argument("--hires-scale", type=finite_float, help="hires fix (AUTOMATIC1111): generate, upscale by "
                        "this factor, then redraw at --hires-strength")
    parser.add_argument("--hires-strength", type=finite_float, help="hires fix: denoising strength of "
                        "the second pass, in (0, 1] (default 0.5)")
    parser.add_argument("--hires-upscaler", choices=("latent", "lanczos"),
                        help="hires fix: upscale the latents (bilinear) or the decoded image (Lanczos)")
    parser.add_argument("--hires-steps", type=int, help="hires fix: steps of the second pass (default --steps)")
    add_stage_arguments(parser)
    parser.add_argument("--from-png", type=Path, metavar="FILE",
                        help="take prompt, negative prompt, steps, sampler, schedule, CFG scale, seed, size, clip "
                        "skip, hires fix and refiner from a PNG's AUTOMATIC1111 parameters (flags given here win; "
                        "the refiner is looked for by its recorded name here and beside --model)")


def add_img2img_arguments(parser: argparse.ArgumentParser) -> None:
    """img2img's own flags: the starting image and the strength."""
    parser.add_argument("--init-img", type=Path, required=True, help="the image to start from")
    parser.add_argument("--strength", type=finite_float, default=0.75,
                        help="how much to change, in (0, 1]: runs about steps x strength steps (default 0.75)")


def add_inpaint_arguments(parser: argparse.ArgumentParser) -> None:
    """inpaint's own flags: the image, the mask (or --outpaint), strength, mask blur, only-masked."""
    parser.add_argument("--image", type=Path, required=True, help="the image to repaint")
    parser.add_argument("--mask", type=Path, help="white = repaint, black = keep (required unless --outpaint)")
    parser.add_argument("--strength", type=finite_float, default=1.0,
                        help="1 (default) repaints from pure noise; lower keeps more of the masked region")
    parser.add_argument("--mask-blur", type=finite_float, default=4, help="blur (pixels) of the mask's edge when "
                        "pasting the result over the image (default 4)")
    parser.add_argument("--only-masked", action="store_true",
                        help="work on the masked region at full resolution, then paste it back")
    parser.add_argument("--padding", type=int, default=32, help="--only-masked: pixels around the mask (default 32)")
    parser.add_argument("--outpaint", metavar="LEFT,RIGHT,TOP,BOTTOM",
                        help="extend the canvas by these pixels and paint the new border")


def main(argv: list[str] | None = None, mode: str = "txt2img") -> int:
    parser = build_parser(mode)
    args = parser.parse_args(argv)
    prompts = check_arguments(parser, args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    return run_reporting_errors(parser, lambda: generate(args, prompts), args.device)


def generate(args: argparse.Namespace, prompts: list[str]) -> int:
    from tqdm import tqdm

    from ldm.hardware import pick_device, pick_precision
    from ldm.image_inputs import default_size
    from ldm.images import a1111_parameters, make_grid

    device = pick_device(args.device, what="--device")
    if args.random_seed:
        logging.getLogger("txt2img").info("--seed %d: random seed %d", RANDOM_SEED, args.seed)
    precision = pick_precision(args.dtype, device)
    pipe = load_pipeline(args, device, precision)
    stages = load_stages(args, device, precision.dtype)
    logging.getLogger("txt2img").info("running on %s in %s", device, precision.describe())
    image_inputs, extra = image_arguments(args, pipe.vae.downsample_factor)  # images, or the hires fix
    if "image" in image_inputs and (args.height is None or args.width is None):
        default_width, default_height = default_size(image_inputs["image"], pipe.vae.downsample_factor)
        args.height, args.width = args.height or default_height, args.width or default_width
    options = pipe.sampling_options(steps=args.steps, guidance_scale=args.scale, sampler=args.sampler,
                                    height=args.height, width=args.width, eta=args.eta, karras=args.karras,
                                    schedule=args.schedule, signal_leak=args.signal_leak, clip_skip=args.clip_skip,
                                    seed_resize_from=args.seed_resize_from)
    extra = run_png_fields(args, options, image_inputs, extra, stages)
    upscale_steps = stages.upscale_steps(args)

    images, seed = [], args.seed
    for prompt in prompts:
        for start in range(0, args.n_samples, args.batch_size):
            count = min(args.batch_size, args.n_samples - start)
            with tqdm(total=(options.steps + upscale_steps) * count, desc=f"seed {seed}", file=sys.stderr,
                      disable=args.quiet, leave=False) as bar:
                batch = pipe(prompt, args.negative_prompt, steps=options.steps,
                             guidance_scale=options.guidance_scale, sampler=options.sampler, seed=seed,
                             height=options.height, width=options.width, num_images=count, eta=options.eta,
                             schedule=options.schedule, signal_leak=options.signal_leak is not None,
                             seed_resize_from=options.seed_resize_from,
                             clip_skip=options.clip_skip, subseed=subseed_of(args, seed),
                             subseed_strength=args.subseed_strength,
                             progress=lambda done, total: advance(bar, done, total + upscale_steps * count),
                             batch_invariant=args.batch_size == 1, vae_tiling=args.vae_tiling,
                             **stages.call_options(args), **image_inputs)
                batch = stages.upscale(batch, prompt, args.negative_prompt, seed, args,
                                       progress=lambda done, total: advance(bar, options.steps * count + done,
                                                                            (options.steps + upscale_steps) * count))
            for offset, image in enumerate(batch):
                parameters = a1111_parameters(
                    prompt, args.negative_prompt, steps=options.steps, sampler=options.sampler,
                    guidance_scale=options.guidance_scale, seed=seed + offset, width=options.width,
                    height=options.height, schedule=options.schedule, extra=image_fields(extra, args, seed + offset),
                )
                print(save_png(image, args.outdir, str(seed + offset), parameters), flush=True)
            images.extend(batch)
            seed += count
    if args.grid and len(images) > 1:
        print(save_png(make_grid(images), args.outdir, "grid"), flush=True)
    return 0


def load_pipeline(args: argparse.Namespace, device, precision):
    """The --model (a folder, hub id or single file) on ``device`` in ``precision``, with its --lora files and
    --embeddings loaded, channels-last and compiled when asked."""
    from ldm.pipeline import Txt2ImgPipeline

    dtype = precision.dtype
    if args.model is not None and Path(args.model).expanduser().is_file():
        pipe = Txt2ImgPipeline.from_single_file(Path(args.model).expanduser(), args.config, prediction=args.prediction,
                                                vae=args.vae, device=device, dtype=dtype)
    else:
        pipe = Txt2ImgPipeline.from_pretrained(args.model, device=device, dtype=dtype)
    if args.lora:
        from ldm.formats.lora import load_lora

        for path, scale in args.lora:
            load_lora(pipe, path, scale)
    if args.embeddings is not None:
        loaded = pipe.load_textual_inversion(args.embeddings)
        logging.getLogger("txt2img").info("embeddings: %s", ", ".join(loaded) or "(none in the folder)")
    if precision.channels_last:
        pipe.to(memory_format=precision.memory_format)
    if args.compile:
        pipe.compile()
    return pipe


def run_png_fields(args: argparse.Namespace, options, image_inputs: dict, extra: dict, stages) -> dict:
    """The AUTOMATIC1111 PNG fields every image of the run carries beyond the basic ones: the image mode's
    ``extra`` fields, then model, LoRA, clip skip, seed resize, signal leak and the extra stages'."""
    extra = {**extra, "Model": Path(args.model).name if args.model else "default"}
    if args.lora:
        extra["LoRA"] = ", ".join(f"{path.stem}:{scale:g}" for path, scale in args.lora)
    if options.clip_skip != 1:
        extra["Clip skip"] = options.clip_skip  # AUTOMATIC1111 writes it only when it is not 1
    if options.seed_resize_from is not None:
        extra["Seed resize from"] = f"{options.seed_resize_from[1]}x{options.seed_resize_from[0]}"  # W x H
    starts_from_noise = "image" not in image_inputs or (image_inputs.get("mask_image") is not None
                                                         and args.strength == 1)
    if options.signal_leak is not None and starts_from_noise:
        extra["Signal leak"] = "on"
    return extra | stages.png_fields(args, options.width, options.height)


def save_png(image, outdir: Path, stem_suffix: str, parameters: str | None = None) -> Path:
    """:func:`ldm.images.save_new_png`, with a failed write (disk full, a file in the way) as one line."""
    from ldm.errors import OutputError
    from ldm.images import save_new_png

    try:
        return save_new_png(image, outdir, stem_suffix, parameters)
    except OSError as error:
        raise OutputError(f"cannot write into --outdir {outdir}: {error.strerror or error}") from None


def image_fields(extra: dict, args: argparse.Namespace, seed: int) -> dict:
    """The run's PNG fields plus this image's own: its variation seed (subseed + its offset), as the web UI writes."""
    subseed = subseed_of(args, seed)
    if subseed is None:
        return extra
    return {**extra, "Variation seed": subseed, "Variation seed strength": f"{args.subseed_strength:g}"}


def subseed_of(args: argparse.Namespace, seed: int) -> int | None:
    """The variation seed of the image with ``seed`` (subseed + the image's offset from --seed), or None."""
    return None if args.subseed is None or args.subseed_strength == 0 else args.subseed + seed - args.seed


def advance(bar, done: int, total: int) -> None:
    """Progress bar to ``done`` of ``total`` steps (img2img runs fewer steps than --steps, the hires fix more)."""
    bar.total = total
    bar.update(done - bar.n)


def image_arguments(args: argparse.Namespace, multiple: int) -> tuple[dict, dict]:
    """The pipeline's image keywords for this mode, and the AUTOMATIC1111 PNG fields that record them."""
    if not args.images:
        if getattr(args, "hires_scale", None) is None:
            return {}, {}
        hires = {"hires_scale": args.hires_scale, "hires_strength": args.hires_strength,
                 "hires_upscaler": args.hires_upscaler, "hires_steps": args.hires_steps}
        extra = {"Denoising strength": f"{args.hires_strength:g}", "Hires upscale": f"{args.hires_scale:g}",
                 "Hires steps": args.hires_steps, "Hires upscaler": args.hires_upscaler.capitalize()}
        return hires, {key: value for key, value in extra.items() if value is not None}
    inputs, extra = dict(args.images), {"Denoising strength": f"{args.strength:g}"}
    inputs["strength"] = args.strength
    if "mask_image" not in inputs:
        return inputs, extra
    if args.outpaint:
        from ldm.image_inputs import outpaint_canvas

        canvas, border = outpaint_canvas(inputs["image"], *args.outpaint, multiple=multiple)
        inputs["image"], inputs["mask_image"] = canvas, combined_outpaint_mask(inputs["mask_image"], border,
                                                                                  args.outpaint)
        extra["Outpaint"] = ",".join(str(side) for side in args.outpaint)
    inputs.update(mask_blur=args.mask_blur, only_masked=args.only_masked, only_masked_padding=args.padding)
    extra["Mask blur"] = f"{args.mask_blur:g}"
    if args.only_masked:
        extra.update({"Inpaint area": "Only masked", "Masked area padding": args.padding})
    return inputs, extra


def combined_outpaint_mask(mask, border, sides: tuple[int, int, int, int]):
    """The new border's mask, plus the user's mask (if any) moved onto the extended canvas."""
    if mask is None:
        return border
    from PIL import Image, ImageChops

    moved = Image.new("L", border.size, 0)
    moved.paste(mask.convert("L"), (sides[0], sides[2]))
    return ImageChops.lighter(border, moved)


if __name__ == "__main__":
    sys.exit(main())
