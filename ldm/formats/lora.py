"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through ``peft``.

A LoRA adapter replaces a frozen weight ``W [out, in]`` of a Linear (or Conv2d) layer by

    W' = W + scale * (alpha / rank) * up @ down          (Hu et al. 2021, eq. 3, with the alpha/r scaling)

with ``down [rank, in]`` (``lora_A`` in peft) and ``up [out, rank]`` (``lora_B``, zero at the start of
training so the adapted model starts equal to the base model). ``scale`` is the user's strength knob at
inference (``txt2img.py --lora FILE:SCALE``).

Training::

    add_lora(pipe.unet, rank=8, alpha=8)                         # U-Net to_q/to_k/to_v/to_out.0
    add_lora(pipe.text_encoder, rank=8, targets=TEXT_ENCODER_TARGETS)   # optional (CLIP only)
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

SDXL (kohya ``sdxl_train_network.py`` files): ``lora_unet_*`` in the original SGM layout (as above),
``lora_te1_*`` for the CLIP ViT-L text encoder (``embedders.0``). ``lora_te2_*`` (OpenCLIP bigG, whose
attention is one fused ``in_proj`` weight here) is refused with a one-line error for now.

While adapters are attached, peft wraps each adapted layer, so the module's own state-dict
names change (``to_q.weight`` -> ``to_q.base_layer.weight``); :func:`merge_lora` or
:func:`unload_lora` restore the plain layers and names.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from ldm.errors import CheckpointError, ConfigError
from ldm.formats.checkpoints import load_state_dict, save_safetensors_atomic
from ldm.formats.unet_keys import module_map
from ldm.models.text_encoders import CLIPTextEncoder, OpenCLIPTextEncoder, SDXLTextEncoder
from ldm.models.unet import UNetModel

logger = logging.getLogger(__name__)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

UNET_KOHYA_PREFIX = "lora_unet_"
TEXT_KOHYA_PREFIX = "lora_te_"
SDXL_TEXT_KOHYA_PREFIXES = ("lora_te1_", "lora_te2_")  # SDXL: CLIP ViT-L, OpenCLIP bigG (transformers names)
FORMAT_NAME = "kohya-lora"
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up"}


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
        module: the U-Net (default targets :data:`UNET_TARGETS`) or the CLIP text encoder
            (pass ``targets=TEXT_ENCODER_TARGETS``).
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
    if not names:
        raise ConfigError(f"no layer of {type(module).__name__} matches the LoRA targets {tuple(targets)}")
    config = _lora_config(names, {name: (rank, float(rank if alpha is None else alpha)) for name in names}, dropout)
    _inject(module, config, adapter)
    return names


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters of ``module`` (for the optimizer), in a fixed order."""
    return [p for name, p in module.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def lora_state_dict(module: nn.Module, *, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter ``adapter`` of ``module`` as kohya-format tensors (see the module docstring).

    Returns ``{"lora_unet_NAME.lora_down.weight": down, "...lora_up.weight": up, "...alpha": alpha}``
    for a U-Net, ``lora_te_`` names for the CLIP text encoder. Tensors are detached copies.
    """
    names = _file_names(module)
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in _lora_layers(module):
        if adapter not in layer.lora_A:
            continue
        key = names[path]
        down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        tensors[f"{key}.lora_down.weight"] = down.detach().clone()
        tensors[f"{key}.lora_up.weight"] = up.detach().clone()
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
        "ss_text_encoder_trained": str(any(k.startswith(TEXT_KOHYA_PREFIX) for k in tensors)),
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
    groups = _parse_lora_file(tensors, modules, source=str(path))
    for component, entries in groups.items():
        module = modules[component]
        _check_shapes(module, entries, source=str(path))
        shapes = {p: (int(e["down"].shape[0]), float(e.get("alpha", e["down"].shape[0]))) for p, e in entries.items()}
        _inject(module, _lora_config(list(entries), shapes, 0.0), adapter)
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
        for path, layer in list(_lora_layers(module)):
            present = [name for name in layer.active_adapters if name in layer.lora_A]
            if present:
                layer.merge(adapter_names=present)
            _replace(module, path, layer.get_base_layer())
        _forget_peft_config(module)


def unload_lora(pipe) -> None:
    """Remove every adapter without merging: the networks become the base model again."""
    for module in (pipe.unet, pipe.text_encoder):
        for path, layer in list(_lora_layers(module)):
            _replace(module, path, layer.get_base_layer())
        _forget_peft_config(module)


# --------------------------------------------------------------------------------------------
# peft plumbing
# --------------------------------------------------------------------------------------------


def _lora_config(paths: Sequence[str], rank_alpha: Mapping[str, tuple[int, float]], dropout: float):
    """A peft ``LoraConfig`` targeting exactly ``paths``, each with its own (rank, alpha)."""
    from peft import LoraConfig

    first_rank, first_alpha = next(iter(rank_alpha.values()))
    return LoraConfig(
        r=first_rank,
        lora_alpha=first_alpha,
        target_modules=list(paths),
        rank_pattern={re.escape(p): r for p, (r, _) in rank_alpha.items()},
        alpha_pattern={re.escape(p): a for p, (_, a) in rank_alpha.items()},
        lora_dropout=dropout,
        bias="none",
    )


def _inject(module: nn.Module, config, adapter: str) -> None:
    """Add adapter ``adapter`` with ``config``; then every adapter of every LoRA layer is active."""
    from peft import inject_adapter_in_model

    if any(adapter in layer.lora_A for _, layer in _lora_layers(module)):
        raise ConfigError(f"a LoRA adapter named {adapter!r} is already attached")
    with warnings.catch_warnings():
        # peft warns whenever a second adapter joins a module; several adapters are intended here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, module, adapter_name=adapter)
    for _, layer in _lora_layers(module):
        layer.set_adapter(list(layer.lora_A.keys()))


def _lora_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, layer)`` for every peft LoRA wrapper inside ``module``."""
    from peft.tuners.lora import LoraLayer

    for name, child in module.named_modules():
        if isinstance(child, LoraLayer):
            yield name, child


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
        layer = module.get_submodule(path)
        weight = (layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer).weight
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
        layer = module.get_submodule(path)
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


def _file_names(module: nn.Module) -> dict[str, str]:
    """Our module path -> kohya file name (without suffix) for every adaptable layer of ``module``."""
    paths = [path for path, _ in _adaptable_layers(module)]
    if isinstance(module, UNetModel):
        diffusers = _unet_diffusers_paths(module, paths)
        return {p: UNET_KOHYA_PREFIX + diffusers[p].replace(".", "_") for p in paths if p in diffusers}
    if isinstance(module, CLIPTextEncoder):
        return {p: TEXT_KOHYA_PREFIX + _text_model_path(p).replace(".", "_") for p in paths}
    raise ConfigError(f"LoRA files hold U-Net or CLIP text-encoder adapters, not {type(module).__name__}")


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
    """Every accepted layer name in a file -> ``(component, our module path)``."""
    table: dict[str, tuple[str, str]] = {}
    unet = modules["unet"]
    if isinstance(unet, UNetModel):
        paths = [path for path, _ in _adaptable_layers(unet)]
        for ours, theirs in _unet_diffusers_paths(unet, paths).items():
            table[UNET_KOHYA_PREFIX + theirs.replace(".", "_")] = ("unet", ours)
            table["unet." + theirs] = ("unet", ours)
        for ours in paths:
            table.setdefault(UNET_KOHYA_PREFIX + ours.replace(".", "_"), ("unet", ours))  # CompVis layout
    text = modules["text_encoder"]
    if isinstance(text, CLIPTextEncoder):
        for ours, _ in _adaptable_layers(text):
            name = _text_model_path(ours)
            table[TEXT_KOHYA_PREFIX + name.replace(".", "_")] = ("text_encoder", ours)
            table["text_encoder." + name] = ("text_encoder", ours)
    if isinstance(text, SDXLTextEncoder):
        for index, embedder in enumerate(text.embedders):
            if isinstance(embedder, CLIPTextEncoder):
                for ours, _ in _adaptable_layers(embedder):
                    name = SDXL_TEXT_KOHYA_PREFIXES[index] + _text_model_path(ours).replace(".", "_")
                    table[name] = ("text_encoder", f"embedders.{index}.{ours}")
    return table


def _refuse_sdxl_bigg_lora(tensors: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module], source: str) -> None:
    """One line for a kohya SDXL LoRA that adapts the OpenCLIP bigG text encoder (``lora_te2_*``)."""
    if isinstance(modules["text_encoder"], SDXLTextEncoder) and any(k.startswith("lora_te2_") for k in tensors):
        raise CheckpointError(f"{source}: LoRA for SDXL's second text encoder (lora_te2_*, OpenCLIP bigG) is not "
                              "supported yet (its attention is one fused in_proj weight here)")


def _split_key(key: str) -> tuple[str, str] | None:
    for suffixes in (_KOHYA_SUFFIXES, _PEFT_SUFFIXES):
        for suffix, part in suffixes.items():
            if key.endswith(suffix):
                return key[: -len(suffix)], part
    return None


def _parse_lora_file(
    tensors: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module], *, source: str
) -> dict[str, dict[str, dict]]:
    """Group file tensors as ``{component: {our path: {"down": t, "up": t, "alpha": float}}}``.

    Raises:
        CheckpointError: a key that is no LoRA tensor, names no layer of this model, or an
            entry without both ``down`` and ``up``.
    """
    _refuse_sdxl_bigg_lora(tensors, modules, source)
    table = layer_lookup_table(modules)
    groups: dict[str, dict[str, dict]] = {}
    unknown = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        target = table.get(split[0]) if split else None
        if target is None:
            unknown.append(key)
            continue
        component, path = target
        entry = groups.setdefault(component, {}).setdefault(path, {})
        entry[split[1]] = float(tensor) if split[1] == "alpha" else tensor
    if unknown:
        shown = ", ".join(unknown[:3]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 3 else "")
        raise CheckpointError(f"{source}: LoRA keys that fit no layer of this model: {shown}")
    for component, entries in groups.items():
        for path, entry in entries.items():
            if "down" not in entry or "up" not in entry:
                raise CheckpointError(f"{source}: LoRA for {component} layer {path} lacks its down or up weight")
    if not groups:
        raise CheckpointError(f"{source}: no LoRA weights in the file")
    return groups


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


__all__ = [
    "UNET_TARGETS", "TEXT_ENCODER_TARGETS", "add_lora", "lora_parameters", "lora_state_dict", "save_lora",
    "load_lora", "set_lora_scale", "merge_lora", "unload_lora",
]
