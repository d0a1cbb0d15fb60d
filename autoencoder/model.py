"""The KL-regularised autoencoder ("first stage") of latent diffusion, compatible with Stable Diffusion's VAE.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3.1: an encoder
maps an image ``x`` in ``[-1, 1]`` to a diagonal Gaussian over latents, a decoder maps latents back to
images, and a light KL penalty towards N(0, I) keeps the latent space well behaved.

Parameter names equal the original CompVis/Stability checkpoint keys under ``first_stage_model.``
(``encoder.down.{i}.block.{j}.conv1.weight`` ...), so a community single-file checkpoint loads without
renaming. Conversion to and from the diffusers layout lives in ``ldm.formats.vae_keys``.

Shapes: images ``[B, in_channels, H, W]``; raw latents ``[B, latent_channels, H/f, W/f]`` with
``f = downsample_factor = 2 ** (len(channel_mult) - 1)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from autoencoder.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, blend_tiles
from ldm.config_io import strict_from_dict  # a leaf module (imports only ldm.errors)

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "Decoder",
    "DiagonalGaussian",
    "Encoder",
]

# Every GroupNorm of the SD VAE uses eps=1e-6 (CompVis `Normalize`), not PyTorch's default 1e-5.
NORM_EPS = 1e-6
# Range of the posterior log-variance, as in CompVis/SD: keeps exp(logvar) finite in float32.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass
class AutoencoderConfig:
    """Hyper-parameters of :class:`AutoencoderKL` (CompVis ``ddconfig`` names in brackets;
    ``ldm.formats.compvis.vae_config_from_compvis`` reads a ``ddconfig``).

    Attributes:
        in_channels: image channels read by the encoder [in_channels].
        out_channels: image channels written by the decoder [out_ch].
        latent_channels: channels of the latent ``z`` [z_channels, = embed_dim].
        base_channels: channels of the first level [ch].
        channel_mult: per-level channel multipliers; level ``i`` has ``base_channels * channel_mult[i]``
            channels and every level but the last halves the resolution [ch_mult].
        num_res_blocks: ResNet blocks per encoder level (the decoder has one more per level) [num_res_blocks].
        norm_groups: groups of every GroupNorm (CompVis hard-codes 32).
        mid_attention: whether the middle blocks hold a single-head self-attention layer
            [attn_type "vanilla" vs "none"].
        scaling_factor: ``z = latent * scaling_factor`` gives the diffusion model roughly unit-variance
            latents [model.params.scale_factor]; 0.18215 for SD 1.x/2.x.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    mid_attention: bool = True
    scaling_factor: float = 0.18215

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if not self.channel_mult:
            raise ValueError("channel_mult must name at least one level")
        positive = ("in_channels", "out_channels", "latent_channels", "base_channels", "norm_groups")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        for channels in self.level_channels:
            if channels <= 0 or channels % self.norm_groups:
                raise ValueError(
                    f"level channels {self.level_channels} must be positive multiples of norm_groups={self.norm_groups}"
                )

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels of each resolution level, highest resolution first."""
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        """Spatial factor ``f`` between images and latents."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (sequences as lists); ``from_dict(to_dict())`` gives an equal config."""
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AutoencoderConfig":
        """Build from a dict; raises ``ValueError`` naming any unknown key."""
        return strict_from_dict(cls, d)


# ----------------------------------------------------------------------------------------------------------
# Posterior
# ----------------------------------------------------------------------------------------------------------


class DiagonalGaussian:
    """The encoder's posterior q(latent | image) = N(mean, diag(exp(logvar))).

    Args:
        parameters: ``[B, 2C, h, w]``, mean and log-variance stacked on the channel axis.
    """

    def __init__(self, parameters: Tensor):
        self.parameters = parameters
        mean, logvar = parameters.chunk(2, dim=1)
        self.mean: Tensor = mean  # [B, C, h, w]
        self.logvar: Tensor = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)  # [B, C, h, w]

    @property
    def std(self) -> Tensor:
        """``exp(logvar / 2)``, ``[B, C, h, w]``."""
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        """``exp(logvar)``, ``[B, C, h, w]``."""
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised draw ``mean + std * eps`` (Kingma & Welling 2014, Eq. 10), ``[B, C, h, w]``.

        The noise is drawn on the generator's device (a CPU generator stays usable for a GPU posterior,
        with the same numbers as on CPU), then moved to the posterior's device.
        """
        noise_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> Tensor:
        """The most likely latent, i.e. the mean, ``[B, C, h, w]``."""
        return self.mean

    def kl(self) -> Tensor:
        """``KL(q || N(0, I))`` summed over latent dims, ``[B]``.

        Closed form for Gaussians (Kingma & Welling 2014, App. B): ``0.5 * sum(mean^2 + var - 1 - logvar)``.
        """
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))))))``; a 1x1 ``nin_shortcut`` when channels change.

    ``[B, in_channels, H, W] -> [B, out_channels, H, W]``. (The SD VAE has no timestep input and dropout 0.)
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections, residual. ``[B, C, H, W]`` -> same."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1 head, H*W, C], contiguous
            # Contiguous: given transposed views, SDPA on the CPU falls back to the math kernel,
            # which materialises the whole [H*W, H*W] attention matrix (issue 11).
            return t.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()

        # softmax(q k^T / sqrt(C)) v  (Vaswani et al. 2017, Eq. 1). torch SDPA is called directly because
        # `autoencoder` imports of `ldm` only the leaf ldm.config_io, not the models where the package's shared
        # attention() function lives.
        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding only right and bottom (CompVis' asymmetric (0, 1, 0, 1) pad).

    ``[B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv. ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """``block_1 -> attn_1 (optional) -> block_2`` at the lowest resolution. ``[B, C, h, w]`` -> same."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else None
        self.block_2 = ResnetBlock(channels, channels, groups)

    def layers(self) -> list[nn.Module]:
        """The sub-blocks in execution order (so the caller can checkpoint each)."""
        attention = [] if self.attn_1 is None else [self.attn_1]
        return [self.block_1, *attention, self.block_2]


class Level(nn.Module):
    """One resolution level: ``block`` (a list of ResnetBlocks), then an optional ``downsample``/``upsample``."""

    def __init__(
        self,
        blocks: list[ResnetBlock],
        downsample: Downsample | None = None,
        upsample: Upsample | None = None,
    ):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample
        self.upsample = upsample


class _CheckpointedStack(nn.Module):
    """Runs sub-blocks through activation checkpointing when ``gradient_checkpointing`` and training."""

    gradient_checkpointing: bool = False

    def _run(self, block: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)


# ----------------------------------------------------------------------------------------------------------
# Encoder / decoder
# ----------------------------------------------------------------------------------------------------------


class Encoder(_CheckpointedStack):
    """Image ``[B, in_channels, H, W]`` -> posterior parameters ``[B, 2 * latent_channels, H/f, W/f]``."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels = config.level_channels
        groups = config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        block_in = config.base_channels
        for level, block_out in enumerate(channels):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
            is_last = level == len(channels) - 1
            self.down.append(Level(blocks, downsample=None if is_last else Downsample(block_out)))

        self.mid = MidBlock(block_in, groups, config.mid_attention)
        self.norm_out = _group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * config.latent_channels, 3, padding=1)

    def forward(self, images: Tensor) -> Tensor:
        h = self.conv_in(images)
        for level in self.down:
            for block in level.block:
                h = self._run(block, h)
            if level.downsample is not None:
                h = level.downsample(h)
        for layer in self.mid.layers():
            h = self._run(layer, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(_CheckpointedStack):
    """Latent ``[B, latent_channels, h, w]`` -> image ``[B, out_channels, h*f, w*f]``.

    As in CompVis, ``up[i]`` is resolution level ``i`` (0 = full resolution) although it runs in reverse
    order, lowest resolution first; each level has ``num_res_blocks + 1`` ResNet blocks.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels = config.level_channels
        groups = config.norm_groups
        block_in = channels[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, groups, config.mid_attention)

        levels: list[Level] = []
        for level in reversed(range(len(channels))):
            block_out = channels[level]
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
            levels.append(Level(blocks, upsample=None if level == 0 else Upsample(block_out)))
        self.up = nn.ModuleList(reversed(levels))  # index by level, as in the checkpoint keys

        self.norm_out = _group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, 3, padding=1)

    def forward(self, latents: Tensor) -> Tensor:
        h = self.conv_in(latents)
        for layer in self.mid.layers():
            h = self._run(layer, h)
        for level in reversed(self.up):
            for block in level.block:
                h = self._run(block, h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------
# The autoencoder
# ----------------------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """KL autoencoder: ``encode`` images to a :class:`DiagonalGaussian`, ``decode`` latents to images.

    Two latent scales:
      * raw latents (``encode``/``decode``) — what the decoder consumes;
      * ``z = latent * scaling_factor`` (``encode_latents``/``decode_latents``) — what diffusion models see.

    Images are ``[B, in_channels, H, W]`` in ``[-1, 1]``; decoded images are not clamped.
    """

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = config if config is not None else AutoencoderConfig()
        latent = self.config.latent_channels
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute encoder/decoder block activations in backward (training mode only) to save memory."""
        return self.encoder.gradient_checkpointing and self.decoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = bool(enabled)
        self.decoder.gradient_checkpointing = bool(enabled)

    @property
    def downsample_factor(self) -> int:
        """Spatial factor ``f``: ``[B, 3, H, W]`` images give ``[B, C, H/f, W/f]`` latents."""
        return self.config.downsample_factor

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def encode(self, images: Tensor, *, tiled: bool = False, tile: int = DEFAULT_TILE,
               overlap: int = DEFAULT_OVERLAP) -> DiagonalGaussian:
        """``[B, in_channels, H, W]`` in ``[-1, 1]`` -> posterior over raw latents ``[B, C, H/f, W/f]``.

        ``tiled``: encode overlapping ``tile*f``-pixel windows one at a time and blend their moments
        (:mod:`autoencoder.tiling`; bounded memory, close to but not equal to the whole).
        """
        def moments(x: Tensor) -> Tensor:
            return self.quant_conv(self.encoder(x))

        f = self.downsample_factor
        if tiled:
            return DiagonalGaussian(blend_tiles(images, moments, tile=tile * f, overlap=overlap * f, scale=1 / f))
        return DiagonalGaussian(moments(images))

    def decode(self, latents: Tensor, *, tiled: bool = False, tile: int = DEFAULT_TILE,
               overlap: int = DEFAULT_OVERLAP) -> Tensor:
        """Raw latents ``[B, C, h, w]`` -> images ``[B, out_channels, h*f, w*f]`` (roughly in ``[-1, 1]``).

        ``tiled``: decode overlapping ``tile x tile`` latent windows one at a time and blend them
        (:mod:`autoencoder.tiling`; bounded memory, close to but not equal to the whole).
        """
        def decode_all(z: Tensor) -> Tensor:
            return self.decoder(self.post_quant_conv(z))

        if tiled:
            return blend_tiles(latents, decode_all, tile=tile, overlap=overlap, scale=self.downsample_factor)
        return decode_all(latents)

    def encode_latents(
        self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images -> diffusion latents ``z = latent * scaling_factor``, ``[B, C, H/f, W/f]``.

        Args:
            sample: draw from the posterior (training) instead of taking its mean (default, deterministic).
            generator: randomness of the draw when ``sample`` is true.
        """
        posterior = self.encode(images)
        latents = posterior.sample(generator) if sample else posterior.mode()
        return latents * self.config.scaling_factor

    def decode_latents(self, z: Tensor, *, tiled: bool = False) -> Tensor:
        """Diffusion latents ``z`` ``[B, C, h, w]`` -> images, undoing the scaling first (``tiled``: see :meth:`decode`)."""
        return self.decode(z / self.config.scaling_factor, tiled=tiled)

    def forward(
        self, images: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct ``images`` ``[B, C_in, H, W]``; returns ``(reconstruction [B, C_out, H, W], posterior)``."""
        posterior = self.encode(images)
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(latents), posterior
