#!/usr/bin/env python
"""Our txt2img on a CUDA GPU: it/s and peak memory, fp16 and bf16, with and without torch.compile.

    python scripts/bench/gpu_txt2img.py                 # SD1.5 architecture, random weights, 512x512, 20 steps
    python scripts/bench/gpu_txt2img.py --steps 50 --batch 4

One prepared run for a lent GPU machine: for each dtype (float16, bfloat16) and each attention
backend available (PyTorch SDPA always, xformers if it imports), eager and then compiled, it
generates one warm-up image and then times ``--repeats`` images, printing sampling iterations per
second (U-Net steps with classifier-free guidance, the unit the web UIs show), seconds per image
and the peak CUDA memory. It also checks that every image is finite and that fp16 and bf16 agree
with fp32 on the first image (mean uint8 difference).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import torch

from autoencoder.model import AutoencoderConfig
from ldm.config import PipelineConfig, SamplingDefaults
from ldm.models.attention import available_backends, use_attention_backend
from ldm.models.builder import perturb_zero_initialised
from ldm.models.text_encoders import TextEncoderConfig
from ldm.models.unet import UNetConfig
from ldm.pipeline import Txt2ImgPipeline
from ldm.sampling.schedule import ScheduleConfig

logger = logging.getLogger("gpu_txt2img")


def sd15_pipeline() -> Txt2ImgPipeline:
    torch.manual_seed(0)
    config = PipelineConfig(unet=UNetConfig(), vae=AutoencoderConfig(), text_encoder=TextEncoderConfig.sd1(),
                            schedule=ScheduleConfig(), sampling=SamplingDefaults(sampler="euler_a"))
    pipe = Txt2ImgPipeline.from_config(config)
    perturb_zero_initialised([pipe.unet, pipe.vae])
    return pipe


def generate(pipe: Txt2ImgPipeline, args) -> torch.Tensor:
    return pipe("a red bicycle", steps=args.steps, height=args.size, width=args.size, num_images=args.batch,
                batch_invariant=False, seed=0, output_type="pt")


def run_case(pipe: Txt2ImgPipeline, args, label: str) -> tuple[torch.Tensor, str]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    first = generate(pipe, args)  # warm-up (and, compiled, the compilation)
    torch.cuda.synchronize()
    warm_up = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        generate(pipe, args)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    peak = torch.cuda.max_memory_allocated() / 2**30
    finite = bool(torch.isfinite(first).all())
    row = (f"| {label} | {args.steps / median:.2f} | {median:.2f} | {warm_up:.1f} | {peak:.2f} | "
           f"{'yes' if finite else 'NO'} |")
    return first, row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="images per call (batched)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        print("gpu_txt2img.py: error: no CUDA device", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, SD1.5 architecture, random weights, "
          f"{args.size}x{args.size}, {args.steps} Euler a steps, CFG, batch {args.batch}")
    print("| dtype / attention / compile | it/s | s per call | first call s | peak GiB | finite |")
    print("|---|---|---|---|---|---|")
    reference = None
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for backend in available_backends():
            for compiled in (False, True) if not args.skip_compile else (False,):
                if dtype == torch.float32 and (compiled or backend != "sdpa"):
                    continue  # fp32 eager SDPA only: the reference image
                pipe = sd15_pipeline().to("cuda", dtype)
                if compiled:
                    pipe.compile()
                label = f"{str(dtype).removeprefix('torch.')} / {backend} / {'compiled' if compiled else 'eager'}"
                with use_attention_backend(backend):
                    image, row = run_case(pipe, args, label)
                if reference is None:
                    reference = image
                difference = ((image - reference).abs() * 255).mean().item()
                print(row + f" mean uint8 diff vs fp32: {difference:.2f}", flush=True)
                del pipe
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
