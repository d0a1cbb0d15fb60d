"""Building the three networks of a pipeline from its config, with random or with no weights.

``build_components(config)`` gives fresh, randomly initialised networks. Loading builds them
under ``torch.device("meta")`` instead (no memory: every tensor is a shape only), fills them
with ``load_state_dict(..., assign=True)`` and then calls :func:`fill_derived_buffers` for the
few buffers no checkpoint holds. The meta-device context is thread-local and nothing global is
patched, so several threads may load models at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from autoencoder.model import AutoencoderKL
from ldm.models.text_encoders import SDXLTextEncoder, build_text_encoder
from ldm.models.unet import UNetModel

if TYPE_CHECKING:  # the config module imports the models, not the other way round
    from ldm.config import PipelineConfig

COMPONENTS = ("unet", "vae", "text_encoder")


def build_component(name: str, config: PipelineConfig) -> nn.Module:
    """A freshly initialised ``"unet"``, ``"vae"`` or ``"text_encoder"`` for ``config``."""
    if name == "unet":
        return UNetModel(config.unet)
    if name == "vae":
        return AutoencoderKL(config.vae)
    if name == "text_encoder":
        if config.is_sdxl:
            return SDXLTextEncoder(config.text_encoder_configs)
        return build_text_encoder(config.text_encoder)
    raise ValueError(f"unknown component {name!r} (expected one of {COMPONENTS})")


def build_components(config: PipelineConfig) -> dict[str, nn.Module]:
    """All three networks, keyed by :data:`COMPONENTS`."""
    return {name: build_component(name, config) for name in COMPONENTS}


def fill_derived_buffers(module: nn.Module) -> None:
    """Recompute buffers that checkpoints do not hold, after a load onto the meta device.

    Such buffers are derived constants (CLIP's ``position_ids``); a network that has them
    implements ``reset_derived_buffers()``. Raises ``RuntimeError`` naming any buffer still on
    the meta device afterwards, so a half-built network never reaches the sampler.
    """
    for submodule in module.modules():
        if hasattr(submodule, "reset_derived_buffers") and any(b.is_meta for b in submodule.buffers()):
            submodule.reset_derived_buffers()
    missing = [name for name, buffer in module.named_buffers() if buffer.is_meta]
    if missing:
        raise RuntimeError(f"buffers not filled after loading: {', '.join(missing)}")


@torch.no_grad()
def perturb_zero_initialised(modules: Iterable[nn.Module], *, seed: int = 1234, scale: float = 0.05) -> None:
    """Give every all-zero weight matrix/kernel small random values ``N(0, scale^2)``, in place.

    Freshly built U-Nets zero-initialise their output convolutions (the residual branches start
    as identities), so with random weights the whole U-Net outputs zeros and comparing two
    implementations would prove nothing. Tests and benchmarks call this first.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in modules:
        for parameter in module.parameters():
            if parameter.dim() > 1 and parameter.abs().max() == 0:
                noise = torch.randn(parameter.shape, generator=generator) * scale
                parameter.copy_(noise.to(device=parameter.device, dtype=parameter.dtype))
