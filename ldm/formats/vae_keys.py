"""Key maps between our VAE (CompVis/SD checkpoint names) and ``diffusers.AutoencoderKL``.

Keys are module-relative on both sides (``encoder.conv_in.weight``; no ``first_stage_model.`` /
``vae.`` prefix). The maps are generated from an :class:`~autoencoder.AutoencoderConfig`, level by level
and block by block. Differences between the layouts:

* ``down.{i}.block.{j}`` <-> ``down_blocks.{i}.resnets.{j}``, ``nin_shortcut`` <-> ``conv_shortcut``,
  ``downsample`` <-> ``downsamplers.0``; ``mid.block_1/2`` <-> ``mid_block.resnets.0/1``;
  ``norm_out`` <-> ``conv_norm_out``.
* the decoder's ``up.{i}`` is indexed by resolution level (0 = full size) while diffusers'
  ``up_blocks.{k}`` is indexed by execution order: ``k = num_levels - 1 - i``.
* mid attention ``attn_1.{norm,q,k,v,proj_out}`` (1x1 convs, weights ``[C, C, 1, 1]``) <->
  ``attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`` (linears, weights ``[C, C]``). diffusers before
  0.14 named them ``query/key/value/proj_attn``; those are accepted on input, never produced.

``to_diffusers`` and ``from_diffusers`` are exact inverses (reshapes are views, values untouched).
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from autoencoder import AutoencoderConfig

__all__ = [
    "config_from_diffusers",
    "diffusers_config",
    "from_diffusers",
    "key_map",
    "to_diffusers",
]

_RESNET_PARAMS = ("norm1", "conv1", "norm2", "conv2")
# our attention sub-module -> current diffusers name; the 1x1-conv ones become linears.
_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTENTION_PROJECTIONS = ("q", "k", "v", "proj_out")
# diffusers < 0.14 attention names -> current ones.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


def diffusers_config(cfg: AutoencoderConfig) -> dict[str, Any]:
    """Keyword arguments for ``diffusers.AutoencoderKL(**kwargs)`` (also the body of its config.json).

    ``_class_name`` is left out so the dict can be splatted into the constructor.
    """
    num_levels = len(cfg.channel_mult)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * num_levels,
        "up_block_types": ["UpDecoderBlock2D"] * num_levels,
        "block_out_channels": list(cfg.level_channels),
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,
        "scaling_factor": cfg.scaling_factor,
        "mid_block_add_attention": cfg.mid_attention,
    }


# diffusers config keys that do not change the network or that must hold the value given here.
_INFORMATIONAL_KEYS = {"sample_size", "force_upcast"}
_REQUIRED_VALUES = {
    "act_fn": "silu",
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}


def config_from_diffusers(d: Mapping[str, Any]) -> AutoencoderConfig:
    """Read a diffusers ``AutoencoderKL`` config dict (config.json contents).

    Keys starting with ``_`` and ``sample_size``/``force_upcast`` are ignored.

    Raises:
        ValueError: naming an unknown key, or a setting our model does not implement (other block types,
            activations, shift factors or per-channel latent statistics, missing quant convs, or
            ``block_out_channels`` that are not multiples of the first).
    """
    known = {
        "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
        "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor", "mid_block_add_attention",
    } | _INFORMATIONAL_KEYS | set(_REQUIRED_VALUES)  # fmt: skip
    unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"unknown diffusers AutoencoderKL config key(s): {', '.join(unknown)}")
    for key, required in _REQUIRED_VALUES.items():
        if key in d and d[key] != required:
            raise ValueError(f"unsupported diffusers AutoencoderKL setting {key}={d[key]!r} (need {required!r})")

    channels = [int(c) for c in d.get("block_out_channels", (64,))]
    base = channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first level's {base}")
    for key, block_type in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(d.get(key, [block_type]))
        if types != [block_type] * len(channels):
            raise ValueError(f"unsupported {key} {types}: need {len(channels)} x {block_type}")

    return AutoencoderConfig(
        in_channels=int(d.get("in_channels", 3)),
        out_channels=int(d.get("out_channels", 3)),
        latent_channels=int(d.get("latent_channels", 4)),
        base_channels=base,
        channel_mult=tuple(c // base for c in channels),
        num_res_blocks=int(d.get("layers_per_block", 1)),
        norm_groups=int(d.get("norm_num_groups", 32)),
        mid_attention=bool(d.get("mid_block_add_attention", True)),
        scaling_factor=float(d.get("scaling_factor", 0.18215)),
    )


# ----------------------------------------------------------------------------------------------------------
# Module-name maps (generated from the config)
# ----------------------------------------------------------------------------------------------------------


def _resnet_modules(ours: str, theirs: str, in_channels: int, out_channels: int) -> list[tuple[str, str]]:
    pairs = [(f"{ours}.{name}", f"{theirs}.{name}") for name in _RESNET_PARAMS]
    if in_channels != out_channels:
        pairs.append((f"{ours}.nin_shortcut", f"{theirs}.conv_shortcut"))
    return pairs


def _mid_modules(side: str, channels: int, attention: bool) -> list[tuple[str, str]]:
    pairs = _resnet_modules(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", channels, channels)
    pairs += _resnet_modules(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", channels, channels)
    if attention:
        pairs += [
            (f"{side}.mid.attn_1.{ours}", f"{side}.mid_block.attentions.0.{theirs}")
            for ours, theirs in _ATTENTION_NAMES.items()
        ]
    return pairs


def _encoder_modules(cfg: AutoencoderConfig) -> list[tuple[str, str]]:
    channels = cfg.level_channels
    pairs = [("encoder.conv_in", "encoder.conv_in")]
    block_in = cfg.base_channels
    for i, block_out in enumerate(channels):
        for j in range(cfg.num_res_blocks):
            ours, theirs = f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}"
            pairs += _resnet_modules(ours, theirs, block_in, block_out)
            block_in = block_out
        if i != len(channels) - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
    pairs += _mid_modules("encoder", block_in, cfg.mid_attention)
    pairs += [("encoder.norm_out", "encoder.conv_norm_out"), ("encoder.conv_out", "encoder.conv_out")]
    return pairs


def _decoder_modules(cfg: AutoencoderConfig) -> list[tuple[str, str]]:
    channels = cfg.level_channels
    num_levels = len(channels)
    block_in = channels[-1]
    pairs = [("decoder.conv_in", "decoder.conv_in")]
    pairs += _mid_modules("decoder", block_in, cfg.mid_attention)
    for i in reversed(range(num_levels)):
        k = num_levels - 1 - i  # diffusers counts up blocks in execution order, CompVis by resolution level
        block_out = channels[i]
        for j in range(cfg.num_res_blocks + 1):
            ours, theirs = f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}"
            pairs += _resnet_modules(ours, theirs, block_in, block_out)
            block_in = block_out
        if i != 0:
            pairs.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv"))
    pairs += [("decoder.norm_out", "decoder.conv_norm_out"), ("decoder.conv_out", "decoder.conv_out")]
    return pairs


def key_map(cfg: AutoencoderConfig) -> dict[str, str]:
    """Every parameter key of our ``AutoencoderKL(cfg)`` -> its diffusers key (weights and biases)."""
    modules = _encoder_modules(cfg) + _decoder_modules(cfg)
    modules += [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    return {f"{ours}.{param}": f"{theirs}.{param}" for ours, theirs in modules for param in ("weight", "bias")}


def _is_attention_projection_weight(our_key: str) -> bool:
    """True for ``*.attn_1.{q,k,v,proj_out}.weight``: 1x1 conv here, linear in diffusers."""
    module, _, param = our_key.rpartition(".")
    return param == "weight" and ".attn_1." in module and module.rsplit(".", 1)[-1] in _ATTENTION_PROJECTIONS


def _modernise_attention_key(key: str) -> str:
    """``...attentions.0.query.weight`` (diffusers < 0.14) -> ``...attentions.0.to_q.weight``."""
    head, marker, tail = key.partition(".attentions.0.")
    if not marker:
        return key
    name, _, param = tail.rpartition(".")
    return f"{head}{marker}{_LEGACY_ATTENTION_NAMES.get(name, name)}.{param}"


def _raise_unknown(keys: list[str], layout: str) -> None:
    if keys:
        shown = ", ".join(sorted(keys)[:10])
        more = f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""
        raise ValueError(f"{len(keys)} key(s) not in the {layout} VAE layout of this config: {shown}{more}")


# ----------------------------------------------------------------------------------------------------------
# State-dict conversion
# ----------------------------------------------------------------------------------------------------------


def to_diffusers(state_dict: Mapping[str, Tensor], cfg: AutoencoderConfig) -> dict[str, Tensor]:
    """Our (CompVis-named) VAE state dict -> diffusers ``AutoencoderKL`` state dict.

    Attention projection weights ``[C, C, 1, 1]`` become ``[C, C]`` (views, no copies).

    Raises:
        ValueError: listing keys that ``AutoencoderKL(cfg)`` does not have.
    """
    names = key_map(cfg)
    _raise_unknown([k for k in state_dict if k not in names], "CompVis")
    converted = {}
    for key, tensor in state_dict.items():
        if _is_attention_projection_weight(key):
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        converted[names[key]] = tensor
    return converted


def from_diffusers(state_dict: Mapping[str, Tensor], cfg: AutoencoderConfig) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` state dict (current or pre-0.14 attention names) -> our state dict.

    Attention projection weights ``[C, C]`` become 1x1 conv weights ``[C, C, 1, 1]`` (views).

    Raises:
        ValueError: listing keys that the diffusers model for ``cfg`` does not have.
    """
    ours_by_theirs = {theirs: ours for ours, theirs in key_map(cfg).items()}
    keys = {key: _modernise_attention_key(key) for key in state_dict}
    _raise_unknown([k for k, modern in keys.items() if modern not in ours_by_theirs], "diffusers")
    converted = {}
    for key, tensor in state_dict.items():
        ours = ours_by_theirs[keys[key]]
        if _is_attention_projection_weight(ours) and tensor.dim() == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        converted[ours] = tensor
    return converted
