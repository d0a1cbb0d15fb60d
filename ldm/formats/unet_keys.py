"""U-Net interop with ``diffusers.UNet2DConditionModel``: config translation and key maps.

Our parameter names are the CompVis ones (``input_blocks.4.1.proj_in.weight``); diffusers names
the same tensors by block type (``down_blocks.1.attentions.0.proj_in.weight``). The map is
generated from a :class:`~ldm.models.unet.UNetConfig` by walking levels and blocks in the order both
models build them. No tensor needs a reshape: both sides use 1x1 convs for ``proj_in``/
``proj_out`` when ``use_linear_in_transformer`` is False and Linear layers when it is True.

SDXL's vector conditioning: our ``label_emb.0.0``/``label_emb.0.2`` (CompVis ``num_classes: sequential``)
are diffusers' ``add_embedding.linear_1``/``linear_2`` (``addition_embed_type: text_time``); diffusers
Fourier-embeds the micro-conditioning inside the U-Net (``add_time_proj``, no weights), we do it in
:mod:`ldm.models.sdxl_conditioning` before the U-Net.

Naming trap: diffusers' ``attention_head_dim`` is the *number of heads* (a historical misnomer,
diffusers issue #2011): an int for SD1 (8), a per-level list for SD2 (``[5, 10, 20, 20]`` for
64-channel heads on 320/640/1280/1280 channels).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ldm.models.sdxl_conditioning import MICRO_CONDITIONING_FEATURES
from ldm.models.unet import UNetConfig

logger = logging.getLogger(__name__)

# ResBlock sub-module names: ours -> diffusers ResnetBlock2D.
_RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _heads_per_level(cfg: UNetConfig) -> list[int]:
    # max(1, .): levels without attention may be narrower than one head; diffusers ignores them.
    return [max(1, cfg.heads_for(cfg.level_channels(level))[0]) for level in range(cfg.num_levels)]


def diffusers_config(cfg: UNetConfig, *, sample_size: int | None = 64) -> dict[str, Any]:
    """Keyword arguments for ``diffusers.UNet2DConditionModel`` building the same network.

    ``sample_size`` (latent side the model was trained at: 64 for SD1/SD2-base, 96 for SD2-v)
    is not part of :class:`UNetConfig`; it only serves diffusers pipelines as a default size.
    """
    down = tuple(
        "CrossAttnDownBlock2D" if cfg.has_attention(level) else "DownBlock2D" for level in range(cfg.num_levels)
    )
    up = tuple(
        "CrossAttnUpBlock2D" if cfg.has_attention(level) else "UpBlock2D"
        for level in reversed(range(cfg.num_levels))
    )
    heads = _heads_per_level(cfg)
    return {
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": True,  # cos half first, as CompVis
        "freq_shift": 0,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": up,
        "only_cross_attention": list(cfg.disable_self_attentions) if cfg.disable_self_attentions else False,
        "num_class_embeds": cfg.num_classes,
        **_addition_embedding(cfg),
        "block_out_channels": tuple(cfg.level_channels(level) for level in range(cfg.num_levels)),
        "layers_per_block": cfg.num_res_blocks,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": (list(cfg.transformer_depth) if isinstance(cfg.transformer_depth, tuple)
                                         else cfg.transformer_depth),
        # The trap: this is the number of heads. An int when all levels agree (SD1), else a list.
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else tuple(heads),
        "use_linear_projection": cfg.use_linear_in_transformer,
        "upcast_attention": cfg.upcast_attention,
    }


def _addition_embedding(cfg: UNetConfig) -> dict[str, Any]:
    """diffusers' options for SDXL's vector conditioning (none when the config has no ``adm_in_channels``)."""
    if cfg.adm_in_channels is None:
        return {}
    return {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": MICRO_CONDITIONING_FEATURES,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels,
    }


# diffusers options whose value must be the neutral one for our U-Net (None also accepted as
# "off" for booleans and options whose neutral value is None).
_DIFFUSERS_REQUIRED: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
_DIFFUSERS_READ = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "norm_num_groups", "cross_attention_dim", "transformer_layers_per_block",
    "attention_head_dim", "num_attention_heads", "use_linear_projection", "upcast_attention",
    "only_cross_attention", "num_class_embeds", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
}
# UNet2DConditionModel defaults for keys a config.json may omit.
_DIFFUSERS_DEFAULT_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_DIFFUSERS_DEFAULT_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
_DIFFUSERS_IGNORED = {"sample_size", "addition_embed_type_num_heads"}


def _adm_in_channels(d: Mapping[str, Any]) -> int | None:
    """Our ``adm_in_channels`` from diffusers' ``addition_embed_type`` options (None: no vector)."""
    kind = d.get("addition_embed_type")
    if kind is None:
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if d.get(key) is not None:
                raise ValueError(f"unsupported diffusers U-Net option {key}={d[key]!r} without addition_embed_type")
        return None
    if kind != "text_time":
        raise ValueError(f"unsupported diffusers U-Net option addition_embed_type={kind!r} (supported: 'text_time')")
    if d.get("addition_time_embed_dim") != MICRO_CONDITIONING_FEATURES:
        raise ValueError(f"unsupported diffusers U-Net option addition_time_embed_dim="
                         f"{d.get('addition_time_embed_dim')!r} (supported: {MICRO_CONDITIONING_FEATURES})")
    if not isinstance(d.get("projection_class_embeddings_input_dim"), int):
        raise ValueError("addition_embed_type 'text_time' needs an integer projection_class_embeddings_input_dim")
    return d["projection_class_embeddings_input_dim"]


def _depths(value: Any) -> int | tuple[int, ...]:
    """diffusers' ``transformer_layers_per_block`` (one int or one per level) -> ours."""
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)


def _single(value: Any, name: str) -> Any:
    """An int/bool given once or repeated per level -> the single value."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"per-level {name}={list(value)} is not supported")
        return value[0]
    return value


def _check_required(d: Mapping[str, Any]) -> None:
    for key, required in _DIFFUSERS_REQUIRED.items():
        if key not in d:
            continue
        value = d[key]
        if isinstance(value, (list, tuple)) and len(set(value)) == 1:
            value = value[0]
        neutral = value == required or (value is None and required in (None, False))
        neutral = neutral or (value is False and required is None)  # e.g. mid_block_only_cross_attention
        if not neutral:
            raise ValueError(f"unsupported diffusers U-Net option {key}={d[key]!r} (supported: {required!r})")


def _attention_levels(d: Mapping[str, Any]) -> list[bool]:
    down = list(d.get("down_block_types", _DIFFUSERS_DEFAULT_DOWN))
    up = list(d.get("up_block_types", _DIFFUSERS_DEFAULT_UP))
    allowed = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
    strange = sorted(set(down + up) - allowed)
    if strange:
        raise ValueError(f"unsupported diffusers block type(s): {', '.join(strange)}")
    with_attention = [kind == "CrossAttnDownBlock2D" for kind in down]
    if [kind == "CrossAttnUpBlock2D" for kind in reversed(up)] != with_attention:
        raise ValueError(f"up_block_types {up} do not mirror down_block_types {down}")
    return with_attention


def _head_settings(d: Mapping[str, Any], channels: list[int], levels: list[int]) -> dict[str, int]:
    """``num_heads``/``num_head_channels`` from diffusers' per-level head counts."""
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    used = levels + [len(channels) - 1]  # levels with cross-attention, and the middle block
    head_counts = {heads[level] for level in used}
    if len(head_counts) == 1:
        return {"num_heads": head_counts.pop(), "num_head_channels": -1}
    head_dims = {channels[level] // heads[level] for level in used}
    if len(head_dims) == 1:
        return {"num_heads": -1, "num_head_channels": head_dims.pop()}
    raise ValueError(f"heads {heads} on channels {channels} give neither a fixed head count nor head size")


def config_from_diffusers(d: Mapping[str, Any]) -> UNetConfig:
    """:class:`UNetConfig` from a ``UNet2DConditionModel`` config (``config.json`` dict).

    Options without effect here (``sample_size``, keys starting with ``_``) are ignored, unknown
    keys are logged and ignored, and non-neutral values of features this U-Net lacks raise
    ``ValueError``.
    """
    unknown = sorted(
        k for k in d
        if not k.startswith("_") and k not in _DIFFUSERS_READ | set(_DIFFUSERS_REQUIRED) | _DIFFUSERS_IGNORED
    )
    if unknown:
        logger.warning("ignoring unknown diffusers U-Net option(s): %s", ", ".join(unknown))
    _check_required(d)

    channels = [int(c) for c in d.get("block_out_channels", (320, 640, 1280, 1280))]
    base = channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first")
    with_attention = _attention_levels(d)
    if len(with_attention) != len(channels):
        raise ValueError("down_block_types and block_out_channels differ in length")
    attention_levels = [level for level, has in enumerate(with_attention) if has]

    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        model_channels=base,
        channel_mult=tuple(c // base for c in channels),
        num_res_blocks=_single(d.get("layers_per_block", 2), "layers_per_block"),
        attention_resolutions=tuple(2**level for level in reversed(attention_levels)),
        context_dim=_single(d.get("cross_attention_dim", 1280), "cross_attention_dim"),
        transformer_depth=_depths(d.get("transformer_layers_per_block", 1)),
        use_linear_in_transformer=bool(d.get("use_linear_projection", False)),
        upcast_attention=bool(d.get("upcast_attention", False)),
        norm_groups=d.get("norm_num_groups", 32),
        num_classes=d.get("num_class_embeds"),
        adm_in_channels=_adm_in_channels(d),
        disable_self_attentions=_only_cross_attention(d.get("only_cross_attention", False), len(channels)),
        **_head_settings(d, channels, attention_levels),
    )


def _only_cross_attention(value: bool | list[bool] | None, levels: int) -> tuple[bool, ...] | None:
    """diffusers' ``only_cross_attention`` (one bool or one per level) -> our per-level flags (None: all off)."""
    flags = tuple(bool(v) for v in value) if isinstance(value, (list, tuple)) else (bool(value),) * levels
    if len(flags) != levels:
        raise ValueError(f"only_cross_attention {list(flags)} needs one flag per level ({levels})")
    return flags if any(flags) else None


# --------------------------------------------------------------------------------------------
# State-dict keys
# --------------------------------------------------------------------------------------------


def _resnet(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.{a}": f"{theirs}.{b}" for a, b in _RESNET_PARTS.items()}


def module_map(cfg: UNetConfig) -> dict[str, str]:
    """Module-path prefixes, ours -> diffusers, in build order.

    Attention modules map as a whole (their insides carry the same names on both sides);
    ResBlocks map per sub-module.
    """
    pairs: dict[str, str] = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
    }
    if cfg.num_classes is not None:
        pairs["label_emb"] = "class_embedding"
    if cfg.adm_in_channels is not None:
        pairs["label_emb.0.0"] = "add_embedding.linear_1"
        pairs["label_emb.0.2"] = "add_embedding.linear_2"
    index = 1
    for level in range(cfg.num_levels):
        for j in range(cfg.num_res_blocks):
            pairs |= _resnet(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}")
            if cfg.has_attention(level):
                pairs[f"input_blocks.{index}.1"] = f"down_blocks.{level}.attentions.{j}"
            index += 1
        if level != cfg.num_levels - 1:
            pairs[f"input_blocks.{index}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            index += 1

    pairs |= _resnet("middle_block.0", "mid_block.resnets.0")
    pairs["middle_block.1"] = "mid_block.attentions.0"
    pairs |= _resnet("middle_block.2", "mid_block.resnets.1")

    index = 0
    for up, level in enumerate(reversed(range(cfg.num_levels))):
        for j in range(cfg.num_res_blocks + 1):
            pairs |= _resnet(f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{j}")
            position = 1
            if cfg.has_attention(level):
                pairs[f"output_blocks.{index}.1"] = f"up_blocks.{up}.attentions.{j}"
                position = 2
            if level != 0 and j == cfg.num_res_blocks:
                pairs[f"output_blocks.{index}.{position}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
            index += 1

    pairs["out.0"] = "conv_norm_out"
    pairs["out.2"] = "conv_out"
    return pairs


def _rename(key: str, prefixes: Mapping[str, str], direction: str) -> str:
    """Replace the longest mapped module prefix of ``key``."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in prefixes:
            return ".".join([prefixes[prefix], *parts[cut:]])
    raise ValueError(f"{direction}: key {key!r} belongs to no U-Net module of this config")


def _convert(state_dict: Mapping[str, Tensor], prefixes: Mapping[str, str], direction: str) -> dict[str, Tensor]:
    return {_rename(key, prefixes, direction): value for key, value in state_dict.items()}


def to_diffusers(state_dict: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Our (CompVis) U-Net keys -> ``UNet2DConditionModel`` keys; tensors are shared, not copied.

    Keys are module-relative (no ``model.diffusion_model.`` prefix). A key outside every
    module of ``cfg`` raises ``ValueError``; missing keys are left to ``load_state_dict``.
    """
    return _convert(state_dict, module_map(cfg), "to_diffusers")


def from_diffusers(state_dict: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """``UNet2DConditionModel`` keys -> our (CompVis) keys; exact inverse of :func:`to_diffusers`."""
    inverse = {theirs: ours for ours, theirs in module_map(cfg).items()}
    return _convert(state_dict, inverse, "from_diffusers")


__all__ = ["diffusers_config", "config_from_diffusers", "module_map", "to_diffusers", "from_diffusers"]
