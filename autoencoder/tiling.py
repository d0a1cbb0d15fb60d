"""Tiled encoding and decoding: large images through the autoencoder in bounded memory.

The decoder's activations grow with the image (at 2048x2048 the last up block alone holds
128 x 2048 x 2048 floats = 2 GiB per tensor). Tiling decodes overlapping latent tiles one at a
time and blends each overlap with linear ramps, so no seam is a hard edge; the encoder is tiled
the same way in pixel space, blending the posterior moments (mean and log-variance).

Tiles are not exactly the whole: the GroupNorm statistics of a tile differ from the whole
image's and the receptive field is cut at tile borders, so a tiled result is close to, not equal
to, the untiled one (measured in ``tests/test_vae_tiling.py`` and the README).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# Latent tile side and overlap for decoding (x8 in pixels for SD's f=8: 512-px tiles, 128-px ramps).
DEFAULT_TILE = 64
DEFAULT_OVERLAP = 16


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``[0, length)``, neighbours overlapping by at
    least ``overlap``; the last tile ends exactly at ``length``. One tile when ``length <= tile``."""
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap})")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(size: int, start: int, end: int, length: int, blend: int, device, dtype) -> Tensor:
    """1D weights ``[size]`` for a tile covering ``[start, end)`` of ``length``: rising linearly over the
    first ``blend`` samples and falling over the last ``blend``, except at the image's own edges."""
    weights = torch.ones(size, device=device, dtype=dtype)
    if blend > 0:
        ramp = (torch.arange(blend, device=device, dtype=dtype) + 0.5) / blend
        if start > 0:
            weights[:blend] = ramp
        if end < length:
            weights[-blend:] = torch.minimum(weights[-blend:], ramp.flip(0))
    return weights


def blend_tiles(x: Tensor, fn: Callable[[Tensor], Tensor], *, tile: int, overlap: int, scale: float) -> Tensor:
    """Apply ``fn`` to overlapping ``tile x tile`` windows of ``x [B, C, H, W]`` and blend the results.

    ``fn`` maps ``[B, C, t, t]`` to ``[B, C', t*scale, t*scale]`` (``scale`` = 8 for SD's decoder,
    1/8 for its encoder). Each output pixel is the weighted mean of the tiles that cover it, the
    weights ramping linearly across the overlap. Returns ``[B, C', H*scale, W*scale]``.
    """
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return fn(x)
    out = weight_sum = None
    blend = round(overlap * scale)
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            bottom, right = min(top + tile, height), min(left + tile, width)
            piece = fn(x[..., top:bottom, left:right])
            if out is None:
                shape = (*piece.shape[:2], round(height * scale), round(width * scale))
                out = torch.zeros(shape, device=piece.device, dtype=torch.float32)
                weight_sum = torch.zeros(shape[-2:], device=piece.device, dtype=torch.float32)
            y0, x0 = round(top * scale), round(left * scale)
            rows, cols = piece.shape[-2:]
            w = (_ramp(rows, top, bottom, height, blend, piece.device, torch.float32)[:, None]
                 * _ramp(cols, left, right, width, blend, piece.device, torch.float32)[None, :])
            out[..., y0:y0 + rows, x0:x0 + cols] += piece.float() * w
            weight_sum[y0:y0 + rows, x0:x0 + cols] += w
    return (out / weight_sum).to(piece.dtype)
