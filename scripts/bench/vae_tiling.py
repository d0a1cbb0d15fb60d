#!/usr/bin/env python
"""How close tiled VAE decoding and encoding come to the untiled result, on the shipped model's VAE.

    python scripts/bench/vae_tiling.py                      # 256x256 renders, 32-latent tiles, 8 overlap
    python scripts/bench/vae_tiling.py --size 512 --tile 64 --overlap 16

Encodes real procedural renders, then prints the difference between tiled and whole decodes in
uint8 levels (mean and max) and the relative difference of the tiled encoder's posterior mean.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ldm.pipeline import Txt2ImgPipeline
from ldm.toy.procedural import ProceduralDataset, images_to_tensor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--tile", type=int, default=32, help="tile side in latent pixels")
    parser.add_argument("--overlap", type=int, default=8, help="overlap in latent pixels")
    parser.add_argument("--n", type=int, default=2, help="images")
    args = parser.parse_args(argv)

    vae = Txt2ImgPipeline.from_pretrained().vae
    images = images_to_tensor([s.image for s in ProceduralDataset(image_size=args.size).take(args.n)])
    tiles = {"tile": args.tile, "overlap": args.overlap}
    with torch.no_grad():
        mean = vae.encode(images).mode()
        tiled_mean = vae.encode(images, tiled=True, **tiles).mode()
        whole = vae.decode(mean)
        tiled = vae.decode(mean, tiled=True, **tiles)
    levels = ((whole.clamp(-1, 1) - tiled.clamp(-1, 1)) / 2 * 255).abs()  # the images a user gets
    f = vae.downsample_factor
    print(f"{args.n} images {args.size}x{args.size}, shipped VAE (f={f}), tiles {args.tile * f} px, "
          f"overlap {args.overlap * f} px")
    print(f"decode: tiled vs whole, uint8 levels: mean {levels.mean():.2f}, max {levels.max():.1f}")
    print(f"encode: tiled vs whole posterior mean, mean abs diff / std: "
          f"{(tiled_mean - mean).abs().mean() / mean.std():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
