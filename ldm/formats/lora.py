"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through ``peft``.

A LoRA adapter replaces a frozen weight ``W [out, in]`` of a Linear (or Conv2d) layer by

    W' = W + scale * (alpha / rank) * up @ down          (Hu et al. 2021, eq. 3, with the alpha/r scaling)

with ``down [rank, in]`` (``lora_A`` in peft) and ``up [out, rank]`` (``lora_B``, zero at the start of
training so the adapted model starts equal to the base model). ``scale`` is the user's strength knob at
inference (``txt2img.py --lora FILE:SCALE``).

Training::

    add_lora(pipe.unet, rank=8, alpha=8)                         # U-Net to_q/to_k/to_v/to_out.0
    add_lora(pipe.text_encoder, rank=8, targets=TEXT_ENCODER_TARGETS)   # optional (CLIP, SDXL's two towers)
    optimizer = AdamW(lora_parameters(pipe.unet), ...)
    save_lora("my.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder)

Inference::

    load_lora(pipe, "style.safetensors", scale=0.8)
    load_lora(pipe, "subject.safetensors", scale=1.0)             # adapters add up
    merge_lora(pipe)                                             # optional: fold into the weights

File format (kohya-ss ``sd-scripts`` layout, which A1111, ComfyUI and diffusers'
``load_lora_weights`` all read). One entry per adapted layer, ``NAME`` being the layer's
module path in the *diffusers* layout with ``.`` replaced by ``_``:

=======================================  ========================================================
key                                      tensor
=======================================  ========================================================
``lora_unet_NAME.lora_down.weight``      ``down``: ``[rank, in]`` (Conv2d: ``[rank, in, kh, kw]``)
``lora_unet_NAME.lora_up.weight``        ``up``: ``[out, rank]`` (Conv2d: ``[out, rank, 1, 1]``)
``lora_unet_NAME.alpha``                 scalar ``alpha`` (the update is scaled by ``alpha / rank``)
``lora_te_NAME.*``                       the same for the CLIP text encoder
                                         (``NAME`` = ``text_model_encoder_layers_0_self_attn_q_proj``)
=======================================  ========================================================

e.g. our U-Net layer ``input_blocks.1.1.transformer_blocks.0.attn1.to_q`` is saved as
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``. The safetensors
metadata carries ``ss_network_dim`` (rank), ``ss_network_alpha`` and ``ldm_lora_format``.

:func:`load_lora` also reads kohya files whose U-Net names use the original CompVis layout
(``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``) and diffusers/peft files
(``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``; no alpha
stored means ``alpha = rank``).

SDXL (kohya ``sdxl_train_network.py`` files, and what diffusers' ``StableDiffusionXLPipeline.save_lora_weights``
writes): ``lora_unet_*`` in the original SGM layout or ``unet.*`` in the diffusers layout, ``lora_te1_*`` /
``text_encoder.*`` for CLIP ViT-L (``embedders.0``), ``lora_te2_*`` / ``text_encoder_2.*`` for OpenCLIP bigG (the
refiner's only tower), named as transformers names its layers. bigG's attention here is one fused
``in_proj_weight [3W, W]`` (rows q, k, v), so the file's q/k/v adapters of a block become one adapter on that
parameter (peft's ``target_parameters``): ``down = [down_q; down_k; down_v]`` and a block-diagonal ``up`` with
each part's ``alpha / rank`` folded in, which adds exactly the three updates to their rows. diffusers/peft files
carry no alpha tensors; the ``lora_adapter_metadata`` JSON diffusers stores (``unet.lora_alpha``,
``unet.alpha_pattern``, ...) gives it, else ``alpha = rank``. Older diffusers suffixes (``.lora.down.weight``,
``.lora_linear_layer.up.weight``) are read too.

While adapters are attached, peft wraps each adapted layer, so the module's own state-dict
names change (``to_q.weight`` -> ``to_q.base_layer.weight``); :func:`merge_lora` or
:func:`unload_lora` restore the plain layers and names.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from ldm.errors import CheckpointError, ConfigError
from ldm.formats.checkpoints import load_state_dict, safetensors_metadata, save_safetensors_atomic
from ldm.formats.text_keys import _in_proj_keys, _openclip_renames  # OpenCLIP <-> transformers names, one place
from ldm.formats.unet_keys import module_map
from ldm.models.text_encoders import CLIPTextEncoder, OpenCLIPTextEncoder, SDXLTextEncoder
from ldm.models.unet import UNetModel

logger = logging.getLogger(__name__)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

UNET_KOHYA_PREFIX = "lora_unet_"
TEXT_KOHYA_PREFIX = "lora_te_"
SDXL_TEXT_KOHYA_PREFIXES = ("lora_te1_", "lora_te2_")  # SDXL: CLIP ViT-L, OpenCLIP bigG (transformers names)
SDXL_TEXT_DIFFUSERS_PREFIXES = ("text_encoder.", "text_encoder_2.")  # the same towers in diffusers/peft files
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' JSON of the peft config (lora_alpha, alpha_pattern)
FORMAT_NAME = "kohya-lora"
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up",
                  ".lora.down.weight": "down", ".lora.up.weight": "up",  # diffusers before peft
                  ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up"}


class LoraTarget(NamedTuple):
    """Where a layer named in a LoRA file goes in our model."""

    component: str  # "unet" or "text_encoder"
    path: str  # our module path (unwrapped), or a fused parameter's path (``...attn.in_proj_weight``)
    block: int | None = None  # the row block of a fused q/k/v weight it adapts: 0 = q, 1 = k, 2 = v


# --------------------------------------------------------------------------------------------
# Training: attach adapters, collect their parameters
# --------------------------------------------------------------------------------------------


def add_lora(
    module: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] = UNET_TARGETS,
    *,
    adapter: str = "default",
    dropout: float = 0.0,
) -> list[str]:
    """Attach a trainable LoRA adapter to every Linear/Conv2d of ``module`` named by ``targets``.

    ``up`` starts at zero (peft's default init), so the adapted module computes exactly what the
    base module does until the adapter is trained. All base parameters of ``module`` are frozen
    (``requires_grad=False``); the adapter's are trainable.

    Args:
        module: the U-Net (default targets :data:`UNET_TARGETS`) or the CLIP / SDXL text encoder
            (pass ``targets=TEXT_ENCODER_TARGETS``). SDXL's bigG tower gets one rank-``rank`` adapter on each
            fused q/k/v weight (the three share its down projection; no dropout there) besides ``out_proj``.
        rank: ``r``, the inner dimension of ``up @ down``.
        alpha: scaling numerator; the update is scaled by ``alpha / rank`` (default ``alpha = rank``).
        targets: module-name suffixes (``"to_out.0"`` matches ``...attn1.to_out.0``).
        adapter: adapter name (several adapters may coexist).
        dropout: LoRA dropout on the adapter's input during training.
    Returns:
        the module paths that received an adapter.
    Raises:
        ConfigError: bad rank, or no layer matches ``targets``.
    """
    if rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
    _refuse_fused_text_encoder(module)
    names = [name for name, _ in _adaptable_layers(module) if _matches(name, targets)]
    fused = _fused_targets(module, targets)
    if fused and dropout:
        raise ConfigError("LoRA dropout is not available on SDXL's bigG text encoder (peft cannot apply it to its "
                          "fused q/k/v weight); set lora.dropout: 0")
    names += fused
    if not names:
        raise ConfigError(f"no layer of {type(module).__name__} matches the LoRA targets {tuple(targets)}")
    config = _lora_config(module, names, {name: (rank, float(rank if alpha is None else alpha)) for name in names},
                          dropout)
    _inject(module, config, adapter)
    return names


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters of ``module`` (for the optimizer), in a fixed order."""
    return [p for name, p in module.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def lora_state_dict(module: nn.Module, *, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter ``adapter`` of ``module`` as kohya-format tensors (see the module docstring).

    Returns ``{"lora_unet_NAME.lora_down.weight": down, "...lora_up.weight": up, "...alpha": alpha}``
    for a U-Net, ``lora_te_`` names for the CLIP text encoder, ``lora_te1_`` / ``lora_te2_`` for SDXL's (an
    adapter on bigG's fused q/k/v weight is written as its q, k and v entries: the same down, the up's row
    blocks). Tensors are detached copies.
    """
    names = _file_names(module)
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in _lora_layers(module):
        if adapter not in layer.lora_A:
            continue
        down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        for key, block in names[_unwrapped_path(path, layer)]:
            tensors[f"{key}.lora_down.weight"] = down.detach().clone()
            tensors[f"{key}.lora_up.weight"] = (up if block is None else up.chunk(3, dim=0)[block]).detach().clone()
            tensors[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[adapter]), dtype=down.dtype)
    return tensors


def save_lora(
    path: str | Path,
    *,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    adapter: str = "default",
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write the adapters of ``unet`` and/or ``text_encoder`` to one small safetensors file, atomically.

    Args:
        metadata: extra string metadata (e.g. the base model, the training prompt); rank and
            alpha are added as ``ss_network_dim`` / ``ss_network_alpha``.
        dtype: storage precision (default: the adapters' own), e.g. ``torch.float16``.
    Raises:
        ConfigError: neither module carries adapter ``adapter``.
    """
    tensors: dict[str, torch.Tensor] = {}
    for module in (unet, text_encoder):
        if module is not None:
            tensors.update(lora_state_dict(module, adapter=adapter))
    if not tensors:
        raise ConfigError(f"nothing to save: no LoRA adapter {adapter!r} on the given modules")
    if dtype is not None:
        tensors = {k: t.to(dtype) for k, t in tensors.items()}
    ranks = {int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight")}
    alphas = {float(t) for k, t in tensors.items() if k.endswith(".alpha")}
    info = {
        "ldm_lora_format": FORMAT_NAME,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "mixed",
        "ss_network_alpha": _format_number(alphas.pop()) if len(alphas) == 1 else "mixed",
        "ss_text_encoder_trained": str(any(k.startswith((TEXT_KOHYA_PREFIX, *SDXL_TEXT_KOHYA_PREFIXES))
                                           for k in tensors)),
    }
    info.update(metadata or {})
    save_safetensors_atomic(tensors, path, metadata=info)
    logger.info("saved LoRA (%d layers) to %s", sum(k.endswith(".alpha") for k in tensors), path)


# --------------------------------------------------------------------------------------------
# Inference: load (several, each with a scale), merge, unload
# --------------------------------------------------------------------------------------------


def load_lora(pipe, path: str | Path, scale: float = 1.0, *, adapter: str | None = None) -> str:
    """Attach the LoRA in ``path`` to ``pipe.unet`` (and ``pipe.text_encoder``) with strength ``scale``.

    Several files may be loaded; every loaded adapter is active and their updates add up:
    ``W' = W + sum_i scale_i * (alpha_i / r_i) * up_i @ down_i``.

    Args:
        pipe: a :class:`ldm.pipeline.Txt2ImgPipeline` (anything with ``unet`` and ``text_encoder``).
        path: a kohya-format file (ours), a CompVis-layout kohya file, or a diffusers/peft LoRA file.
        scale: strength; 0 leaves the model unchanged.
        adapter: name to give the adapter (default: ``lora_<n>``).
    Returns:
        the adapter name (for :func:`set_lora_scale`).
    Raises:
        CheckpointError: unreadable file, keys that name no layer of this model, or shapes that
            do not fit.
    """
    tensors = load_state_dict(path)
    adapter = adapter or _fresh_adapter_name(pipe)
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    groups = _parse_lora_file(tensors, modules, source=str(path), metadata=safetensors_metadata(path))
    for component, entries in groups.items():
        module = modules[component]
        _check_shapes(module, entries, source=str(path))
        shapes = {p: (int(e["down"].shape[0]), float(e.get("alpha", e["down"].shape[0]))) for p, e in entries.items()}
        _inject(module, _lora_config(module, list(entries), shapes, 0.0), adapter)
        _fill_adapter(module, entries, adapter, source=str(path))
        module.requires_grad_(False)
    set_lora_scale(pipe, adapter, scale)
    logger.info("loaded LoRA %s as %r (scale %g): %s", path, adapter, scale,
                ", ".join(f"{len(e)} {c} layers" for c, e in groups.items()))
    return adapter


def set_lora_scale(pipe, adapter: str, scale: float) -> None:
    """Set the strength of a loaded adapter (the update becomes ``scale * alpha / r * up @ down``)."""
    for module in (pipe.unet, pipe.text_encoder):
        for _, layer in _lora_layers(module):
            layer.set_scale(adapter, float(scale))


@torch.no_grad()
def merge_lora(pipe) -> None:
    """Fold all active adapters into the base weights and remove the LoRA wrappers.

    Afterwards the networks are plain modules again (original state-dict names, no per-step
    LoRA cost) and compute ``W + sum_i scale_i * alpha_i / r_i * up_i @ down_i``.
    """
    for module in (pipe.unet, pipe.text_encoder):
        for path, layer in _lora_layers_innermost_first(module):
            present = [name for name in layer.active_adapters if name in layer.lora_A]
            if present:
                layer.merge(adapter_names=present)
            _replace(module, path, layer.get_base_layer())
        _forget_peft_config(module)


def unload_lora(pipe) -> None:
    """Remove every adapter without merging: the networks become the base model again."""
    for module in (pipe.unet, pipe.text_encoder):
        for path, layer in _lora_layers_innermost_first(module):
            _replace(module, path, layer.get_base_layer())
        _forget_peft_config(module)


# --------------------------------------------------------------------------------------------
# peft plumbing
# --------------------------------------------------------------------------------------------


def _lora_config(module: nn.Module, paths: Sequence[str], rank_alpha: Mapping[str, tuple[int, float]],
                 dropout: float) -> list:
    """peft ``LoraConfig`` s targeting exactly ``paths`` of ``module``, each with its own (rank, alpha): one for the
    layers, and one more for the paths that name a parameter (bigG's fused ``in_proj_weight``, peft's
    ``target_parameters``), when there are such paths. Paths are ours, unwrapped (see :func:`_inject`)."""
    from peft import LoraConfig

    parameters = [p for p in paths if isinstance(_locate(module, p), nn.Parameter)]
    layers = [p for p in paths if p not in set(parameters)]
    configs = []
    for target_modules, target_parameters in ((layers, None), ([], parameters)):
        targets = target_parameters or target_modules
        if not targets:
            continue
        first_rank, first_alpha = rank_alpha[targets[0]]
        configs.append(LoraConfig(
            r=first_rank,
            lora_alpha=first_alpha,
            target_modules=target_modules,
            target_parameters=target_parameters,
            rank_pattern={re.escape(p): rank_alpha[p][0] for p in targets},
            alpha_pattern={re.escape(p): rank_alpha[p][1] for p in targets},
            lora_dropout=dropout,
            bias="none",
        ))
    return configs


def _inject(module: nn.Module, configs: Sequence, adapter: str) -> None:
    """Add adapter ``adapter`` with ``configs`` (:func:`_lora_config`); then every adapter of every LoRA layer is
    active.

    The layers are injected while each ``ParamWrapper`` (a fused weight's adapters around its attention) is
    lifted off, because peft does not reach into a wrapper to adapt the ``out_proj`` inside it; the parameters
    after, where peft adds the adapter to the existing wrapper.
    """
    from peft import inject_adapter_in_model

    if any(adapter in layer.lora_A for _, layer in _lora_layers(module)):
        raise ConfigError(f"a LoRA adapter named {adapter!r} is already attached")
    with warnings.catch_warnings():
        # peft warns whenever a second adapter joins a module; several adapters are intended here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        # peft checks rank/alpha patterns against wrapped modules only, not target_parameters (which do use them)
        warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match")
        for config in configs:
            if config.target_parameters:
                inject_adapter_in_model(config, module, adapter_name=adapter)
                continue
            with _parameter_wrappers_lifted(module):
                inject_adapter_in_model(config, module, adapter_name=adapter)
    for _, layer in _lora_layers(module):
        layer.set_adapter(list(layer.lora_A.keys()))


@contextmanager
def _parameter_wrappers_lifted(module: nn.Module) -> Iterator[None]:
    """While active, every peft ``ParamWrapper`` in ``module`` is replaced by the module it wraps."""
    from peft.tuners.lora import ParamWrapper

    wrappers = [(path, layer) for path, layer in _lora_layers(module) if isinstance(layer, ParamWrapper)]
    for path, wrapper in wrappers:
        _replace(module, path, wrapper.base_layer)
    try:
        yield
    finally:
        for path, wrapper in wrappers:
            _replace(module, path, wrapper)


def _lora_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, layer)`` for every peft LoRA wrapper inside ``module``."""
    from peft.tuners.lora import LoraLayer

    for name, child in module.named_modules():
        if isinstance(child, LoraLayer):
            yield name, child


def _lora_layers_innermost_first(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """:func:`_lora_layers`, deepest paths first: a layer inside a ``ParamWrapper`` (bigG's ``out_proj`` within its
    wrapped attention) is unwrapped before its parent, so every path still resolves when its turn comes."""
    return sorted(_lora_layers(module), key=lambda item: item[0].count("."), reverse=True)


def _locate(root: nn.Module, path: str) -> Any:
    """The module or parameter at our unwrapped ``path`` of ``root``, looking through peft's ``base_layer``
    wrappers where the next name is not found (a wrapped layer itself is returned wrapped).

    Raises:
        CheckpointError: nothing of that name.
    """
    current: Any = root
    for part in path.split("."):
        while (part not in current._modules and part not in current._parameters
               and "base_layer" in current._modules):
            current = current._modules["base_layer"]
        if part in current._modules:
            current = current._modules[part]
        elif part in current._parameters:
            current = current._parameters[part]
        else:
            raise CheckpointError(f"no layer {path} in {type(root).__name__}")
    return current


def _adapter_layer(module: nn.Module, path: str) -> nn.Module:
    """The peft layer that adapts our ``path``: the wrapper of a module, or the ``ParamWrapper`` of a parameter."""
    target = _locate(module, path)
    if isinstance(target, nn.Parameter):
        return _locate(module, path.rpartition(".")[0])
    return target


def _target_weight(module: nn.Module, path: str) -> torch.Tensor:
    """The base weight an adapter at ``path`` updates (``[out, in]`` or ``[out, in, kh, kw]``)."""
    target = _locate(module, path)
    if isinstance(target, nn.Parameter):
        return target
    return (target.get_base_layer() if hasattr(target, "get_base_layer") else target).weight


def _adaptable_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, layer)`` for every Linear/Conv2d a LoRA can wrap (peft wrappers count as their layer)."""
    from peft.tuners.lora import LoraLayer

    wrapped: list[str] = []
    for name, child in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrapped):
            continue  # base_layer / lora_A / lora_B inside a wrapper
        if isinstance(child, LoraLayer):
            wrapped.append(name)
            yield name, child
        elif isinstance(child, (nn.Linear, nn.Conv2d)):
            yield name, child


def _matches(path: str, targets: Sequence[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child_name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child_name, new)


def _forget_peft_config(module: nn.Module) -> None:
    if "peft_config" in module.__dict__:
        del module.peft_config


def _fresh_adapter_name(pipe) -> str:
    used = {name for m in (pipe.unet, pipe.text_encoder) for _, layer in _lora_layers(m) for name in layer.lora_A}
    index = 0
    while f"lora_{index}" in used:
        index += 1
    return f"lora_{index}"


def _refuse_fused_text_encoder(module: nn.Module) -> None:
    if isinstance(module, OpenCLIPTextEncoder):
        raise ConfigError(
            "LoRA on the OpenCLIP (SD 2.x) text encoder is not supported: its attention uses one fused "
            "in_proj weight; train LoRA on the U-Net only"
        )


def _check_shapes(module: nn.Module, entries: Mapping[str, dict], *, source: str) -> None:
    """Refuse (before anything is attached) ``down``/``up`` tensors that do not fit their layer."""
    for path, entry in entries.items():
        weight = _target_weight(module, path)
        down, up = entry["down"], entry["up"]
        rank = down.shape[0]
        kernel = weight[0, 0].numel()  # 1 for Linear, kh * kw for Conv2d
        fits = (down.numel() == rank * weight.shape[1] * kernel and up.numel() == weight.shape[0] * rank
                and up.shape[1] == rank)
        if not fits:
            raise CheckpointError(
                f"{source}: LoRA shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit layer {path} "
                f"of weight shape {tuple(weight.shape)}"
            )


@torch.no_grad()
def _fill_adapter(module: nn.Module, entries: Mapping[str, dict], adapter: str, *, source: str) -> None:
    """Copy ``down``/``up`` tensors into the freshly injected adapter (reshaping 1x1-conv <-> linear)."""
    for path, entry in entries.items():
        layer = _adapter_layer(module, path)
        for part, target in (("down", layer.lora_A[adapter].weight), ("up", layer.lora_B[adapter].weight)):
            tensor = entry[part]
            if tensor.numel() != target.numel():
                raise CheckpointError(
                    f"{source}: LoRA {part} for {path} has shape {tuple(tensor.shape)}, "
                    f"the layer needs {tuple(target.shape)}"
                )
            target.copy_(tensor.reshape(target.shape).to(target.dtype))


# --------------------------------------------------------------------------------------------
# Names: our module paths <-> file keys
# --------------------------------------------------------------------------------------------


def _file_names(module: nn.Module) -> dict[str, list[tuple[str, int | None]]]:
    """Our unwrapped path -> ``[(kohya file name without suffix, row block or None)]`` for every adaptable layer
    (and fused q/k/v weight: three names, blocks 0, 1, 2) of ``module``."""
    paths = [path for path, _ in _adaptable_layers(module)]
    if isinstance(module, UNetModel):
        diffusers = _unet_diffusers_paths(module, paths)
        return {p: [(UNET_KOHYA_PREFIX + diffusers[p].replace(".", "_"), None)] for p in paths if p in diffusers}
    if isinstance(module, CLIPTextEncoder):
        return {p: [(TEXT_KOHYA_PREFIX + _text_model_path(p).replace(".", "_"), None)] for p in paths}
    if isinstance(module, SDXLTextEncoder):
        names: dict[str, list[tuple[str, int | None]]] = {}
        for name, target in sorted(_sdxl_text_lookup_table(module).items(), key=lambda item: item[1].block or 0):
            if name.startswith(SDXL_TEXT_KOHYA_PREFIXES):
                names.setdefault(target.path, []).append((name, target.block))
        return names
    raise ConfigError(f"LoRA files hold U-Net or CLIP text-encoder adapters, not {type(module).__name__}")


def _unwrapped_path(path: str, layer: nn.Module) -> str:
    """Our path of what the peft ``layer`` at ``path`` adapts (its parameter's path for a ``ParamWrapper``)."""
    from peft.tuners.lora import ParamWrapper

    unwrapped = path.replace(".base_layer", "")
    return f"{unwrapped}.{layer.parameter_name}" if isinstance(layer, ParamWrapper) else unwrapped


def _fused_targets(module: nn.Module, targets: Sequence[str]) -> list[str]:
    """The fused q/k/v weights of an SDXL text encoder's OpenCLIP tower, when ``targets`` name q, k or v."""
    if not isinstance(module, SDXLTextEncoder) or not {"q_proj", "k_proj", "v_proj"} & set(targets):
        return []
    return sorted({t.path for t in _sdxl_text_lookup_table(module).values() if t.block is not None})


def _unet_diffusers_paths(unet: nn.Module, paths: Sequence[str]) -> dict[str, str]:
    """Our (CompVis) module paths -> ``UNet2DConditionModel`` module paths (unmappable ones left out).

    The longest mapped prefix of each path is renamed with :func:`ldm.formats.unet_keys.module_map`;
    attention blocks carry the same inner names on both sides.
    """
    prefixes = module_map(unet.config)
    result = {}
    for path in paths:
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in prefixes:
                result[path] = ".".join([prefixes[prefix], *parts[cut:]])
                break
    return result


def _text_model_path(path: str) -> str:
    """``transformer.text_model.encoder...`` -> ``text_model.encoder...`` (the transformers name)."""
    return path[len("transformer."):] if path.startswith("transformer.") else path


def layer_lookup_table(modules: Mapping[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """Every accepted layer name of a whole layer in a file -> ``(component, our module path)`` (the q/k/v row
    blocks of a fused weight, which have no module of their own, are in :func:`lora_targets` only)."""
    return {name: (t.component, t.path) for name, t in lora_targets(modules).items() if t.block is None}


def lora_targets(modules: Mapping[str, nn.Module]) -> dict[str, LoraTarget]:
    """Every accepted layer name in a file -> its :class:`LoraTarget`."""
    table: dict[str, LoraTarget] = {}
    unet = modules["unet"]
    if isinstance(unet, UNetModel):
        paths = [path for path, _ in _adaptable_layers(unet)]
        for ours, theirs in _unet_diffusers_paths(unet, paths).items():
            table[UNET_KOHYA_PREFIX + theirs.replace(".", "_")] = LoraTarget("unet", ours)
            table["unet." + theirs] = LoraTarget("unet", ours)
        for ours in paths:
            table.setdefault(UNET_KOHYA_PREFIX + ours.replace(".", "_"), LoraTarget("unet", ours))  # CompVis layout
    text = modules["text_encoder"]
    if isinstance(text, CLIPTextEncoder):
        for ours, _ in _adaptable_layers(text):
            name = _text_model_path(ours)
            table[TEXT_KOHYA_PREFIX + name.replace(".", "_")] = LoraTarget("text_encoder", ours)
            table["text_encoder." + name] = LoraTarget("text_encoder", ours)
    if isinstance(text, SDXLTextEncoder):
        table.update(_sdxl_text_lookup_table(text))
    return table


def _sdxl_text_lookup_table(text: SDXLTextEncoder) -> dict[str, LoraTarget]:
    """kohya (``lora_te1_``/``lora_te2_``) and diffusers (``text_encoder.``/``text_encoder_2.``) names of SDXL's
    towers; the refiner's lone bigG tower is the base's second one (``te2``, ``text_encoder_2``)."""
    table: dict[str, LoraTarget] = {}
    count = len(text.embedders)
    roles = zip(SDXL_TEXT_KOHYA_PREFIXES[-count:], SDXL_TEXT_DIFFUSERS_PREFIXES[-count:])
    for index, (embedder, (kohya, diffusers)) in enumerate(zip(text.embedders, roles)):
        for name, (ours, block) in _transformers_layer_names(embedder).items():
            target = LoraTarget("text_encoder", f"embedders.{index}.{ours}", block)
            table[kohya + name.replace(".", "_")] = target
            table[diffusers + name] = target
            table[diffusers + name.removeprefix("text_model.")] = target  # transformers 5 drops text_model.
    return table


def _transformers_layer_names(tower: nn.Module) -> dict[str, tuple[str, int | None]]:
    """transformers layer name (``text_model.encoder.layers.0.self_attn.q_proj``) -> (our path, q/k/v block)
    for every Linear of a CLIP or OpenCLIP tower; OpenCLIP's q/k/v are row blocks of ``attn.in_proj_weight``."""
    if isinstance(tower, CLIPTextEncoder):
        return {_text_model_path(ours): (ours, None) for ours, _ in _adaptable_layers(tower)}
    names: dict[str, tuple[str, int | None]] = {}
    for ours, theirs in _openclip_renames(tower.config.layers).items():
        path = ours.removesuffix(".weight")
        if ours.endswith(".weight") and isinstance(_target_weight_module(tower, path), nn.Linear):
            names[theirs.removesuffix(".weight")] = (path, None)
    for block in range(tower.config.layers):
        fused, parts = _in_proj_keys(block, "weight")
        for row_block, part in enumerate(parts):
            names[part.removesuffix(".weight")] = (fused, row_block)
    return names


def _target_weight_module(module: nn.Module, path: str) -> Any:
    """The plain module at our ``path`` (through peft wrappers), or None when there is none."""
    try:
        target = _locate(module, path)
    except CheckpointError:
        return None
    return target.get_base_layer() if hasattr(target, "get_base_layer") else target


def _split_key(key: str) -> tuple[str, str] | None:
    for suffixes in (_KOHYA_SUFFIXES, _PEFT_SUFFIXES):
        for suffix, part in suffixes.items():
            if key.endswith(suffix):
                return key[: -len(suffix)], part
    return None


def _parse_lora_file(
    tensors: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module], *, source: str,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, dict[str, dict]]:
    """Group file tensors as ``{component: {our path: {"down": t, "up": t, "alpha": float}}}``.

    q/k/v adapters of a fused weight are combined into one entry (:func:`_fuse_row_blocks`); entries without
    an alpha tensor take diffusers' metadata alpha when the file has one (:func:`_diffusers_alphas`).

    Raises:
        CheckpointError: a key that is no LoRA tensor, names no layer of this model, or an
            entry without both ``down`` and ``up``.
    """
    table = lora_targets(modules)
    alpha_of = _diffusers_alphas(metadata or {}, source=source)
    groups: dict[str, dict[str, dict]] = {}
    blocks: dict[tuple[str, str], dict[int, dict]] = {}  # (component, fused path) -> {row block: entry}
    unknown = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        target = table.get(split[0]) if split else None
        if target is None:
            unknown.append(key)
            continue
        if target.block is None:
            entry = groups.setdefault(target.component, {}).setdefault(target.path, {})
        else:
            entry = blocks.setdefault((target.component, target.path), {}).setdefault(target.block, {})
        entry[split[1]] = float(tensor) if split[1] == "alpha" else tensor
        entry.setdefault("name", split[0])
        if split[1] == "down" and "alpha" not in entry and alpha_of(split[0]) is not None:
            entry.setdefault("file_alpha", alpha_of(split[0]))
    if unknown:
        shown = ", ".join(unknown[:3]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 3 else "")
        raise CheckpointError(f"{source}: LoRA keys that fit no layer of this model: {shown}")
    everything = [e for parts in blocks.values() for e in parts.values()]
    everything += [e for entries in groups.values() for e in entries.values()]
    for entry in everything:
        name = entry.pop("name")
        if "down" not in entry or "up" not in entry:
            raise CheckpointError(f"{source}: LoRA layer {name} lacks its down or up weight")
        if "alpha" not in entry and "file_alpha" in entry:
            entry["alpha"] = entry["file_alpha"]
        entry.pop("file_alpha", None)
    for (component, path), parts in blocks.items():
        groups.setdefault(component, {})[path] = _fuse_row_blocks(parts, _target_weight(modules[component], path),
                                                                  where=f"{source}: {path}")
    _add_zero_parameter_entries(groups, table, modules)
    if not groups:
        raise CheckpointError(f"{source}: no LoRA weights in the file")
    return groups


def _fuse_row_blocks(parts: Mapping[int, dict], weight: torch.Tensor, *, where: str) -> dict:
    """One adapter on a fused ``weight [3W, W]`` from adapters on its row blocks (0 = q, 1 = k, 2 = v).

    ``down = [down_q; down_k; down_v]`` (``[R, W]``, ``R`` the sum of the ranks) and ``up [3W, R]`` block diagonal
    with ``(alpha_i / r_i) * up_i`` in block i's rows and columns, alpha = R (so peft's scaling is 1): then
    ``up @ down`` holds ``(alpha_i / r_i) up_i @ down_i`` in block i's rows, exactly the separate updates.
    Blocks the file leaves out get no update.
    """
    rows = weight.shape[0] // 3
    downs, ups = [], []
    for block in sorted(parts):
        entry = parts[block]
        down, up = entry["down"].float(), entry["up"].float()
        rank = down.shape[0]
        if down.reshape(rank, -1).shape[1] != weight.shape[1] or up.numel() != rows * rank:
            raise CheckpointError(f"{where}: LoRA shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit "
                                  f"a [{rows}, {weight.shape[1]}] block of the fused q/k/v weight")
        scale = entry.get("alpha", rank) / rank
        placed = torch.zeros(3 * rows, rank)
        placed[block * rows:(block + 1) * rows] = up.reshape(rows, rank) * scale
        downs.append(down.reshape(rank, -1))
        ups.append(placed)
    down, up = torch.cat(downs), torch.cat(ups, dim=1)
    return {"down": down, "up": up, "alpha": float(down.shape[0])}


def _add_zero_parameter_entries(groups: dict[str, dict[str, dict]], table: Mapping[str, LoraTarget],
                                modules: Mapping[str, nn.Module]) -> None:
    """peft requires every adapter that targets raw parameters (OpenCLIP's fused q/k/v weights) to target the same
    ones: once a file adapts one of them, the others get a zero (rank 1) adapter."""
    for component, entries in groups.items():
        module = modules[component]
        parameters = {t.path for t in table.values()
                      if t.component == component and isinstance(_locate(module, t.path), nn.Parameter)}
        if not parameters & entries.keys():
            continue
        for path in sorted(parameters - entries.keys()):
            weight = _target_weight(modules[component], path)
            entries[path] = {"down": torch.zeros(1, weight.shape[1]), "up": torch.zeros(weight.shape[0], 1),
                             "alpha": 1.0}


def _diffusers_alphas(metadata: Mapping[str, str], *, source: str):
    """``alpha_of(file layer name) -> alpha | None`` from diffusers' ``lora_adapter_metadata`` (the peft config of
    each component, keys ``unet.lora_alpha``, ``unet.alpha_pattern``, ``text_encoder_2.lora_alpha``, ...);
    a pattern names a module path inside the component (matched as peft does: the whole path or a suffix)."""
    text = metadata.get(DIFFUSERS_METADATA_KEY)
    if not text:
        return lambda name: None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{source}: unreadable {DIFFUSERS_METADATA_KEY} ({error})") from None

    def alpha_of(name: str) -> float | None:
        component, _, layer = name.partition(".")
        for pattern, alpha in (config.get(f"{component}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", layer):
                return float(alpha)
        alpha = config.get(f"{component}.lora_alpha")
        return None if alpha is None else float(alpha)

    return alpha_of


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


__all__ = [
    "UNET_TARGETS", "TEXT_ENCODER_TARGETS", "add_lora", "lora_parameters", "lora_state_dict", "save_lora",
    "load_lora", "set_lora_scale", "merge_lora", "unload_lora",
]
