"""SDXL (Podell et al. 2023): the U-Net layouts and the vector conditioning ``y``.

SDXL adds to the time embedding an MLP (``label_emb.0``) of one vector per image::

    y = [pooled text embedding, fourier(n_1), ..., fourier(n_k)]        [B, pooled + 256 * k]

where ``n`` are the micro-conditioning numbers (sec. 2.2 of the paper): for the base model the
original image size ``(height, width)``, the crop's top-left corner ``(top, left)`` and the target size
``(height, width)`` (k = 6); for the refiner the original size, the crop and an aesthetic score (k = 5).
``fourier`` is the U-Net's own sinusoidal timestep embedding with 256 features (sgm's
``ConcatTimestepEmbedderND``, diffusers' ``add_time_proj``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ldm.config_io import strict_from_dict
from ldm.models.unet import UNetConfig, timestep_embedding

MICRO_CONDITIONING_FEATURES = 256  # Fourier features per micro-conditioning number
BASE_POOLED_DIM = 1280  # OpenCLIP ViT-bigG's projected pooled output
DEFAULT_AESTHETIC_SCORE = 6.0  # diffusers' refiner defaults (positive / negative prompt)
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclass
class SDXLConfig:
    """The ``sdxl`` section of a pipeline config: conditioning settings of an SDXL model (its presence,
    with a U-Net that has ``adm_in_channels``, makes a pipeline SDXL).

    Attributes:
        force_zeros_for_empty_prompt: an empty negative prompt is all-zero conditioning (context and pooled
            embedding) instead of the encoding of "" (diffusers' option of the same name, true for the base
            model; AUTOMATIC1111 does the same for SDXL).
        aesthetic_score, negative_aesthetic_score: the refiner's aesthetic-score conditioning for the
            prompt and the negative prompt (diffusers' defaults 6 and 2.5); unused by the base model.
    """

    force_zeros_for_empty_prompt: bool = True
    aesthetic_score: float = DEFAULT_AESTHETIC_SCORE
    negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SDXLConfig":
        return strict_from_dict(cls, d)


def micro_conditioning_count(unet: UNetConfig, pooled_dim: int) -> int:
    """How many micro-conditioning numbers the U-Net's vector holds after a ``pooled_dim`` embedding
    (6: base model, 5: refiner)."""
    if unet.adm_in_channels is None:
        raise ValueError("this U-Net has no vector conditioning (adm_in_channels)")
    count, rest = divmod(unet.adm_in_channels - pooled_dim, MICRO_CONDITIONING_FEATURES)
    if rest or count not in (5, 6):
        raise ValueError(f"adm_in_channels {unet.adm_in_channels} is not a pooled embedding of {pooled_dim} plus "
                         f"5 or 6 micro-conditioning numbers of {MICRO_CONDITIONING_FEATURES} features")
    return count


def sdxl_base_unet_config() -> UNetConfig:
    """The U-Net of SDXL 1.0 base (2,567,463,684 parameters): three levels, no attention at the first,
    10 transformer blocks per attention at the last, 2048-wide text context."""
    return UNetConfig(
        model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(4, 2),
        num_heads=-1, num_head_channels=64, context_dim=2048, transformer_depth=(1, 2, 10),
        use_linear_in_transformer=True, adm_in_channels=BASE_POOLED_DIM + 6 * MICRO_CONDITIONING_FEATURES,
    )


def sdxl_refiner_unet_config() -> UNetConfig:
    """The U-Net of the SDXL 1.0 refiner: four levels, attention at the middle two, bigG context only."""
    return UNetConfig(
        model_channels=384, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_resolutions=(4, 2),
        num_heads=-1, num_head_channels=64, context_dim=1280, transformer_depth=4,
        use_linear_in_transformer=True, adm_in_channels=BASE_POOLED_DIM + 5 * MICRO_CONDITIONING_FEATURES,
    )


def base_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                  target_size: tuple[int, int]) -> list[float]:
    """The base model's six micro-conditioning numbers: ``(h, w)`` original, ``(top, left)`` crop, ``(h, w)`` target."""
    return [*map(float, original_size), *map(float, crop_top_left), *map(float, target_size)]


def refiner_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                     aesthetic_score: float) -> list[float]:
    """The refiner's five micro-conditioning numbers: original ``(h, w)``, crop ``(top, left)``, aesthetic score."""
    return [*map(float, original_size), *map(float, crop_top_left), float(aesthetic_score)]


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size conditioning of one generation (pixels): the original image size ``(height, width)``,
    the crop's top-left corner ``(top, left)`` and the target size ``(height, width)``. ``None`` sizes are
    the output size, as diffusers' defaults; the refiner reads the original size and crop with an
    aesthetic score instead of the target size."""

    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name, minimum in (("original_size", 1), ("crop_top_left", 0), ("target_size", 1)):
            value = getattr(self, name)
            if value is None:
                continue
            if (not isinstance(value, (tuple, list)) or len(value) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)):
                raise ValueError(f"{name} must be two integers >= {minimum}, got {value!r}")

    def time_ids(self, height: int, width: int, count: int, aesthetic_score: float) -> list[float]:
        """The ``count`` (6: base, 5: refiner) numbers for an output of ``height`` x ``width`` pixels."""
        original = tuple(self.original_size or (height, width))
        if count == 6:
            return base_time_ids(original, tuple(self.crop_top_left), tuple(self.target_size or (height, width)))
        return refiner_time_ids(original, tuple(self.crop_top_left), aesthetic_score)


def conditioning_vector(pooled: Tensor, time_ids: Tensor | Sequence[float]) -> Tensor:
    """SDXL's ``y``: the pooled text embedding followed by the Fourier features of each number.

    Args:
        pooled: ``[B, P]`` pooled (projected) text embedding.
        time_ids: ``[B, k]`` or ``[k]`` (the same for every row) micro-conditioning numbers.

    Returns:
        ``[B, P + 256 * k]`` in ``pooled``'s dtype.
    """
    time_ids = torch.as_tensor(time_ids, dtype=torch.float32, device=pooled.device)
    if time_ids.ndim == 1:
        time_ids = time_ids.expand(pooled.shape[0], -1)
    batch, count = time_ids.shape
    features = timestep_embedding(time_ids.reshape(-1), MICRO_CONDITIONING_FEATURES).reshape(batch, count * MICRO_CONDITIONING_FEATURES)
    return torch.cat([pooled, features.to(pooled.dtype)], dim=-1)


__all__ = [
    "MICRO_CONDITIONING_FEATURES",
    "SDXLConfig",
    "MicroConditioning",
    "micro_conditioning_count",
    "sdxl_base_unet_config",
    "sdxl_refiner_unet_config",
    "base_time_ids",
    "refiner_time_ids",
    "conditioning_vector",
]
