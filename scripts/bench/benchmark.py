#!/usr/bin/env python
"""Speed and memory of our pipeline beside diffusers and OpenVINO: same random weights, one run.

    python scripts/bench/benchmark.py                           # U-Net, 256 and 512 px images, decode memory
    python scripts/bench/benchmark.py --sizes 256 --skip-memory  # a quicker look
    python scripts/bench/benchmark.py --compile                 # adds ours fast under torch.compile

Contenders (one that cannot run here is skipped with the reason):

- ``diffusers fp32``: diffusers' StableDiffusionPipeline in float32, the reference;
- ``diffusers bf16``: the same in bfloat16;
- ``OpenVINO``: optimum-intel's OVStableDiffusionPipeline, exported from the same diffusers
  folder (it picks bfloat16 itself on CPUs that have it). optimum-intel pins older transformers
  and huggingface_hub, so it lives in a virtual environment of its own (the README says how);
- ``ours fp32`` and ``ours fast``: :class:`~ldm.pipeline.Txt2ImgPipeline` with ``--dtype float32``
  and ``--dtype fast`` (:mod:`ldm.hardware`: bfloat16 + channels-last on CPUs with native
  bfloat16); ``--contiguous`` drops channels-last from it, ``--compile`` adds a compiled copy of it.

Every contender gets the SD1.5 architecture with the same random weights (output convolutions
perturbed, so nothing is zero), the same starting latents, DDIM and guidance 7.5. Within each
repeat the contenders run one after another, and the medians of the repeats are compared, so a
change in machine load hits all of them alike. Ratios are against diffusers fp32 and OpenVINO;
image differences are against diffusers fp32, in uint8 levels.

Decoding memory is measured in a fresh process per case: the peak resident set size during the
decode minus the resident size just before it.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from autoencoder.model import AutoencoderConfig, AutoencoderKL
from ldm.config import PipelineConfig, SamplingDefaults
from ldm.hardware import cpu_has_native_bf16, pick_precision
from ldm.models.builder import perturb_zero_initialised
from ldm.models.text_encoders import TextEncoderConfig
from ldm.models.unet import UNetConfig
from ldm.pipeline import AUTO_TILING_PIXELS, Txt2ImgPipeline
from ldm.sampling.schedule import ScheduleConfig

logger = logging.getLogger("benchmark")

PROMPT = "a red bicycle"
GUIDANCE = 7.5
BATCH = 2  # one image with classifier-free guidance: the U-Net sees [uncond, cond]


def sd15_config() -> PipelineConfig:
    """Stable Diffusion 1.5's architecture (v1-inference.yaml), DDIM sampling."""
    return PipelineConfig(unet=UNetConfig(), vae=AutoencoderConfig(), text_encoder=TextEncoderConfig.sd1(),
                          schedule=ScheduleConfig(), sampling=SamplingDefaults(sampler="ddim"))


@dataclass
class Contender:
    """One implementation: a U-Net forward and a whole generation, both timed."""

    name: str
    unet_forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]  # (x, t, context) -> output
    generate: Callable[[int, int, torch.Tensor], np.ndarray]  # (size, steps, latents) -> uint8 [H, W, 3]
    times: dict[str, list[float]] = field(default_factory=dict)
    images: dict[int, np.ndarray] = field(default_factory=dict)


def to_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Images in [0, 1] (``[1, H, W, 3]`` or ``[1, 3, H, W]``) -> uint8 ``[H, W, 3]``, as the PNG holds them."""
    if isinstance(images, torch.Tensor):
        images = images.float().permute(0, 2, 3, 1).cpu().numpy()
    return (np.clip(images[0], 0, 1) * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------- contenders


def ours(pipe: Txt2ImgPipeline, name: str) -> Contender:
    def unet_forward(x, t, context):
        return pipe.unet_prediction(x, t, context)

    def generate(size, steps, _latents):
        # seed 0 starts from the latents the others are given (see Txt2ImgPipeline.diffusers_latents).
        images = pipe(PROMPT, steps=steps, guidance_scale=GUIDANCE, sampler="ddim", seed=0, height=size,
                      width=size, output_type="pt")
        return to_uint8(images)

    return Contender(name, unet_forward, generate)


def diffusers_contender(folder: Path, dtype: torch.dtype, name: str) -> Contender:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=dtype,
                                                             safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def unet_forward(x, t, context):
        return pipe.unet(x.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample

    def generate(size, steps, latents):
        images = pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
                      latents=latents.to(dtype), output_type="np").images
        return to_uint8(images)

    return Contender(name, unet_forward, generate)


def openvino_contender(folder: Path) -> Contender:
    """optimum-intel's pipeline, exported once and compiled for one image size at a time (static shapes are
    its fast mode; the measurements go size by size, so each size compiles once)."""
    import diffusers
    from optimum.intel import OVStableDiffusionPipeline

    started = time.perf_counter()
    exported = OVStableDiffusionPipeline.from_pretrained(folder, export=True, compile=False, local_files_only=True)
    logger.info("OpenVINO export: %.1f s", time.perf_counter() - started)
    exported.scheduler = diffusers.DDIMScheduler.from_config(exported.scheduler.config)
    exported.set_progress_bar_config(disable=True)
    compiled_for = {"size": None}

    def at_size(size):
        if compiled_for["size"] != size:
            exported.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
            exported.compile()
            compiled_for["size"] = size
        return exported

    def unet_forward(x, t, context):
        pipe = at_size(x.shape[-1] * 8)
        # The exported U-Net takes one timestep for the batch (shape [1]).
        return pipe.unet(sample=x.numpy(), timestep=t[:1].numpy(), encoder_hidden_states=context.numpy())

    def generate(size, steps, latents):
        images = at_size(size)(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size,
                               width=size, latents=latents, output_type="np").images
        return to_uint8(np.asarray(images))

    return Contender("OpenVINO", unet_forward, generate)


def build_contenders(args, folder: Path, reference: Txt2ImgPipeline) -> list[Contender]:
    contenders = [diffusers_contender(folder, torch.float32, "diffusers fp32")]
    try:
        contenders.append(diffusers_contender(folder, torch.bfloat16, "diffusers bf16"))
    except Exception as error:  # a peer that cannot run here is reported, not fatal
        logger.warning("diffusers bf16 skipped: %s", str(error).splitlines()[0])
    try:
        contenders.append(openvino_contender(folder))
    except ImportError:
        logger.warning("OpenVINO skipped: optimum-intel is not installed (see the README's benchmark section)")
    contenders.append(ours(reference, "ours fp32"))
    precision = pick_precision("fast", torch.device("cpu"))
    if args.contiguous:
        precision = replace(precision, channels_last=False)
    fast = Txt2ImgPipeline.from_pretrained(folder).to(dtype=precision.dtype, memory_format=precision.memory_format)
    contenders.append(ours(fast, f"ours fast ({precision.describe()})"))
    if args.compile:  # one more pipeline (memory), so that eager and compiled are timed in the same rounds
        compiled = Txt2ImgPipeline.from_pretrained(folder).to(dtype=precision.dtype,
                                                             memory_format=precision.memory_format)
        contenders.append(ours(compiled.compile(), f"ours fast + compile ({precision.describe()})"))
    return contenders


# ---------------------------------------------------------------------------------------- timing


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def measure(contenders: list[Contender], key: str, call, repeats: int) -> None:
    """One untimed warm-up per contender, then ``repeats`` rounds through all of them in turn."""
    for contender in contenders:
        started = time.perf_counter()
        call(contender)
        contender.times.setdefault("warm-up " + key, []).append(time.perf_counter() - started)
    for _ in range(repeats):
        for contender in contenders:
            contender.times.setdefault(key, []).append(timed(call, contender))
    logger.info("%s: %s", key, ", ".join(f"{c.name} {statistics.median(c.times[key]):.2f} s" for c in contenders))


def unet_inputs(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 4, size // 8, size // 8, generator=generator)
    context = torch.randn(BATCH, 77, 768, generator=generator)
    return x, torch.full((BATCH,), 500.0), context


def run_speed(args, contenders: list[Contender], reference: Txt2ImgPipeline) -> list[tuple[str, int | None]]:
    """Time every measurement; return the table's rows as (measurement, image size whose images to compare)."""
    rows = []
    for size in args.sizes:
        x, t, context = unet_inputs(size)
        key = f"U-Net forward, batch {BATCH}, {size}px"
        with torch.no_grad():
            measure(contenders, key, lambda c: c.unet_forward(x, t, context), args.repeats)
        rows.append((key, None))
    for size in args.sizes if args.image_sizes is None else args.image_sizes:
        latents = reference.diffusers_latents(seed=0, sampler="ddim", steps=args.steps, height=size, width=size)

        def generate(contender, size=size, latents=latents):
            contender.images[size] = contender.generate(size, args.steps, latents)

        key = f"txt2img {size}px, {args.steps} steps"
        measure(contenders, key, generate, args.repeats)
        rows.append((key, size))
    return rows


def ratio(seconds: float, reference: Contender | None, key: str) -> str:
    if reference is None or key not in reference.times:
        return "-"
    return f"{seconds / statistics.median(reference.times[key]):.2f}"


def image_difference(contender: Contender, reference: Contender, size: int) -> str:
    if size not in contender.images or size not in reference.images:
        return "-"
    levels = np.abs(contender.images[size].astype(np.int16) - reference.images[size].astype(np.int16))
    return f"{levels.mean():.2f} / {levels.max()}"


def print_speed_table(rows: list[tuple[str, int | None]], contenders: list[Contender]) -> None:
    reference = contenders[0]
    openvino = next((c for c in contenders if c.name == "OpenVINO"), None)
    print("\n| measurement | contender | median s | vs diffusers fp32 | vs OpenVINO | image diff vs diffusers fp32 "
          "(uint8 mean / max) |")
    print("|---|---|---|---|---|---|")
    for key, size in rows:
        for contender in contenders:
            seconds = statistics.median(contender.times[key])
            diff = image_difference(contender, reference, size) if size else ""
            print(f"| {key} | {contender.name} | {seconds:.2f} | {ratio(seconds, reference, key)} | "
                  f"{ratio(seconds, openvino, key)} | {diff} |")
    print("\nFirst calls (warm-up; with --compile they include compiling): "
          + "; ".join(f"{c.name}: " + ", ".join(f"{k.removeprefix('warm-up ')} {statistics.median(v):.1f} s"
                                                 for k, v in c.times.items() if k.startswith("warm-up"))
                      for c in contenders))


# ---------------------------------------------------------------------------------------- decode memory

DECODE_CASES = (("diffusers", 1024), ("ours", 1024), ("diffusers", 2048), ("ours untiled", 2048), ("ours", 2048))


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_resident_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def decode_memory_child(kind: str, size: int) -> dict:
    """Runs in a fresh process: random-weight SD VAE, decode ``size`` x ``size``, report memory and time."""
    torch.manual_seed(0)
    latents = torch.randn(1, 4, size // 8, size // 8)
    if kind == "diffusers":
        import diffusers

        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4).eval()
        decode = lambda: vae.decode(latents).sample  # noqa: E731
    else:
        vae = AutoencoderKL(AutoencoderConfig()).eval()
        # "ours": the pipeline's rule, tiles above AUTO_TILING_PIXELS; "ours untiled": never.
        tiled = kind == "ours" and size * size > AUTO_TILING_PIXELS
        decode = lambda: vae.decode(latents, tiled=tiled)  # noqa: E731
    before, peak_before = resident_mib(), peak_resident_mib()
    started = time.perf_counter()
    with torch.no_grad():
        decode()
    seconds = time.perf_counter() - started
    return {"kind": kind, "size": size, "extra_mib": peak_resident_mib() - before, "seconds": seconds,
            "peak_before_mib": peak_before, "before_mib": before}


def run_memory(cases=DECODE_CASES) -> list[dict]:
    results = []
    for kind, size in cases:
        command = [sys.executable, __file__, "--decode-memory-child", kind, str(size)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"kind": kind, "size": size, "error": tail})
        else:
            results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        logger.info("decode %s %dpx: %s", kind, size, results[-1])
    return results


def print_memory_table(results: list[dict]) -> None:
    print("\n| decode (fp32, one image) | extra peak memory GiB | seconds |")
    print("|---|---|---|")
    for result in results:
        label = f"{result['size']}x{result['size']}, {result['kind']}"
        if result["kind"] == "ours" and result["size"] * result["size"] > AUTO_TILING_PIXELS:
            label += " (tiled automatically)"
        if "error" in result:
            print(f"| {label} | failed: {result['error']} | - |")
        else:
            print(f"| {label} | {result['extra_mib'] / 1024:.2f} | {result['seconds']:.1f} |")


# ---------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides of the U-Net forwards")
    parser.add_argument("--image-sizes", type=int, nargs="*", help="image sides of the whole generations "
                        "(default: --sizes; none: U-Net only)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of a whole image")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--compile", action="store_true",
                        help="add ours fast under torch.compile (its first call per shape compiles: see 'First calls')")
    parser.add_argument("--contiguous", action="store_true",
                        help="ours fast without channels-last (to see what channels-last adds)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--decode-cases", nargs="+", metavar="KIND:SIZE",
                        default=[f"{kind}:{size}" for kind, size in DECODE_CASES],
                        help="decode-memory cases, KIND one of diffusers, ours, 'ours untiled' (default: all five)")
    parser.add_argument("--decode-memory-child", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.decode_memory_child:
        kind, size = args.decode_memory_child
        print(json.dumps(decode_memory_child(kind, int(size))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import diffusers

    print(f"SD1.5 architecture, random weights, CPU, {torch.get_num_threads()} threads, native bf16: "
          f"{cpu_has_native_bf16()}, torch {torch.__version__}, diffusers {diffusers.__version__}")
    if not args.skip_speed:
        speed_section(args)  # returns before the memory section, so its pipelines are freed by then
    if not args.skip_memory:
        cases = [(case.rsplit(":", 1)[0], int(case.rsplit(":", 1)[1])) for case in args.decode_cases]
        print_memory_table(run_memory(cases))
    return 0


def speed_section(args) -> None:
    """Build the contenders on one random-weight SD1.5 folder, time them, print the table."""
    torch.manual_seed(0)
    reference = Txt2ImgPipeline.from_config(sd15_config())
    perturb_zero_initialised([reference.unet, reference.vae])  # else the U-Net's output is all zeros
    folder = Path(tempfile.mkdtemp(prefix="benchmark-sd15-"))
    try:
        reference.save_pretrained(folder, format="diffusers")
        contenders = build_contenders(args, folder, reference)
        check_agreement(contenders)
        rows = run_speed(args, contenders, reference)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_speed_table(rows, contenders)


def check_agreement(contenders: list[Contender]) -> None:
    """Our fp32 U-Net against diffusers' on the same input: implementations, not noise, are timed."""
    x, t, context = unet_inputs(256)
    with torch.no_grad():
        theirs = contenders[0].unet_forward(x, t, context)
        mine = next(c for c in contenders if c.name == "ours fp32").unet_forward(x, t, context)
    if theirs.abs().max() == 0:
        raise SystemExit("the reference U-Net outputs zeros: the agreement check would prove nothing")
    difference = (mine - theirs).abs().max().item()
    print(f"U-Net fp32 agreement: max abs diff {difference:.2e} (output max abs {theirs.abs().max().item():.2e})")
    if difference > 1e-3 * theirs.abs().max().item():
        raise SystemExit("our U-Net disagrees with diffusers': the timings would compare different networks")


if __name__ == "__main__":
    sys.exit(main())
