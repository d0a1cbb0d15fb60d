"""The configuration of an original single-file checkpoint, read from its weights.

Original SD 1.x/2.x files (:mod:`ldm.formats.single_file`) carry no configuration. When neither the
caller, the file's metadata nor a CompVis YAML beside it gives one, :func:`infer_config` reads it
from the shapes of the weights (module-relative state dicts, as
:func:`ldm.formats.checkpoints.split_components` gives; tensors may live on the meta device):

* U-Net: ``input_blocks.0.0.weight [model_channels, in_channels, 3, 3]``; one level per run of
  ResBlocks between the Downsamples (``input_blocks.{i}.0.op``), giving ``num_res_blocks``; each
  level's width from its first ResBlock's ``out_layers.3.weight [channels, channels, 3, 3]``; its
  attention from a ``proj_in``; ``attn2.to_k.weight [inner, context_dim]``; ``out.2.weight
  [out_channels, ...]``; ``proj_in.weight`` 2-D (Linear, SD 2.x) or 4-D (1x1 conv, SD 1.x).
* VAE: ``encoder.conv_in.weight [ch, in_channels, 3, 3]``; per level
  ``encoder.down.{n}.block.0.conv2.weight [ch * ch_mult[n], ...]``;
  ``decoder.conv_in.weight [.., latent_channels, 3, 3]``; ``decoder.conv_out.weight [out_ch, ...]``;
  mid-block attention when ``encoder.mid.attn_1.*`` is present.
* Text encoder: the key layout gives the family (:func:`text_layout`; SD 1.x: CLIP keys, 8 heads
  per U-Net attention; SD 2.x: OpenCLIP keys, 64-channel heads, linear ``proj_in``); the token
  embedding ``[vocab_size, width]``, the position embedding ``[max_length, width]``, the number of
  blocks and the MLP's ``[hidden, width]`` give the sizes (``text_projection [width, projection_dim]``
  where present).

What no weight shows takes the Stable Diffusion value (the constants below): 32 normalisation
groups, 64-channel text-encoder heads, the SD noise schedule, eps prediction, VAE scaling 0.18215.

SD's x4 upscaler (``x4-upscaler-ema.safetensors``, Stability's ``x4-upscaling.yaml``) is recognised by
its U-Net: a label embedding ``label_emb.weight [num_classes, time_embed_dim]`` (the augmentation noise
level) and ``latent_channels + 3`` input channels (latents + the low-resolution RGB image). Its first
attention is cross-attention on some levels (``disable_self_attentions``), seen in ``attn1.to_k.weight
[inner, context_dim]`` instead of ``[inner, inner]``. What its weights do not show comes from the YAML
(:func:`upscaler_config`): v prediction on the 1e-4 .. 0.02 schedule, 8 heads per attention, VAE scaling
0.08333, augmentation levels up to 350.

Two kinds of SD 2.x text encoder are found in single files. A *complete* OpenCLIP tower (every
Stability release) holds all blocks plus ``text_projection`` and ``logit_scale``; SD 2.x uses the
penultimate block's output. An *exported* tower (written from a diffusers folder, as diffusers'
own ``convert_diffusers_to_original_stable_diffusion.py`` does) lacks ``text_projection`` and
``logit_scale`` and also the last block, which the penultimate-layer model never uses; its stored
blocks are all used. The first loads as ``kind="openclip"``, the second as a ``kind="clip"``
transformers tower with GELU, exactly what a diffusers SD 2.x folder loads as
(:func:`exported_text_config` is the config such a file carries).

Failures raise :class:`~ldm.errors.CheckpointError` with a one-line message.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from torch import Tensor

from autoencoder.model import AutoencoderConfig
from ldm.config import PipelineConfig, SamplingDefaults
from ldm.errors import CheckpointError
from ldm.formats.checkpoints import SDXL_TEXT_KEYS, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from ldm.models.sdxl_conditioning import SDXLConfig
from ldm.models.text_encoders import TextEncoderConfig
from ldm.models.unet import UNetConfig
from ldm.sampling.schedule import ScheduleConfig
from ldm.upscaling import UpscaleConfig

__all__ = [
    "CLIP_TEXT_PREFIX",
    "COMPVIS_NORM_GROUPS",
    "DEFAULT_SCALING_FACTOR",
    "OPENCLIP_PREFIX",
    "POSITION_IDS",
    "TEXT_HEAD_CHANNELS",
    "UPSCALER_SCALING_FACTOR",
    "check_upscaler_channels",
    "exported_text_config",
    "infer_config",
    "infer_text_config",
    "infer_unet_config",
    "infer_vae_config",
    "key_indices",
    "native_sampling",
    "text_layout",
    "upscaler_config",
]

# Text-encoder key layouts, module-relative (no ``cond_stage_model.``).
CLIP_TEXT_PREFIX = "transformer.text_model."
OPENCLIP_PREFIX = "model."
POSITION_IDS = "transformer.text_model.embeddings.position_ids"  # a constant arange SD 1.x files carry
_OPENCLIP_EXTRAS = ("model.text_projection", "model.logit_scale")

# Values CompVis code hard-codes (not in any YAML) and Stable Diffusion uses.
COMPVIS_NORM_GROUPS = 32
TEXT_HEAD_CHANNELS = 64  # CLIP ViT-L/14 (768 / 12) and OpenCLIP ViT-H/14 (1024 / 16)
SD1_UNET_HEADS = {"num_heads": 8, "num_head_channels": -1}
SD2_UNET_HEADS = {"num_heads": -1, "num_head_channels": 64}
DEFAULT_SCALING_FACTOR = 0.18215
SDXL_SCALING_FACTOR = 0.13025  # SDXL's own VAE
SDXL_LATENT_SIZE = 128  # SDXL's native 1024x1024
# SD's x4 upscaler (x4-upscaling.yaml); diffusers' StableDiffusionUpscalePipeline imposes the scaling factor.
UPSCALER_SCALING_FACTOR = 0.08333
UPSCALER_UNET_HEADS = {"num_heads": 8, "num_head_channels": -1}
UPSCALER_LATENT_SIZE = 128


# --------------------------------------------------------------------------------------------
# Inference from the weights
# --------------------------------------------------------------------------------------------


def infer_config(parts: Mapping[str, Mapping[str, Tensor]], *, prediction: str | None = None) -> PipelineConfig:
    """A PipelineConfig from the shapes of an original checkpoint's weights.

    Args:
        parts: ``{"unet", "vae", "text_encoder"}`` module-relative state dicts, as
            :func:`ldm.formats.checkpoints.split_components` gives (tensors may live on the meta device).
        prediction: the parameterisation (not visible in weights); ``None``: eps, except for the x4
            upscaler (v). SD 2.x v-prediction models get their native 768x768 size, every other
            text-to-image model 512x512 (for an f=8 VAE).
    """
    if any(key.startswith(SDXL_TEXT_KEYS) for key in parts["text_encoder"]):
        return infer_sdxl_config(parts, prediction=prediction)
    text = infer_text_config(parts["text_encoder"])
    family = "sd2" if text_layout(parts["text_encoder"]) != "clip" else "sd1"
    unet = infer_unet_config(parts["unet"], family)
    vae = infer_vae_config(parts["vae"])
    if is_upscaler_unet(unet, vae):
        config = upscaler_config(unet, vae, text)
        return config if prediction is None else replace(config, schedule=replace(config.schedule,
                                                                                 prediction=prediction))
    prediction = prediction or "eps"
    latent_size = 96 if family == "sd2" and prediction == "v" else 64
    return PipelineConfig(unet=unet, vae=vae, text_encoder=text, schedule=ScheduleConfig(prediction=prediction),
                          sampling=native_sampling(latent_size, vae))


def infer_sdxl_config(parts: Mapping[str, Mapping[str, Tensor]], *, prediction: str | None = None) -> PipelineConfig:
    """An SDXL base (text ``embedders.0`` CLIP ViT-L, ``embedders.1`` OpenCLIP bigG) or refiner (bigG alone)
    config from the weights; the SDXL VAE's scaling factor, 1024x1024, diffusers' SDXL schedule."""
    try:
        return _sdxl_config(parts, prediction)
    except CheckpointError as error:
        raise CheckpointError(f"SDXL checkpoint: {error}") from None


def _sdxl_config(parts: Mapping[str, Mapping[str, Tensor]], prediction: str | None) -> PipelineConfig:
    text = parts["text_encoder"]
    towers = []
    for i in key_indices(text, SDXL_TEXT_KEYS):
        prefix = f"{SDXL_TEXT_KEYS}{i}."
        tower = infer_text_config({k[len(prefix):]: v for k, v in text.items() if k.startswith(prefix)})
        towers.append(replace(tower, layer="penultimate", final_norm=False))
    if not 1 <= len(towers) <= 2 or towers[-1].kind != "openclip":
        raise CheckpointError(f"cannot read the SDXL text encoders: expected CLIP ViT-L and/or OpenCLIP bigG "
                              f"embedders, found {[t.kind for t in towers]}")
    vae = infer_vae_config(parts["vae"], scaling_factor=SDXL_SCALING_FACTOR)
    return PipelineConfig(unet=infer_unet_config(parts["unet"], "sdxl"), vae=vae, text_encoder=towers[0],
                          text_encoder_2=towers[1] if len(towers) == 2 else None,
                          schedule=ScheduleConfig(prediction=prediction or "eps"),
                          sampling=native_sampling(SDXL_LATENT_SIZE, vae),
                          sdxl=SDXLConfig(force_zeros_for_empty_prompt=len(towers) == 2))  # diffusers: refiner False


def is_upscaler_unet(unet: UNetConfig, vae: AutoencoderConfig) -> bool:
    """Whether a U-Net reads latents + an RGB image and a label (the x4 upscaler's noise level)."""
    return unet.num_classes is not None and unet.in_channels == vae.latent_channels + 3


def upscaler_config(unet: UNetConfig, vae: AutoencoderConfig, text: TextEncoderConfig) -> PipelineConfig:
    """SD's x4 upscaler around sizes read from the weights, the rest from Stability's x4-upscaling.yaml:
    8 heads, VAE scaling 0.08333, v prediction on scaled-linear betas 1e-4 .. 0.02 with CompVis' DDIM
    spacing, and the default augmentation (:class:`~ldm.upscaling.UpscaleConfig`: max level 350)."""
    return PipelineConfig(
        unet=replace(unet, **UPSCALER_UNET_HEADS),
        vae=replace(vae, scaling_factor=UPSCALER_SCALING_FACTOR),
        text_encoder=text,
        schedule=ScheduleConfig(beta_start=0.0001, beta_end=0.02, prediction="v"),
        sampling=native_sampling(UPSCALER_LATENT_SIZE, vae),
        upscale=UpscaleConfig(),
    )


def check_upscaler_channels(unet: UNetConfig, vae: AutoencoderConfig, source: str) -> None:
    """Refuse a super-resolution U-Net that does not take latents + RGB image and a noise-level label."""
    if not is_upscaler_unet(unet, vae) or unet.out_channels != vae.latent_channels:
        raise CheckpointError(
            f"{source}: an x4-upscaler U-Net maps {vae.latent_channels} + 3 channels to {vae.latent_channels} "
            f"with a noise-level label embedding; this one maps {unet.in_channels} to {unet.out_channels} "
            f"(num_classes={unet.num_classes})")


def native_sampling(latent_size: int, vae: AutoencoderConfig) -> SamplingDefaults:
    """Native image size of a model with ``latent_size`` latent pixels (CompVis ``image_size``)."""
    size = int(latent_size) * vae.downsample_factor
    return SamplingDefaults(height=size, width=size)


def _need(weights: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    if key not in weights:
        raise CheckpointError(f"cannot read the {what} architecture: the weights lack {key} (pass a config)")
    return weights[key]


def key_indices(weights: Mapping[str, Tensor], prefix: str) -> list[int]:
    """Sorted integers ``i`` of keys ``{prefix}{i}.*`` (the numbered blocks below ``prefix``)."""
    found = {k[len(prefix):].split(".", 1)[0] for k in weights if k.startswith(prefix)}
    return sorted(int(i) for i in found if i.isdigit())


def _ratio(channels: int, base: int, what: str) -> int:
    if channels % base:
        raise CheckpointError(f"cannot read the {what} architecture: {channels} channels are not a multiple of {base}")
    return channels // base


def infer_unet_config(weights: Mapping[str, Tensor], family: str) -> UNetConfig:
    """The U-Net config from its weights' shapes; head layout and norm groups from the family."""
    if not weights:
        raise CheckpointError(f"cannot read the U-Net architecture: no {UNET_PREFIX}* weights (pass a config)")
    conv_in = _need(weights, "input_blocks.0.0.weight", "U-Net")
    base, in_channels = conv_in.shape[0], conv_in.shape[1]
    levels: list[list[int]] = [[]]  # input-block indices of the ResBlocks of each level
    for i in key_indices(weights, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in weights:  # a Downsample ends the level
            levels.append([])
        else:
            levels[-1].append(i)
    if len({len(level) for level in levels}) != 1 or not levels[0]:
        raise CheckpointError(f"cannot read the U-Net architecture: levels hold {[len(x) for x in levels]} ResBlocks")
    mult = [_ratio(_need(weights, f"input_blocks.{level[0]}.0.out_layers.3.weight", "U-Net").shape[0], base, "U-Net")
            for level in levels]
    attention = [n for n, level in enumerate(levels) if f"input_blocks.{level[0]}.1.proj_in.weight" in weights]
    to_k = _need(weights, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "U-Net")
    label_emb = weights.get("label_emb.weight")
    vector_emb = weights.get("label_emb.0.0.weight")  # SDXL: label_emb.0 = Linear -> SiLU -> Linear of y
    try:
        return UNetConfig(
            in_channels=in_channels,
            out_channels=_need(weights, "out.2.weight", "U-Net").shape[0],
            model_channels=base,
            channel_mult=tuple(mult),
            num_res_blocks=len(levels[0]),
            attention_resolutions=tuple(2**n for n in attention),
            context_dim=to_k.shape[1],
            transformer_depth=_transformer_depths(weights, levels, attention),
            use_linear_in_transformer=weights["middle_block.1.proj_in.weight"].ndim == 2,
            upcast_attention=family == "sd2",  # Stability's SD 2 code computes attention in float32
            adm_in_channels=vector_emb.shape[1] if vector_emb is not None else None,
            norm_groups=COMPVIS_NORM_GROUPS,
            num_classes=label_emb.shape[0] if label_emb is not None else None,
            disable_self_attentions=_self_attention_disabled(weights, levels, attention, to_k.shape[1]),
            **(SD1_UNET_HEADS if family == "sd1" else SD2_UNET_HEADS),  # SDXL: 64-channel heads too
        )
    except ValueError as error:
        raise CheckpointError(f"cannot build a U-Net for these weights ({error}); pass a config") from None


def _transformer_depths(weights: Mapping[str, Tensor], levels: list[list[int]], attention: list[int]) -> int | tuple:
    """Transformer blocks per level: one int when every attention level and the middle block agree, else per
    level (SDXL base: ``(1, 2, 10)``), the middle block's count at the last level (where our U-Net reads it)
    and 1 at other levels without attention (the value of sgm's YAML and diffusers' configs)."""
    middle = len(key_indices(weights, "middle_block.1.transformer_blocks."))
    counts = {n: len(key_indices(weights, f"input_blocks.{levels[n][0]}.1.transformer_blocks.")) for n in attention}
    if set(counts.values()) <= {middle}:
        return middle
    last = len(levels) - 1
    if counts.get(last, middle) != middle:
        raise CheckpointError(f"the middle block has {middle} transformer blocks, the last level {counts[last]}")
    return tuple(middle if n == last else counts.get(n, 1) for n in range(len(levels)))


def _self_attention_disabled(weights: Mapping[str, Tensor], levels: list[list[int]], attention: list[int],
                             context_dim: int) -> tuple[bool, ...] | None:
    """Per level, whether the first attention reads the text (``attn1.to_k.weight [inner, context_dim]``);
    ``None`` when no level does. A level without attention takes the flag of the nearest level with
    attention (the flag changes nothing there; Stability's x4 YAML writes it so). When the blocks are as
    wide as the context, the two cannot be told apart: self-attention is assumed."""
    flags = {}
    for n in attention:
        to_k = weights.get(f"input_blocks.{levels[n][0]}.1.transformer_blocks.0.attn1.to_k.weight")
        flags[n] = to_k is not None and to_k.shape[1] == context_dim != to_k.shape[0]
    if not any(flags.values()):
        return None
    return tuple(flags[min(attention, key=lambda a: (abs(a - n), -a))] for n in range(len(levels)))


def infer_vae_config(
    weights: Mapping[str, Tensor], scaling_factor: float = DEFAULT_SCALING_FACTOR
) -> AutoencoderConfig:
    """The VAE config from its weights' shapes (32 norm groups, as CompVis hard-codes).

    ``weights`` have original (CompVis) names, or ``diffusers.AutoencoderKL`` names: a VAE file such as
    ``diffusion_pytorch_model.safetensors`` given for a checkpoint that ships without a VAE.
    """
    if not weights:
        raise CheckpointError(f"cannot read the VAE architecture: no {VAE_PREFIX}* weights (pass a VAE file)")
    conv_in = _need(weights, "encoder.conv_in.weight", "VAE")
    base = conv_in.shape[0]
    if any(k.startswith("encoder.down_blocks.") for k in weights):  # diffusers names
        down, block, resnet = "encoder.down_blocks.", "resnets", "encoder.down_blocks.0.resnets."
        mid_attention = any(k.startswith("encoder.mid_block.attentions.0.") for k in weights)
    else:
        down, block, resnet = "encoder.down.", "block", "encoder.down.0.block."
        mid_attention = "encoder.mid.attn_1.q.weight" in weights
    levels = key_indices(weights, down)
    mult = [_ratio(_need(weights, f"{down}{n}.{block}.0.conv2.weight", "VAE").shape[0], base, "VAE")
            for n in levels]
    try:
        return AutoencoderConfig(
            in_channels=conv_in.shape[1],
            out_channels=_need(weights, "decoder.conv_out.weight", "VAE").shape[0],
            latent_channels=_need(weights, "decoder.conv_in.weight", "VAE").shape[1],
            base_channels=base,
            channel_mult=tuple(mult),
            num_res_blocks=len(key_indices(weights, resnet)),
            norm_groups=COMPVIS_NORM_GROUPS,
            mid_attention=mid_attention,
            scaling_factor=scaling_factor,
        )
    except ValueError as error:
        raise CheckpointError(f"cannot build a VAE for these weights ({error}); pass a config") from None


def text_layout(weights: Mapping[str, Tensor]) -> str:
    """``"clip"`` (SD 1.x), ``"openclip"`` (complete SD 2.x tower) or ``"exported"`` (no extras, module docstring)."""
    has_clip = any(k.startswith(CLIP_TEXT_PREFIX) for k in weights)
    has_openclip = any(k.startswith(OPENCLIP_PREFIX) for k in weights)
    if has_clip and has_openclip:
        raise CheckpointError("the text encoder weights mix CLIP (transformer.*) and OpenCLIP (model.*) keys")
    if has_clip:
        return "clip"
    if has_openclip:
        return "openclip" if any(k in weights for k in _OPENCLIP_EXTRAS) else "exported"
    raise CheckpointError(f"no text encoder weights ({TEXT_PREFIX}transformer.* or {TEXT_PREFIX}model.*)")


def infer_text_config(weights: Mapping[str, Tensor]) -> TextEncoderConfig:
    """The text-encoder config from its weights (64-channel heads; activation and padding by family)."""
    layout = text_layout(weights)
    if layout == "clip":
        prefix = CLIP_TEXT_PREFIX
        token = _need(weights, prefix + "embeddings.token_embedding.weight", "text encoder")
        positions = _need(weights, prefix + "embeddings.position_embedding.weight", "text encoder")
        layers = len(key_indices(weights, prefix + "encoder.layers."))
        hidden = _need(weights, prefix + "encoder.layers.0.mlp.fc1.weight", "text encoder").shape[0]
        projection = token.shape[1]
    else:
        token = _need(weights, "model.token_embedding.weight", "text encoder")
        positions = _need(weights, "model.positional_embedding", "text encoder")
        layers = len(key_indices(weights, "model.transformer.resblocks."))
        hidden = _need(weights, "model.transformer.resblocks.0.mlp.c_fc.weight", "text encoder").shape[0]
        projection = weights["model.text_projection"].shape[1] if "model.text_projection" in weights else token.shape[1]
    width = token.shape[1]
    family = {
        "clip": dict(kind="clip", act="quick_gelu", layer="last", pad="eot"),
        "openclip": dict(kind="openclip", act="gelu", layer="penultimate", pad="zero"),
        "exported": dict(kind="clip", act="gelu", layer="last", pad="zero"),
    }[layout]
    try:
        return TextEncoderConfig(vocab_size=token.shape[0], width=width, layers=layers,
                                 heads=max(1, width // TEXT_HEAD_CHANNELS), mlp_ratio=hidden / width,
                                 max_length=positions.shape[0], projection_dim=projection, **family)
    except ValueError as error:
        raise CheckpointError(f"cannot build a text encoder for these weights ({error}); pass a config") from None


def exported_text_config(config: TextEncoderConfig) -> TextEncoderConfig:
    """The text config an original-layout file carries: a GELU CLIP tower with penultimate output keeps
    only its used blocks (an exported tower, module docstring)."""
    if config.kind == "clip" and config.act == "gelu" and config.layer == "penultimate":
        return replace(config, layers=config.layers - 1, layer="last")
    return config
