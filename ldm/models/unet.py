"""The cross-attention U-Net of latent diffusion (Rombach et al. 2022), SD 1.x, 2.x and XL layouts.

The network predicts noise (or v) for noisy latents ``x [B, C, H, W]`` at timesteps ``t [B]``,
conditioned on text tokens ``context [B, L, context_dim]`` through cross-attention.

Structure (CompVis names; a *level* is one spatial resolution, ``ds = 2**level`` its downsample
factor)::

    time_embed            sinusoidal(t) -> Linear -> SiLU -> Linear           [B, 4*model_channels]
    label_emb             (optional) an Embedding of integer labels, or (SDXL) label_emb.0 = Linear ->
                          SiLU -> Linear of a conditioning vector y [B, adm_in_channels]; added to
                          the time embedding
    input_blocks.0        conv_in
    input_blocks.{i}      ResBlock (+ SpatialTransformer where ds in attention_resolutions),
                          num_res_blocks per level, then a Downsample except at the last level
    middle_block          ResBlock, SpatialTransformer, ResBlock
    output_blocks.{i}     ResBlock on [h, skip] (+ SpatialTransformer) (+ Upsample at the end of
                          every level but the first), num_res_blocks + 1 per level
    out                   GroupNorm -> SiLU -> conv_out

Parameter names equal the original Stable Diffusion checkpoint keys below
``model.diffusion_model.``, so those weights load without renaming.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.models.attention import attention
from ldm.config_io import strict_from_dict

logger = logging.getLogger(__name__)

TIMESTEP_MAX_PERIOD = 10_000


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class UNetConfig:
    """Hyper-parameters of :class:`UNetModel`, with the CompVis YAML names
    (:func:`ldm.formats.compvis.unet_config_from_compvis` reads a YAML's ``unet_config``).

    Defaults are Stable Diffusion 1.x. Stable Diffusion 2.x uses ``num_heads=-1,
    num_head_channels=64, context_dim=1024, use_linear_in_transformer=True``. SDXL base uses
    ``channel_mult=(1, 2, 4), attention_resolutions=(4, 2), transformer_depth=(1, 2, 10),
    num_head_channels=64, context_dim=2048, adm_in_channels=2816`` (see
    :mod:`ldm.models.sdxl_conditioning`).

    Attributes:
        in_channels: latent channels in (4; 9 for inpainting models).
        out_channels: channels predicted.
        model_channels: base width; level ``l`` has ``model_channels * channel_mult[l]`` channels.
        channel_mult: width multiplier per level; ``len(channel_mult)`` levels.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attention_resolutions: downsample factors ``2**level`` at which SpatialTransformers sit.
        num_heads: heads per attention layer (used when ``num_head_channels == -1``).
        num_head_channels: channels per head; when positive it wins over ``num_heads`` and the
            number of heads is ``channels // num_head_channels`` (as in CompVis).
        context_dim: width of the cross-attention tokens.
        transformer_depth: BasicTransformerBlocks per SpatialTransformer: one int, or one per level
            (SDXL base: ``(1, 2, 10)``); the middle block uses the last level's depth (as CompVis'
            default ``transformer_depth_middle`` and diffusers do). A tuple whose entries are all
            equal is stored as one int.
        use_linear_in_transformer: ``proj_in``/``proj_out`` are Linear (SD2) instead of 1x1 conv.
        upcast_attention: compute attention in float32 (SD 2.1 in half precision).
        norm_groups: groups of every GroupNorm.
        num_classes: size of a label embedding added to the time embedding (CompVis ``label_emb``,
            diffusers ``class_embedding``); the SD x4 upscaler uses 1000 for its noise level. None: no labels.
        disable_self_attentions: per level, whether the first attention of each transformer block attends
            to the text context instead of the image (CompVis ``disable_self_attentions``, diffusers
            ``only_cross_attention``; the SD x4 upscaler sets it on its first three levels). None: never.
        adm_in_channels: width of a conditioning vector ``y`` mapped by an MLP (``label_emb.0``) and added
            to the time embedding (CompVis ``num_classes: sequential`` + ``adm_in_channels``, diffusers
            ``addition_embed_type: text_time``; SDXL: pooled text embedding + 6 (base) or 5 (refiner)
            Fourier-embedded micro-conditioning numbers of 256 features each). None: no vector.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    num_head_channels: int = -1
    context_dim: int = 768
    transformer_depth: int | tuple[int, ...] = 1
    use_linear_in_transformer: bool = False
    upcast_attention: bool = False
    norm_groups: int = 32
    num_classes: int | None = None
    disable_self_attentions: tuple[bool, ...] | None = None
    adm_in_channels: int | None = None

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if isinstance(self.transformer_depth, (list, tuple)):
            depths = tuple(int(d) for d in self.transformer_depth)
            self.transformer_depth = depths[0] if len(set(depths)) == 1 else depths
        if self.disable_self_attentions is not None:
            self.disable_self_attentions = tuple(bool(flag) for flag in self.disable_self_attentions)
        # A set of factors; kept in the CompVis YAML order (4, 2, 1) so equal configs compare equal.
        self.attention_resolutions = tuple(sorted({int(r) for r in self.attention_resolutions}, reverse=True))
        self._validate()

    # ---- derived quantities ----

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def level_channels(self, level: int) -> int:
        """Channels of the blocks at ``level``."""
        return self.model_channels * self.channel_mult[level]

    def has_attention(self, level: int) -> bool:
        """Whether the blocks at ``level`` carry a SpatialTransformer."""
        return 2**level in self.attention_resolutions

    def depth_at(self, level: int) -> int:
        """BasicTransformerBlocks per SpatialTransformer at ``level``."""
        if isinstance(self.transformer_depth, tuple):
            return self.transformer_depth[level]
        return self.transformer_depth

    @property
    def middle_depth(self) -> int:
        """BasicTransformerBlocks in the middle block's SpatialTransformer (the last level's)."""
        return self.depth_at(self.num_levels - 1)

    def only_cross_attention(self, level: int) -> bool:
        """Whether the transformers at ``level`` replace self-attention by a second cross-attention."""
        return bool(self.disable_self_attentions) and self.disable_self_attentions[level]

    def heads_for(self, channels: int) -> tuple[int, int]:
        """``(num_heads, head_dim)`` of a SpatialTransformer on ``channels`` channels."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    # ---- (de)serialisation ----

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples) suitable for JSON/YAML."""
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        for optional in ("num_classes", "disable_self_attentions", "adm_in_channels"):  # absent when unused
            if d[optional] is None:
                del d[optional]
        if self.disable_self_attentions is not None:
            d["disable_self_attentions"] = list(self.disable_self_attentions)
        if isinstance(self.transformer_depth, tuple):
            d["transformer_depth"] = list(self.transformer_depth)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming any unknown key."""
        return strict_from_dict(cls, d)

    def _validate(self) -> None:
        if self.num_head_channels <= 0 and self.num_heads <= 0:
            raise ValueError("set num_heads > 0 or num_head_channels > 0")
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks",
                     "context_dim", "norm_groups"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.channel_mult:
            raise ValueError("channel_mult must name at least one level")
        if isinstance(self.transformer_depth, tuple) and len(self.transformer_depth) != self.num_levels:
            raise ValueError(f"transformer_depth needs one depth per level ({self.num_levels}), "
                             f"got {list(self.transformer_depth)}")
        used = [level for level in range(self.num_levels) if self.has_attention(level)] + [self.num_levels - 1]
        if any(self.depth_at(level) <= 0 for level in used):  # levels without attention may say 0
            raise ValueError(f"transformer_depth must be positive where attention sits, got {self.transformer_depth}")
        if self.num_classes is not None and self.num_classes <= 0:
            raise ValueError(f"num_classes must be positive or null, got {self.num_classes}")
        if self.adm_in_channels is not None and self.adm_in_channels <= 0:
            raise ValueError(f"adm_in_channels must be positive or null, got {self.adm_in_channels}")
        if self.num_classes is not None and self.adm_in_channels is not None:
            raise ValueError("num_classes and adm_in_channels are two kinds of label embedding; set one")
        if self.disable_self_attentions is not None and len(self.disable_self_attentions) != self.num_levels:
            raise ValueError(f"disable_self_attentions needs one flag per level ({self.num_levels}), "
                             f"got {len(self.disable_self_attentions)}")
        reachable = {2**level for level in range(self.num_levels)}
        stray = sorted(set(self.attention_resolutions) - reachable)
        if stray:
            raise ValueError(
                f"attention_resolutions {stray} match no level (downsample factors are {sorted(reachable)})"
            )
        for level in range(self.num_levels):
            channels = self.level_channels(level)
            if channels % self.norm_groups:
                raise ValueError(f"level {level}: {channels} channels not divisible by norm_groups={self.norm_groups}")
            if self.has_attention(level) or level == self.num_levels - 1:  # last level: middle block
                heads, head_dim = self.heads_for(channels)
                if heads <= 0 or heads * head_dim != channels:
                    raise ValueError(f"level {level}: {channels} channels cannot be split into heads "
                                     f"(num_heads={self.num_heads}, num_head_channels={self.num_head_channels})")


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, max_period: float = TIMESTEP_MAX_PERIOD) -> Tensor:
    """Sinusoidal timestep features as in SD (Vaswani et al. 2017, sec. 3.5; cos half first).

    ``freq_i = max_period ** (-i / half)`` for ``i < half = dim // 2``;
    ``emb = [cos(t * freq), sin(t * freq)]`` (zero-padded when ``dim`` is odd).

    Args:
        t: ``[B]`` timesteps, may be fractional.
        dim: embedding width.

    Returns:
        ``[B, dim]`` float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, as CompVis' ``GroupNorm32`` does: the statistics of
    fp16/bf16 activations overflow or lose precision otherwise. The affine weights are upcast too
    (CPU kernels refuse half-precision weights with float32 input).

    On the CPU a half-precision input goes to the kernel as it is, with float32 weights: that kernel
    accumulates and normalises in float32 itself and rounds once at the end, the same arithmetic
    without two full-size dtype copies of the activations (outputs within one rounding of the upcast
    path; the bf16 speed it buys is in ``scripts/bench/benchmark.py``).
    """

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a module's parameters (the residual branch starts as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _Checkpointable(nn.Module):
    """Mixin: run ``_forward`` under activation checkpointing when enabled and training."""

    gradient_checkpointing: bool = False

    def forward(self, *args: Any) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)

    def _forward(self, *args: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ResBlock(_Checkpointable):
    """Residual block with an additive timestep embedding (Ho et al. 2020, appendix B).

    ``h = conv(SiLU(norm(x))) + Linear(SiLU(emb)); out = skip(x) + conv(SiLU(norm(h)))``.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, norm_groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(norm_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_groups, out_channels),
            nn.SiLU(),
            nn.Identity(),  # dropout slot in CompVis (p=0 in SD); keeps the index of the conv
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x ``[B, C_in, H, W]``, emb ``[B, E]`` -> ``[B, C_out, H, W]``."""
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (itself when ``context`` is None)."""

    def __init__(self, query_dim: int, context_dim: int | None, num_heads: int, head_dim: int,
                 upcast: bool = False) -> None:
        super().__init__()
        inner = num_heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())  # [1]: dropout slot

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x ``[B, L, query_dim]``, context ``[B, Lc, context_dim]`` -> ``[B, L, query_dim]``."""
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context),
                        num_heads=self.num_heads, upcast=self.upcast)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): ``a * gelu(b)`` with ``[a, b] = proj(x)``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., dim_in] -> [..., dim_out]``."""
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with a 4x hidden width: ``net.0`` GEGLU, ``net.2`` output Linear."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        hidden = dim * mult
        self.net = nn.Sequential(GEGLU(dim, hidden), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention on context, GEGLU MLP.

    With ``only_cross_attention`` the first attention also attends to the context (CompVis
    ``disable_self_attn``, used by the SD x4 upscaler's high-resolution levels).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, context_dim: int,
                 upcast: bool = False, only_cross_attention: bool = False) -> None:
        super().__init__()
        self.only_cross_attention = only_cross_attention
        # Registration order follows CompVis so state dicts list keys in the same order.
        self.attn1 = CrossAttention(dim, context_dim if only_cross_attention else None, num_heads, head_dim, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, num_heads, head_dim, upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x ``[B, L, dim]``, context ``[B, Lc, context_dim]`` -> ``[B, L, dim]``."""
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(_Checkpointable):
    """Transformer over the pixels of a feature map, conditioned on ``context``.

    ``norm -> proj_in -> [B, H*W, inner] -> transformer_blocks -> proj_out -> + x``; ``proj_in``/
    ``proj_out`` are 1x1 convs (SD1, applied on the map) or Linear layers (SD2, on tokens).
    """

    def __init__(self, channels: int, num_heads: int, head_dim: int, depth: int, context_dim: int,
                 use_linear: bool, upcast: bool, norm_groups: int, only_cross_attention: bool = False) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.use_linear = use_linear
        self.norm = GroupNorm32(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, num_heads, head_dim, context_dim, upcast, only_cross_attention)
            for _ in range(depth)
        )
        self.proj_out = _zero(nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1))

    def _forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x ``[B, C, H, W]``, context ``[B, L, context_dim]`` -> ``[B, C, H, W]``."""
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # [B, H*W, C']
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(batch, -1, height, width)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    """Strided 3x3 conv: ``[B, C, H, W] -> [B, C, H/2, W/2]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands ``emb`` to ResBlocks and ``context`` to SpatialTransformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class UNetModel(nn.Module):
    """Cross-attention U-Net with Stable Diffusion 1.x/2.x parameter names.

    ``forward(x [B, in_channels, H, W], t [B], context [B, L, context_dim]) -> [B, out_channels, H, W]``
    with ``H`` and ``W`` divisible by ``2 ** (len(channel_mult) - 1)``.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        base, emb_dim = config.model_channels, config.time_embed_dim

        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.num_classes is not None:
            self.label_emb = nn.Embedding(config.num_classes, emb_dim)
        if config.adm_in_channels is not None:  # CompVis num_classes: "sequential"
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(config.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            ))

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(config.in_channels, base, 3, padding=1))]
        )
        skip_channels = [base]
        channels = base
        for level in range(config.num_levels):
            for _ in range(config.num_res_blocks):
                layers = self._res_and_attention(channels, config.level_channels(level), level)
                channels = config.level_channels(level)
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(channels)
            if level != config.num_levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(channels)))
                skip_channels.append(channels)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(channels, emb_dim, channels, config.norm_groups),
            self._transformer(channels, config.middle_depth, only_cross_attention=False),  # disable_middle_self_attn: False
            ResBlock(channels, emb_dim, channels, config.norm_groups),
        )

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(config.num_levels)):
            for index in range(config.num_res_blocks + 1):
                layers = self._res_and_attention(
                    channels + skip_channels.pop(), config.level_channels(level), level
                )
                channels = config.level_channels(level)
                if level != 0 and index == config.num_res_blocks:
                    layers.append(Upsample(channels))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(config.norm_groups, channels),
            nn.SiLU(),
            _zero(nn.Conv2d(channels, config.out_channels, 3, padding=1)),
        )

    def _transformer(self, channels: int, depth: int, *, only_cross_attention: bool) -> SpatialTransformer:
        cfg = self.config
        num_heads, head_dim = cfg.heads_for(channels)
        return SpatialTransformer(channels, num_heads, head_dim, depth, cfg.context_dim,
                                  cfg.use_linear_in_transformer, cfg.upcast_attention, cfg.norm_groups,
                                  only_cross_attention)

    def _res_and_attention(self, in_channels: int, out_channels: int, level: int) -> list[nn.Module]:
        layers: list[nn.Module] = [
            ResBlock(in_channels, self.config.time_embed_dim, out_channels, self.config.norm_groups)
        ]
        if self.config.has_attention(level):
            layers.append(self._transformer(out_channels, self.config.depth_at(level),
                                            only_cross_attention=self.config.only_cross_attention(level)))
        return layers

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute ResBlock/SpatialTransformer activations in backward (training mode only)."""
        for module in self.modules():
            if isinstance(module, _Checkpointable):
                module.gradient_checkpointing = enabled

    def forward(self, x: Tensor, t: Tensor, context: Tensor, class_labels: Tensor | None = None,
                y: Tensor | None = None) -> Tensor:
        """Predict noise (or v) for noisy latents.

        Args:
            x: ``[B, in_channels, H, W]`` noisy latents (with any concatenated conditioning channels).
            t: ``[B]`` (or scalar) timesteps in ``[0, T)``, may be fractional.
            context: ``[B, L, context_dim]`` cross-attention tokens.
            class_labels: ``[B]`` (or scalar) integer labels in ``[0, num_classes)``; required exactly when
                the config has ``num_classes`` (the x4 upscaler's noise level).
            y: ``[B, adm_in_channels]`` conditioning vector; required exactly when the config has
                ``adm_in_channels`` (SDXL: see :mod:`ldm.models.sdxl_conditioning`).

        Returns:
            ``[B, out_channels, H, W]``.
        """
        factor = 2 ** (self.config.num_levels - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"spatial size {tuple(x.shape[-2:])} must be divisible by {factor}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        weight_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(weight_dtype))
        emb = emb + self._label_embedding(class_labels, x) + self._vector_embedding(y, weight_dtype)

        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def _label_embedding(self, class_labels: Tensor | None, x: Tensor) -> Tensor | float:
        """``label_emb(y) [B, time_embed_dim]`` added to the time embedding (0 without labels)."""
        if (class_labels is None) != (self.config.num_classes is None):
            raise ValueError("class_labels must be given exactly when the U-Net has num_classes "
                             f"(num_classes={self.config.num_classes})")
        if class_labels is None:
            return 0.0
        labels = torch.as_tensor(class_labels, device=x.device).long()
        return self.label_emb(labels.expand(x.shape[0]) if labels.ndim == 0 else labels)

    def _vector_embedding(self, y: Tensor | None, dtype: torch.dtype) -> Tensor | float:
        """``label_emb(y) [B, time_embed_dim]`` for a conditioning vector ``y [B, adm_in_channels]`` (0 without)."""
        if (y is None) != (self.config.adm_in_channels is None):
            raise ValueError("y must be given exactly when the U-Net has adm_in_channels "
                             f"(adm_in_channels={self.config.adm_in_channels})")
        if y is None:
            return 0.0
        if y.shape[-1] != self.config.adm_in_channels:
            raise ValueError(f"y has {y.shape[-1]} features, the U-Net expects {self.config.adm_in_channels}")
        return self.label_emb(y.to(dtype))


__all__ = [
    "UNetConfig",
    "UNetModel",
    "timestep_embedding",
    "ResBlock",
    "SpatialTransformer",
    "BasicTransformerBlock",
    "CrossAttention",
]
