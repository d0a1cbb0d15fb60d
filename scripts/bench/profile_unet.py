#!/usr/bin/env python
"""Where the fast CPU path's U-Net time goes: an operator profile and torch.compile's graph count.

    python scripts/bench/profile_unet.py                 # SD1.5 architecture, random weights, 256 px, 1 thread
    python scripts/bench/profile_unet.py --size 512 --threads 2

One U-Net forward (batch 2, as under classifier-free guidance) in bfloat16 and channels-last (our
``--dtype fast``) is profiled with ``torch.profiler``; the table lists the operators by their own CPU
time. Then ``torch._dynamo.explain`` traces the same call and reports how many graphs ``--compile`` would
hand to inductor (one graph: nothing in the U-Net splits it) and why it splits, if it does.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from benchmark import sd15_config
from ldm.pipeline import Txt2ImgPipeline


def unet_inputs(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents ``[2, 4, size/8, size/8]`` (channels-last), timesteps ``[2]`` and a context ``[2, 77, 768]``, bf16."""
    x = torch.randn(2, 4, size // 8, size // 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    return x, torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768, dtype=torch.bfloat16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--rows", type=int, default=12, help="operators listed (default 12)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    unet = Txt2ImgPipeline.from_config(sd15_config()).unet
    unet = unet.to(torch.bfloat16).to(memory_format=torch.channels_last).eval()
    inputs = unet_inputs(args.size)
    with torch.no_grad():
        unet(*inputs)  # warm-up
        started = time.perf_counter()
        unet(*inputs)
        print(f"U-Net forward, batch 2, {args.size} px, bf16 + channels-last, {args.threads} thread(s): "
              f"{time.perf_counter() - started:.2f} s")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            unet(*inputs)
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        explained = torch._dynamo.explain(unet)(*inputs)
    print(f"torch.compile would see {explained.graph_count} graph(s), {explained.graph_break_count} break(s)")
    for reason in explained.break_reasons[:5]:
        print(f"  break: {str(reason.reason).splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
