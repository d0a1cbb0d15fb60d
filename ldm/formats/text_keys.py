"""Text-encoder interop with diffusers' ``text_encoder/`` folder (a ``transformers.CLIPTextModel``).

Keys are module-relative on our side (``transformer.text_model.*`` for ``kind="clip"``,
``model.*`` for ``kind="openclip"``; no ``cond_stage_model.`` prefix) and written
``text_model.*`` on the diffusers side, the layout of every published diffusers folder (transformers 5
saves them without ``text_model.``; both spellings are accepted on input).

* ``kind="clip"``: the same tensors under the same names: strip / add ``transformer.``.
* ``kind="openclip"``: ``attn.in_proj_weight [3W, W]`` splits into ``q_proj``/``k_proj``/``v_proj``
  (rows in that order), ``ln_1/ln_2`` -> ``layer_norm1/2``, ``mlp.c_fc/c_proj`` -> ``mlp.fc1/fc2``,
  ``positional_embedding`` -> ``position_embedding.weight``, ``ln_final`` -> ``final_layer_norm``,
  and ``text_projection [W, P]`` -> ``text_projection.weight [P, W]`` (transposed; only for a
  ``CLIPTextModelWithProjection``, see ``with_projection``). With ``layer="penultimate"`` the
  exported model gets ``layers - 1`` blocks, as diffusers' own SD2 conversion does: the last block
  never influences the context, and without it ``last_hidden_state`` *is* our context.
  ``logit_scale`` and (penultimate) the last block have no diffusers counterpart and are dropped.

A diffusers SD2 folder (CLIPTextModel, gelu, 23 layers, pad token ``"!"``) therefore loads as
``kind="clip", act="gelu", layer="last", pad="zero"`` with identical outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.models.text_encoders import TextEncoderConfig, clip_text_config_kwargs

__all__ = ["config_from_diffusers", "diffusers_config", "from_diffusers", "to_diffusers"]

_CLIP_PREFIX = "transformer."
_DIFFUSERS_PREFIX = "text_model."
_POSITION_IDS = "text_model.embeddings.position_ids"  # a constant buffer some files carry
_PROJECTION = "text_projection.weight"

# OpenCLIP block sub-module -> transformers CLIPEncoderLayer sub-module.
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def exported_num_layers(cfg: TextEncoderConfig) -> int:
    """Blocks of the diffusers model: all for ``kind="clip"``, the used ones for ``"openclip"`` (SD2), all
    again for SDXL's OpenCLIP tower (``final_norm=False``: its pooled output needs the last block)."""
    return cfg.num_layers_used if cfg.kind == "openclip" and cfg.final_norm else cfg.layers


def diffusers_config(cfg: TextEncoderConfig) -> dict[str, Any]:
    """``transformers.CLIPTextConfig`` keyword arguments for the diffusers ``text_encoder/``."""
    return clip_text_config_kwargs(cfg, num_layers=exported_num_layers(cfg))


def config_from_diffusers(d: Mapping[str, Any] | Any, *, pad: str | None = None) -> TextEncoderConfig:
    """Our config for a diffusers ``text_encoder/config.json`` (a dict or a ``CLIPTextConfig``).

    Always ``kind="clip"``, ``layer="last"``. Keys absent from the file take transformers'
    ``CLIPTextConfig`` defaults (transformers saves only non-default values). The padding is a
    tokenizer setting: pass the ``tokenizer/`` folder's (``ClipTokenizer.from_diffusers_folder``);
    without it, OpenCLIP-style ``gelu`` towers get ``"zero"`` and CLIP ``quick_gelu`` towers ``"eot"``.
    """
    from transformers import CLIPTextConfig

    hf = d if isinstance(d, CLIPTextConfig) else CLIPTextConfig(**dict(d))
    width = hf.hidden_size
    return TextEncoderConfig(
        kind="clip",
        vocab_size=hf.vocab_size,
        width=width,
        layers=hf.num_hidden_layers,
        heads=hf.num_attention_heads,
        mlp_ratio=hf.intermediate_size / width,
        max_length=hf.max_position_embeddings,
        act=hf.hidden_act,
        layer="last",
        pad=pad or ("zero" if hf.hidden_act == "gelu" else "eot"),
        projection_dim=hf.projection_dim,
        layer_norm_eps=hf.layer_norm_eps,
    )


# --------------------------------------------------------------------------------------------
# Key maps
# --------------------------------------------------------------------------------------------


def _openclip_renames(num_layers: int) -> dict[str, str]:
    """Our key -> diffusers key for every plain rename (no reshape) of ``num_layers`` blocks."""
    names = {
        "model.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "model.positional_embedding": "text_model.embeddings.position_embedding.weight",
        "model.ln_final.weight": "text_model.final_layer_norm.weight",
        "model.ln_final.bias": "text_model.final_layer_norm.bias",
    }
    for i in range(num_layers):
        for ours, theirs in _BLOCK_RENAMES.items():
            for param in ("weight", "bias"):
                ours_key = f"model.transformer.resblocks.{i}.{ours}.{param}"
                names[ours_key] = f"text_model.encoder.layers.{i}.{theirs}.{param}"
    return names


def _in_proj_keys(i: int, param: str) -> tuple[str, list[str]]:
    """Our fused attention input projection of block ``i`` and its q, k, v diffusers keys."""
    theirs = [f"text_model.encoder.layers.{i}.self_attn.{name}_proj.{param}" for name in ("q", "k", "v")]
    return f"model.transformer.resblocks.{i}.attn.in_proj_{param}", theirs


def _raise_unknown(keys: list[str], layout: str) -> None:
    if keys:
        shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        raise ValueError(f"{len(keys)} key(s) not in the {layout} text-encoder layout of this config: {shown}")


def to_diffusers(
    state_dict: Mapping[str, Tensor], cfg: TextEncoderConfig, *, with_projection: bool = False
) -> dict[str, Tensor]:
    """Our text-encoder state dict -> diffusers ``text_encoder/`` (``text_model.*``) keys.

    ``with_projection`` adds ``text_projection.weight`` (OpenCLIP only), for a
    ``CLIPTextModelWithProjection``. Keys that belong to no parameter of ``cfg`` raise ValueError.
    """
    if cfg.kind == "clip":
        _raise_unknown([k for k in state_dict if not k.startswith(_CLIP_PREFIX)], "SD1")
        converted = {k[len(_CLIP_PREFIX) :]: v for k, v in state_dict.items()}
        converted.pop(_POSITION_IDS, None)
        return converted

    num_layers = exported_num_layers(cfg)
    renames = _openclip_renames(num_layers)
    in_proj = dict(_in_proj_keys(i, p) for i in range(num_layers) for p in ("weight", "bias"))
    dropped = {"model.logit_scale", "model.text_projection"}
    dropped |= {k for k in state_dict if _block_index(k) is not None and _block_index(k) >= num_layers}
    _raise_unknown([k for k in state_dict if k not in renames and k not in in_proj and k not in dropped], "SD2")

    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in renames:
            converted[renames[key]] = value
        elif key in in_proj:
            # in_proj rows are [W_q; W_k; W_v]; clones so no two outputs share storage (safetensors)
            converted.update(zip(in_proj[key], (part.clone() for part in value.chunk(3, dim=0))))
    if with_projection and "model.text_projection" in state_dict:
        # x @ P == Linear(x) with weight P^T
        converted[_PROJECTION] = state_dict["model.text_projection"].t().contiguous()
    return converted


def from_diffusers(state_dict: Mapping[str, Tensor], cfg: TextEncoderConfig) -> dict[str, Tensor]:
    """Diffusers ``text_encoder/`` keys (with or without ``text_model.``) -> our keys for ``cfg``.

    For ``kind="openclip"`` the result lacks the parameters diffusers does not store (the unused
    last block of a penultimate-layer model, ``logit_scale``, and ``text_projection`` unless
    ``text_projection.weight`` is given); loading it needs ``strict=False``. Unknown keys raise
    ValueError; missing ones are left to ``load_state_dict`` (a q/k/v triple missing a part
    raises KeyError).
    """
    state_dict = {_with_text_model_prefix(k): v for k, v in state_dict.items()}
    state_dict.pop(_POSITION_IDS, None)
    if cfg.kind == "clip":
        _raise_unknown([k for k in state_dict if not k.startswith(_DIFFUSERS_PREFIX)], "diffusers CLIPTextModel")
        return {_CLIP_PREFIX + k: v for k, v in state_dict.items()}

    renames = {theirs: ours for ours, theirs in _openclip_renames(cfg.layers).items()}
    in_proj = dict(_in_proj_keys(i, p) for i in range(cfg.layers) for p in ("weight", "bias"))
    split_keys = {key for parts in in_proj.values() for key in parts}
    _raise_unknown([k for k in state_dict if k not in renames and k not in split_keys and k != _PROJECTION],
                   "diffusers CLIPTextModel")

    converted = {renames[k]: v for k, v in state_dict.items() if k in renames}
    for ours, parts in in_proj.items():
        present = [part in state_dict for part in parts]
        if all(present):
            converted[ours] = torch.cat([state_dict[part] for part in parts], dim=0)
        elif any(present):
            raise KeyError(parts[present.index(False)])
    if _PROJECTION in state_dict:
        converted["model.text_projection"] = state_dict[_PROJECTION].t().contiguous()
    return converted


def _with_text_model_prefix(key: str) -> str:
    """transformers 5 saves CLIPTextModel keys without ``text_model.``; put it back."""
    if key.startswith(_DIFFUSERS_PREFIX) or key == _PROJECTION:
        return key
    return _DIFFUSERS_PREFIX + key


def _block_index(key: str) -> int | None:
    """``i`` of ``model.transformer.resblocks.{i}.*``, else None."""
    prefix = "model.transformer.resblocks."
    if not key.startswith(prefix):
        return None
    index = key[len(prefix) :].split(".", 1)[0]
    return int(index) if index.isdigit() else None
