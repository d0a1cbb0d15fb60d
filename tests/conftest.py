"""Shared fixtures: tiny random models built from configs (seconds on a CPU), all offline."""

from __future__ import annotations

import json
import os
import struct
import zlib

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
    from ldm.sampling.schedule import ScheduleConfig
    from ldm.models.text_encoders import TextEncoderConfig
    from ldm.models.unet import UNetConfig

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

    from ldm.models.builder import perturb_zero_initialised
    from ldm.pipeline import Txt2ImgPipeline

    torch.manual_seed(seed)
    pipe = Txt2ImgPipeline.from_config(tiny_pipeline_config(**kwargs))
    perturb_zero_initialised([pipe.unet, pipe.vae])  # real signal through every path
    return pipe


def write_random_lora(pipe, path) -> None:
    """Give ``pipe``'s U-Net a rank-2 LoRA with non-zero (seeded) up-projections and save it to ``path``."""
    import torch

    from ldm.formats.lora import add_lora, save_lora

    add_lora(pipe.unet, rank=2)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    save_lora(path, unet=pipe.unet)


def write_run_config(path, config: dict, **sections):
    """Write a training run config: ``config`` with each ``section=dict`` merged into it, as YAML at ``path``."""
    import yaml

    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def pipe():
    return tiny_pipeline()


def _png_16bit_rgb(width: int, height: int, value: int) -> bytes:
    """A 48-bit RGB PNG (PIL cannot write one) with every channel equal to ``value``."""
    row = b"\x00" + struct.pack(">" + "H" * 3 * width, *([value] * 3 * width))

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def write_bad_image_folder(folder):
    """Every kind of bad data; returns {file name: caption} of the rows written to metadata.jsonl.

    12 rows: 3 unreadable files (garbage, empty, truncated), 1 too small (4x4), 1 huge (1200x900),
    non-RGB modes L, RGBA, I;16, 48-bit RGB and P, a unicode caption and two missing captions.
    """
    import numpy as np
    from PIL import Image as PILImage

    folder.mkdir()
    PILImage.new("RGB", (48, 40), (255, 0, 0)).save(folder / "red.png")
    PILImage.new("RGB", (64, 48), (0, 0, 255)).save(folder / "blue.jpg", quality=95)
    PILImage.new("L", (40, 40), 200).save(folder / "gray.png")
    PILImage.new("RGBA", (40, 40), (0, 0, 255, 0)).save(folder / "transparent.png")
    PILImage.fromarray(np.full((40, 40), 65535, dtype=np.uint16)).save(folder / "gray16.png")
    (folder / "rgb16.png").write_bytes(_png_16bit_rgb(40, 40, 0x8080))
    palette = PILImage.new("P", (40, 40), 0)
    palette.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    palette.save(folder / "palette.png")
    PILImage.new("RGB", (4, 4), (9, 9, 9)).save(folder / "tiny.png")
    PILImage.new("RGB", (1200, 900), (0, 255, 0)).save(folder / "huge.jpg", quality=80)
    (folder / "garbage.png").write_bytes(b"this is not an image")
    (folder / "empty.jpg").write_bytes(b"")
    valid = (folder / "red.png").read_bytes()
    (folder / "truncated.png").write_bytes(valid[: len(valid) // 2])
    captions = {
        "red.png": "a red square", "blue.jpg": "café ☕ 日本語 🚲", "gray.png": None, "transparent.png": "   ",
        "gray16.png": "16-bit", "rgb16.png": "48-bit", "palette.png": "green", "tiny.png": "tiny",
        "huge.jpg": "huge", "garbage.png": "x", "empty.jpg": "x", "truncated.png": "x",
    }
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for name, caption in captions.items():
            f.write(json.dumps({"file_name": name, "text": caption}, ensure_ascii=False) + "\n")
    return captions
