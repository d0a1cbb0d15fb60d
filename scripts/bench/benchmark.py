#!/usr/bin/env python
"""Speed of our U-Net and of a full generation against diffusers, same weights, same run.

    python scripts/bench/benchmark.py                     # SD1.5 architecture, batch 2, 256x256, fp32
    python scripts/bench/benchmark.py --size 512 --steps 10 --device cuda --dtype float16

Both sides get identical random weights (ours converted through the key maps), so the ratio
compares implementations, not models. Prints median wall times, the ratio (ours/diffusers,
below 1 means we are faster) and achieved GFLOP/s (FLOPs counted once with torch's counter).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch


from ldm.config import PipelineConfig, SamplingDefaults
from ldm.models.builder import perturb_zero_initialised
from ldm.pipeline import Txt2ImgPipeline
from ldm.sampling.schedule import ScheduleConfig
from ldm.models.text_encoders import TextEncoderConfig
from ldm.models.unet import UNetConfig
from autoencoder.model import AutoencoderConfig

logger = logging.getLogger("benchmark")


def sd15_config(size: int) -> PipelineConfig:
    """Stable Diffusion 1.5's architecture (v1-inference.yaml)."""
    return PipelineConfig(
        unet=UNetConfig(), vae=AutoencoderConfig(), text_encoder=TextEncoderConfig.sd1(),
        schedule=ScheduleConfig(), sampling=SamplingDefaults(height=size, width=size, sampler="ddim"),
    )


def seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_seconds_interleaved(ours, theirs, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median wall times of ``ours`` and ``theirs``, run alternately so that a change in machine load
    hits both sides alike. One untimed warm-up call each (allocator, kernel selection)."""
    ours(), theirs()
    times = [(seconds(ours, device), seconds(theirs, device)) for _ in range(repeats)]
    return statistics.median(t for t, _ in times), statistics.median(t for _, t in times)


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def row(name: str, ours: float, theirs: float, flops: float | None) -> str:
    rate = f"{flops / ours / 1e9:8.1f} | {flops / theirs / 1e9:8.1f}" if flops else "       - |        -"
    return f"| {name:<28} | {ours:8.3f} | {theirs:8.3f} | {ours / theirs:5.2f} | {rate} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=2, help="U-Net batch (2 = one image with CFG)")
    parser.add_argument("--steps", type=int, default=5, help="sampling steps of the full generation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--skip-generation", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import diffusers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = sd15_config(args.size)
    start = time.perf_counter()
    ours = Txt2ImgPipeline.from_config(config)
    # A fresh U-Net's output convolutions are zero: without this both U-Nets would output zeros.
    perturb_zero_initialised([ours.unet, ours.vae])
    ours = ours.to(device, dtype)
    logger.info("built our SD1.5-architecture pipeline in %.1f s", time.perf_counter() - start)
    folder = Path(".benchmark-sd15")
    ours.save_pretrained(folder, format="diffusers")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=dtype)
    theirs.scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config)
    theirs = theirs.to(device)
    theirs.set_progress_bar_config(disable=True)

    latent = args.size // 8
    x = torch.randn(args.batch, 4, latent, latent, device=device, dtype=dtype)
    t = torch.full((args.batch,), 500.0, device=device)
    context = torch.randn(args.batch, 77, 768, device=device, dtype=dtype)
    with torch.no_grad():
        flops = count_flops(lambda: ours.unet(x, t, context))
        out_ours = ours.unet(x, t, context)
        out_theirs = theirs.unet(x, t, encoder_hidden_states=context).sample
        unet_ours, unet_theirs = median_seconds_interleaved(
            lambda: ours.unet(x, t, context), lambda: theirs.unet(x, t, encoder_hidden_states=context),
            args.repeats, device)

    print(f"\nSD1.5 architecture, random weights, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"U-Net outputs agree to max abs diff {(out_ours - out_theirs).abs().max().item():.2e} "
          f"(output magnitude: max abs {out_theirs.abs().max().item():.2e})")
    print("| measurement                  |  ours s  | diff. s  | ratio | ours GFLOP/s | diff. GFLOP/s |")
    print("|---|---|---|---|---|---|")
    print(row(f"U-Net fwd, batch {args.batch}, {args.size}px", unet_ours, unet_theirs, flops))

    if not args.skip_generation:
        prompt = "a red bicycle"

        def generate_ours():
            return ours(prompt, steps=args.steps, guidance_scale=7.5, sampler="ddim", seed=0, output_type="pt")

        def generate_theirs():
            return theirs(prompt, num_inference_steps=args.steps, guidance_scale=7.5, height=args.size,
                          width=args.size, generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images

        gen_flops = count_flops(generate_ours)  # text encoder + steps x U-Net + VAE decoder
        gen_ours, gen_theirs = median_seconds_interleaved(generate_ours, generate_theirs,
                                                          max(1, args.repeats - 2), device)
        image_diff = (generate_ours().cpu() - generate_theirs().cpu()).abs().max().item()
        print(row(f"txt2img {args.size}px, {args.steps} DDIM steps", gen_ours, gen_theirs, gen_flops))
        print(f"generated images agree to max abs diff {image_diff:.2e} (pixel values in [0, 1])")
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
