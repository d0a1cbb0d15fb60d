"""Shared fixtures: tiny random models built from configs (seconds on a CPU), all offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    """One torch thread: the suite's models are tiny, and extra threads only contend for the cores."""
    import torch

    torch.set_num_threads(1)


def tiny_pipeline_config(*, prediction: str = "eps", text_kind: str = "clip", sampler: str = "euler"):
    """A complete SD-shaped pipeline config with a few channels per layer (32x32 images, f=2)."""
    from autoencoder.model import AutoencoderConfig
    from ldm.config import PipelineConfig, SamplingDefaults
    from ldm.schedule import ScheduleConfig
    from ldm.text_encoders import TextEncoderConfig
    from ldm.unet import UNetConfig

    openclip = text_kind == "openclip"
    return PipelineConfig(
        unet=UNetConfig(
            model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
            num_heads=-1 if openclip else 2, num_head_channels=16 if openclip else -1, context_dim=32,
            use_linear_in_transformer=openclip, upcast_attention=openclip, norm_groups=8,
        ),
        vae=AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                              mid_attention=True, scaling_factor=0.5),
        text_encoder=TextEncoderConfig(
            kind=text_kind, width=32, layers=2, heads=2, max_length=77,
            act="gelu" if openclip else "quick_gelu", layer="penultimate" if openclip else "last",
            pad="zero" if openclip else "eot", projection_dim=32,
        ),
        schedule=ScheduleConfig(prediction=prediction),
        sampling=SamplingDefaults(height=32, width=32, steps=4, guidance_scale=5.0, sampler=sampler),
    )


def tiny_pipeline(seed: int = 0, **kwargs):
    """A :class:`ldm.Txt2ImgPipeline` with seeded random weights."""
    import torch

    from ldm.pipeline import Txt2ImgPipeline

    torch.manual_seed(seed)
    pipe = Txt2ImgPipeline.from_config(tiny_pipeline_config(**kwargs))
    _perturb_zero_init(pipe)
    return pipe


def _perturb_zero_init(pipe) -> None:
    """Give zero-initialised output layers small random values so every path carries signal."""
    import torch

    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for module in (pipe.unet, pipe.vae):
            for parameter in module.parameters():
                if parameter.abs().max() == 0 and parameter.dim() > 1:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.fixture
def pipe():
    return tiny_pipeline()
