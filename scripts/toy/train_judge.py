#!/usr/bin/env python
"""Train the judge (object / colour / background classifier) on procedural images.

    python scripts/toy/train_judge.py --out ldm/toy/judge_model/judge.safetensors

Seeded and CPU-only; a few minutes on 2 cores. Images are drawn on the fly from
``ProceduralDataset(seed, split="all")`` and lightly degraded (colour jitter, down/up
resampling, Gaussian blur, noise) so the judge also reads imperfect generated images.
Accuracy is reported on fresh images from other seeds, including the held-out pairs.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


from ldm.toy.judge import DEFAULT_JUDGE_PATH, HEADS, Judge, JudgeConfig
from ldm.toy.procedural import BACKGROUNDS, COLOURS, OBJECTS, ProceduralDataset, images_to_tensor

logger = logging.getLogger("train_judge")

TRAIN_SEED_OFFSET = 0
EVAL_SEED_OFFSET = 1_000  # evaluation streams never share a seed with the training stream


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_JUDGE_PATH, help="output .safetensors path")
    parser.add_argument("--steps", type=int, default=800, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is faster than 2 when other jobs share the 2 cores)")
    parser.add_argument("--eval-n", type=int, default=2000, help="fresh images per evaluation set")
    parser.add_argument("--max-minutes", type=float, default=5.5, help="stop training after this long")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "threads", "eval_n"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    return args


def labelled_batch(dataset: ProceduralDataset, start: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Samples start..start+n-1 -> images [n, 3, 64, 64] in [-1, 1] and label indices per head."""
    samples = dataset.take(n, start)
    labels = {
        "object": torch.tensor([OBJECTS.index(s.object) for s in samples]),
        "colour": torch.tensor([COLOURS.index(s.colour) for s in samples]),
        "background": torch.tensor([BACKGROUNDS.index(s.background) for s in samples]),
    }
    return images_to_tensor([s.image for s in samples]), labels


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 7) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image. x: [B, C, H, W]; sigma: [B] (> 0)."""
    b, c, h, w = x.shape
    offsets = torch.arange(kernel_size, dtype=x.dtype) - kernel_size // 2
    kernel = torch.exp(-offsets.square() / (2 * sigma[:, None].square()))
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, K]
    y = F.pad(x.reshape(1, b * c, h, w), [kernel_size // 2] * 4, mode="replicate")
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light random degradations that keep every label true. x: [B, 3, H, W] in [-1, 1].

    Brightness/contrast/colour cast within a few percent, 2x down/up resampling, Gaussian
    blur (sigma 0.3-1.5 px), smooth low-frequency colour blotches and pixel noise.
    """
    b = x.shape[0]

    def uniform(low, high, *shape):
        return torch.rand(*shape, generator=generator) * (high - low) + low

    def chosen(p):  # [B, 1, 1, 1] mask of images that get an augmentation
        return (torch.rand(b, generator=generator) < p).float()[:, None, None, None]

    y = (x + 1) / 2
    y = y * uniform(0.93, 1.07, b, 1, 1, 1) + uniform(-0.03, 0.03, b, 3, 1, 1)  # brightness, colour cast
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * uniform(0.9, 1.1, b, 1, 1, 1) + mean  # contrast
    h, w = y.shape[-2:]
    resampled = F.interpolate(
        F.interpolate(y, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False),
        size=(h, w), mode="bilinear", align_corners=False)
    mask = chosen(0.25)
    y = mask * resampled + (1 - mask) * y
    mask = chosen(0.5)
    y = mask * gaussian_blur(y, uniform(0.3, 1.5, b)) + (1 - mask) * y
    blotches = F.interpolate(torch.randn(b, 3, 4, 4, generator=generator), size=(h, w), mode="bicubic",
                             align_corners=False)  # smooth uneven colour, as in generated backgrounds
    y = y + chosen(0.3) * uniform(0.0, 0.05, b, 1, 1, 1) * blotches
    y = y + chosen(0.5) * uniform(0.0, 0.06, b, 1, 1, 1) * torch.randn(y.shape, generator=generator)
    return (y.clamp(0, 1) * 2 - 1)


@torch.no_grad()
def evaluate(judge: Judge, dataset: ProceduralDataset, n: int, generator: torch.Generator | None = None,
             batch_size: int = 250) -> dict[str, float]:
    """Accuracy per head (and 'both' = object and colour right) on samples 0..n-1 of ``dataset``."""
    judge.eval()
    correct = {head: 0 for head in (*HEADS, "both")}
    for start in range(0, n, batch_size):
        x, labels = labelled_batch(dataset, start, min(batch_size, n - start))
        if generator is not None:
            x = degrade(x, generator)
        logits = judge(x)
        right = {head: logits[head].argmax(-1) == labels[head] for head in HEADS}
        right["both"] = right["object"] & right["colour"]
        for head, r in right.items():
            correct[head] += int(r.sum())
    return {head: c / n for head, c in correct.items()}


def learning_rate(step: int, total: int, peak: float, warmup: int = 30) -> float:
    """Linear warm-up, then cosine decay to 2% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(args: argparse.Namespace) -> tuple[Judge, dict]:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    judge = Judge(JudgeConfig())
    optimizer = torch.optim.AdamW(judge.parameters(), lr=args.lr, weight_decay=1e-4)
    stream = ProceduralDataset(args.seed + TRAIN_SEED_OFFSET, split="all")
    judge.train()
    start_time, running = time.perf_counter(), None
    step = 0
    for step in range(args.steps):
        x, labels = labelled_batch(stream, step * args.batch_size, args.batch_size)
        x = degrade(x, generator)
        logits = judge(x)
        loss = sum(F.cross_entropy(logits[h], labels[h], label_smoothing=0.05) for h in HEADS)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        running = loss_value if running is None else 0.95 * running + 0.05 * loss_value
        elapsed = time.perf_counter() - start_time
        if step % 50 == 0 or step == args.steps - 1:
            logger.info("step %4d  loss %.4f  %.0f s", step, running, elapsed)
        if elapsed > args.max_minutes * 60:
            logger.warning("time limit reached after %d steps", step + 1)
            break
    stats = {"steps": step + 1, "train_seconds": round(time.perf_counter() - start_time, 1),
             "batch_size": args.batch_size, "seed": args.seed}
    return judge, stats


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    judge, stats = train(args)
    eval_seed = args.seed + EVAL_SEED_OFFSET
    results = {
        "all": evaluate(judge, ProceduralDataset(eval_seed, "all"), args.eval_n),
        "heldout": evaluate(judge, ProceduralDataset(eval_seed + 1, "heldout"), args.eval_n // 2),
        "all_degraded": evaluate(judge, ProceduralDataset(eval_seed + 2, "all"), args.eval_n,
                                 generator=torch.Generator().manual_seed(eval_seed)),
    }
    for name, accuracy in results.items():
        logger.info("%-13s %s", name, "  ".join(f"{h} {a:.4f}" for h, a in accuracy.items()))
    judge.save(args.out, extra_metadata={"train": stats, "eval_accuracy": results})
    logger.info("saved %s (%.2f MB) after %.1f s of training", args.out,
                args.out.stat().st_size / 2**20, stats["train_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
