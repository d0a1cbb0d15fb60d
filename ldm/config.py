"""The pipeline's configuration: one typed dataclass per component, and strict YAML I/O.

Each component's config lives beside the class it builds (``UNetConfig`` in ``ldm.models.unet``,
``AutoencoderConfig`` in ``autoencoder.model``, ...); this module bundles them into
:class:`PipelineConfig` and reads/writes the ``config.yaml`` of a saved model. Loading is
strict: an unknown key is an error naming its dotted path (``unet.model_chanels``), so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoencoder.model import AutoencoderConfig
from ldm.config_io import plain_data, read_yaml, strict_from_dict, write_yaml
from ldm.errors import ConfigError
from ldm.sampling.schedule import ScheduleConfig
from ldm.sampling.signal_leak import SignalLeak
from ldm.models.sdxl_conditioning import SDXLConfig
from ldm.models.text_encoders import TextEncoderConfig
from ldm.models.unet import UNetConfig
from ldm.upscaling import UpscaleConfig


@dataclass
class SamplingDefaults:
    """What ``pipe(prompt)`` does when the caller does not say: the model's native settings."""

    height: int = 512
    width: int = 512
    steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = "dpmpp_2m"
    karras: bool = False
    eta: float = 0.0
    clip_skip: int = 1  # AUTOMATIC1111's "Clip skip": 1 = the text encoder's own layer, 2 = one block earlier
    # Statistics of the training latents for signal-leak sampling (ldm.sampling.signal_leak.SignalLeak as a
    # dict: mean, covariance, count); None: start from pure noise, as diffusers does.
    signal_leak: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.signal_leak is not None:
            self.signal_leak = SignalLeak.from_dict(self.signal_leak).to_dict()  # validated, plain floats

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingDefaults":
        return strict_from_dict(cls, d)


# (section name in config.yaml, config class)
SECTION_CLASSES = {
    "unet": UNetConfig,
    "vae": AutoencoderConfig,
    "text_encoder": TextEncoderConfig,
    "schedule": ScheduleConfig,
    "sampling": SamplingDefaults,
}
# present only in the configs of models that use them (SDXL: sdxl, and text_encoder_2 for the base model)
OPTIONAL_SECTIONS = {"upscale": UpscaleConfig, "sdxl": SDXLConfig, "text_encoder_2": TextEncoderConfig}


@dataclass
class PipelineConfig:
    """Everything needed to build a :class:`ldm.Txt2ImgPipeline` with random weights."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    upscale: UpscaleConfig | None = None  # a super-resolution model (ldm.upscaling); None: text-to-image
    # SDXL (ldm.models.sdxl_conditioning): its conditioning settings and, for the base model, the second text
    # encoder (OpenCLIP bigG; text_encoder is then CLIP ViT-L, for the refiner bigG itself).
    sdxl: SDXLConfig | None = None
    text_encoder_2: TextEncoderConfig | None = None

    def __post_init__(self) -> None:
        if (self.sdxl is None) != (self.unet.adm_in_channels is None):
            raise ConfigError("an sdxl section goes exactly with a U-Net that has adm_in_channels")
        if self.text_encoder_2 is not None and self.sdxl is None:
            raise ConfigError("text_encoder_2 is for SDXL models (an sdxl section)")

    @property
    def is_upscaler(self) -> bool:
        return self.upscale is not None

    @property
    def is_sdxl(self) -> bool:
        """An SDXL model: two text encoders (refiner: one) with a pooled output, and the vector conditioning."""
        return self.sdxl is not None

    @property
    def text_encoder_configs(self) -> list[TextEncoderConfig]:
        """The text encoders, in the order their contexts are concatenated."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    def to_dict(self) -> dict[str, Any]:
        sections = {name: getattr(self, name) for name in [*SECTION_CLASSES, *OPTIONAL_SECTIONS]}
        return {name: section.to_dict() for name, section in sections.items() if section is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "PipelineConfig":
        """Build from nested dicts; errors name the offending dotted key and the source."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(d).__name__}")
        known = {**SECTION_CLASSES, **OPTIONAL_SECTIONS}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r} (expected some of {sorted(known)})")
        sections = {}
        for name, config_class in known.items():
            if name in OPTIONAL_SECTIONS and d.get(name) is None:
                continue
            values = d.get(name) or {}
            try:
                sections[name] = config_class.from_dict(values)
            except (TypeError, ValueError, KeyError) as error:
                raise ConfigError(f"{source}: {name}: {_strip_quotes(error)}") from None
        return cls(**sections)


def _strip_quotes(error: Exception) -> str:
    text = str(error)
    return text[1:-1] if isinstance(error, KeyError) and text.startswith("'") else text


def load_config(path: str | Path) -> PipelineConfig:
    """Read a pipeline ``config.yaml`` strictly (see module docstring)."""
    return PipelineConfig.from_dict(read_yaml(path) or {}, source=str(path))


def save_config(config: PipelineConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (tuples become lists; ``load_config`` turns them back)."""
    write_yaml(config.to_dict(), path)
