#!/usr/bin/env python
"""Train the default model's noise-aware classifier (object and colour) for classifier guidance.

    python scripts/toy/train_classifier.py --out ldm/toy/default_classifier --run-dir runs/classifier

Seeded, CPU-only and resumable (re-running continues from the last checkpoint in --run-dir). Reports
per-head accuracy at several noise levels on training-pool rows and writes ``classifier.yaml`` +
``classifier.safetensors`` (float32) and ``training.json`` into --out.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, fields
from pathlib import Path

from ldm.pipeline import Txt2ImgPipeline
from ldm.formats.classifier import save_classifier
from ldm.training.noisy_classifier import ClassifierRecipe, accuracy_by_noise, encode_pool, train_classifier

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "ldm" / "toy" / "default_classifier"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="the diffusion model whose latents it reads (default: shipped)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/classifier"))
    for item in fields(ClassifierRecipe):
        parser.add_argument(f"--{item.name.replace('_', '-')}", type=type(item.default), default=item.default)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    recipe = ClassifierRecipe(**{item.name: getattr(args, item.name) for item in fields(ClassifierRecipe)})
    pipe = Txt2ImgPipeline.from_pretrained(args.model)
    pool = encode_pool(pipe, recipe, args.run_dir / "latents.pt")
    model, seconds = train_classifier(pipe, recipe, args.run_dir, pool)
    accuracy = accuracy_by_noise(model, pool, pipe.schedule.alphas_cumprod)
    for step, heads in accuracy.items():
        logging.info("t = %3d: %s", step, ", ".join(f"{name} {value:.1%}" for name, value in heads.items()))
    save_classifier(model, args.out)
    note = {"recipe": asdict(recipe), "train_seconds": round(seconds), "accuracy_by_timestep": accuracy}
    (args.out / "training.json").write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    logging.info("wrote %s (%.0f s of training)", args.out, seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
