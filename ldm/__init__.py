"""ldm: a readable latent diffusion (Stable Diffusion 1.x/2.x compatible) package.

Public API::

    from ldm import Txt2ImgPipeline
    pipe = Txt2ImgPipeline.from_pretrained("path/to/model")
    images = pipe("a red bicycle", seed=0)

Glossary (names used throughout the code):

=================  ===============================================================
``x``              noisy latents on the sigma scale, ``x = z + sigma * eps``
``z``              clean VAE latents, already multiplied by ``scaling_factor``
``sigma``          noise level ``sqrt((1 - alphas_cumprod) / alphas_cumprod)``
``t``              training timestep index in ``[0, T)`` (may be fractional at sampling)
``context``        cross-attention tokens ``[B, L, D]`` (diffusers: encoder_hidden_states)
``prediction``     what the U-Net outputs: ``"eps"`` (noise) or ``"v"`` (velocity)
=================  ===============================================================

Nothing is imported eagerly: ``import ldm`` is cheap, and the pipeline (torch, transformers)
loads on first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ldm.pipeline import Txt2ImgPipeline

__all__ = ["Txt2ImgPipeline"]


def __getattr__(name: str):
    if name == "Txt2ImgPipeline":
        from ldm.pipeline import Txt2ImgPipeline

        return Txt2ImgPipeline
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
