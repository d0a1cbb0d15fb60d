"""Fit a model's signal-leak statistics on its training images and write them into its config.yaml.

    python scripts/fit_signal_leak.py --model ldm/toy/default_model                 # procedural training data
    python scripts/fit_signal_leak.py --model runs/my-finetune/model --data path/to/image-folder

The images are encoded with the model's own autoencoder (posterior mean x scaling factor, as the
trainer does); the mean and covariance of the latents' per-channel spatial means go to
``sampling.signal_leak`` (see ``ldm/sampling/signal_leak.py``), which ``Txt2ImgPipeline`` then uses by
default. ``--remove`` deletes them again. The config is replaced atomically.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch


from ldm.cli import OneLineErrorParser

logger = logging.getLogger("fit_signal_leak")


def procedural_images(n: int, seed: int, size: int) -> list:
    from ldm.toy.procedural import ProceduralDataset

    return [sample.image for sample in ProceduralDataset(seed=seed, split="train", image_size=size).take(n)]


def folder_images(folder: str, n: int, size: int) -> list:
    """Up to ``n`` images of an image/caption folder, resized and centre-cropped to ``size``."""
    from ldm.training.data import ImageCaptionDataset, load_image_caption_dataset
    from ldm.toy.evaluation import tensor_to_pil

    dataset = ImageCaptionDataset(load_image_caption_dataset(folder), resolution=size)
    count = min(n, len(dataset))
    if count < n:
        logger.warning("%s has %d usable images, fewer than --n %d; fitting on all of them", folder, count, n)
    return tensor_to_pil(torch.stack([dataset.load(i)["pixel_values"] for i in range(count)]))


@torch.no_grad()
def encode(vae, images: list, batch_size: int = 256) -> torch.Tensor:
    """Latents ``[N, C, h, w]`` (posterior mean x scaling factor) of PIL images."""
    from ldm.toy.procedural import images_to_tensor

    dtype = next(vae.parameters()).dtype
    return torch.cat([vae.encode_latents(images_to_tensor(images[i:i + batch_size]).to(dtype)).float()
                      for i in range(0, len(images), batch_size)])


def write_config_atomically(config, folder: Path) -> None:
    from ldm.config import save_config

    temporary = folder / "config.yaml.tmp"
    save_config(config, temporary)
    os.replace(temporary, folder / "config.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="model folder (our format) to update")
    parser.add_argument("--data", default="procedural",
                        help="'procedural' (the default model's training split) or an image/caption folder")
    parser.add_argument("--n", type=int, default=10000, help="images to encode (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="procedural data seed (default 0, the recipe's)")
    parser.add_argument("--remove", action="store_true", help="delete the statistics instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from dataclasses import replace

    from ldm.errors import LdmError
    from ldm.pipeline import Txt2ImgPipeline
    from ldm.sampling.signal_leak import SignalLeak

    try:
        if args.n < 2:
            raise ValueError(f"--n must be at least 2, got {args.n}")
        if not (args.model / "config.yaml").is_file():
            raise FileNotFoundError(f"{args.model} is not a model folder (no config.yaml)")
        pipe = Txt2ImgPipeline.from_pretrained(args.model)
        leak = None
        if not args.remove:
            size = pipe.config.sampling.height
            images = (procedural_images(args.n, args.seed, size) if args.data == "procedural"
                      else folder_images(args.data, args.n, size))
            leak = SignalLeak.fit(encode(pipe.vae, images))
            logger.info("signal leak from %d latents: mean %s, std %s", leak.count,
                        [round(v, 4) for v in leak.mean],
                        [round(leak.covariance[i][i] ** 0.5, 4) for i in range(len(leak.mean))])
        sampling = replace(pipe.config.sampling, signal_leak=None if leak is None else leak.to_dict())
        write_config_atomically(replace(pipe.config, sampling=sampling), args.model)
        logger.info("%s %s/config.yaml", "removed the statistics from" if leak is None else "wrote", args.model)
    except (LdmError, FileNotFoundError, ValueError) as error:
        print(f"fit_signal_leak.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
