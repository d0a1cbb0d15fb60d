#!/usr/bin/env python
"""Peak memory of loading a random-weight SDXL base single file (the real layout, fp16, loaded as fp16),
and the time per sampling step at 1024x1024 in bfloat16 on this CPU.

    python scripts/bench/sdxl_memory.py --workdir /tmp/sdxl-bench            # write the file once, then measure
    python scripts/bench/sdxl_memory.py --workdir /tmp/sdxl-bench --steps 0  # loading only

The file (``sdxl-base-random.safetensors``, about 6.9 GB) holds Stability's original keys
(``model.diffusion_model.*``, ``first_stage_model.*``, ``conditioner.embedders.0/1.*``) with random fp16
weights and no config of this package, so the loader reads the architecture from the weights. Loading
runs in a fresh subprocess; memory is its peak resident set size (``ru_maxrss``) minus the peak after
its imports, right after loading (safetensors maps the file: unread weights are not resident yet) and
after reading every weight once (what the first image costs). The step time is the wall time of one guided U-Net call (batch 2) on ``torch.get_num_threads()``
threads, measured over ``--steps`` Euler steps after a warm-up step.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FILE_NAME = "sdxl-base-random.safetensors"
MIB = 1024 * 1024

logger = logging.getLogger("sdxl_memory")


def sdxl_base_config():
    """The SDXL 1.0 base pipeline config (U-Net, SDXL VAE, CLIP ViT-L + OpenCLIP bigG)."""
    from autoencoder.model import AutoencoderConfig
    from ldm.config import PipelineConfig, SamplingDefaults
    from ldm.models.sdxl_conditioning import SDXLConfig, sdxl_base_unet_config
    from ldm.models.text_encoders import TextEncoderConfig

    return PipelineConfig(unet=sdxl_base_unet_config(), vae=AutoencoderConfig(scaling_factor=0.13025),
                          text_encoder=TextEncoderConfig.sdxl_clip_l(), text_encoder_2=TextEncoderConfig.sdxl_bigg(),
                          sampling=SamplingDefaults(height=1024, width=1024), sdxl=SDXLConfig())


def write_random_file(path: Path) -> None:
    """Random fp16 weights of the real SDXL base layout, written without a stored config."""
    import torch
    from safetensors.torch import save_file

    from ldm.formats.single_file_write import original_state_dict
    from ldm.models.builder import build_components

    config = sdxl_base_config()
    with torch.device("meta"):
        modules = build_components(config)
    generator = torch.Generator().manual_seed(0)
    parts = {name: {key: (torch.randn(t.shape, generator=generator, dtype=torch.float16) * 0.02
                          if t.is_floating_point() else torch.zeros(t.shape, dtype=t.dtype))
                    for key, t in module.state_dict().items()}
             for name, module in modules.items()}
    state, _ = original_state_dict(config, parts)
    save_file(state, str(path), metadata={"format": "pt"})


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(path: Path, steps: int) -> dict:
    """In this (fresh) process: load, report memory, then time ``steps`` guided steps at 1024x1024."""
    import torch

    from ldm.pipeline import Txt2ImgPipeline

    baseline = peak_mib()
    start = time.perf_counter()
    pipe = Txt2ImgPipeline.from_single_file(path, dtype=torch.float16)  # as stored: no conversion
    result = {"file_mib": path.stat().st_size / MIB, "baseline_mib": baseline, "load_peak_mib": peak_mib(),
              "load_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
              "unet_parameters": sum(p.numel() for p in pipe.unet.parameters())}
    with torch.no_grad():  # read every weight once, as the first image does (mapped pages become resident)
        for network in (pipe.unet, pipe.vae, pipe.text_encoder):
            for tensor in network.state_dict().values():
                tensor.float().sum()
    result["first_use_peak_mib"] = peak_mib()
    if steps:
        pipe = pipe.to("cpu", torch.bfloat16)
        times = []
        last = [time.perf_counter()]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        pipe("a red bicycle", "blurry", steps=steps + 1, sampler="euler", height=1024, width=1024, seed=0,
             guidance_scale=5.0, progress=progress, output_type="pt")
        result |= {"step_s": times[1:], "run_peak_mib": peak_mib()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".benchmark-sdxl")
    parser.add_argument("--steps", type=int, default=2, help="timed steps at 1024x1024 (0: loading only)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = args.workdir / FILE_NAME
    if args.child:
        print(json.dumps(measure(path, args.steps)))
        return 0
    if not path.is_file():
        args.workdir.mkdir(parents=True, exist_ok=True)
        logger.info("writing %s", path)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                        f"from scripts.bench.sdxl_memory import write_random_file; from pathlib import Path; "
                        f"write_random_file(Path({str(path)!r}))"], check=True)
    output = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--steps", str(args.steps),
                             "--child"], check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    logger.info("%s", json.dumps(result, indent=1))
    added = result["load_peak_mib"] - result["baseline_mib"]
    used = result["first_use_peak_mib"] - result["baseline_mib"]
    logger.info("file %.0f MiB; loading added %.0f MiB peak (%.2fx the file) in %.1f s; after reading every "
                "weight once %.0f MiB (%.2fx)", result["file_mib"], added, added / result["file_mib"],
                result["load_s"], used, used / result["file_mib"])
    if result.get("step_s"):
        logger.info("bf16 1024x1024 guided step: %s s on %d threads; run peak %.0f MiB",
                    ", ".join(f"{t:.1f}" for t in result["step_s"]), result["threads"], result["run_peak_mib"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
