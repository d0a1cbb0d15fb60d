"""The default model shipped inside the package: it loads, matches its config, draws what it is asked."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.pipeline import DEFAULT_MODEL_DIR, Txt2ImgPipeline


@pytest.fixture(scope="module")
def default_pipe():
    return Txt2ImgPipeline.from_pretrained()


def test_shipped_weights_load_strictly_and_match_the_config(default_pipe):
    from safetensors import safe_open

    with safe_open(DEFAULT_MODEL_DIR / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert keys == set(default_pipe.state_dict())
    assert dtypes == {"F16"}
    size_mb = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()) / 1e6
    assert size_mb < 50
    assert default_pipe.config.sampling.height == 64
    assert default_pipe.vae.downsample_factor == 4


def test_default_generation_is_what_the_judge_reads(default_pipe):
    from ldm.toy.judge import Judge

    judge = Judge.load()
    cases = [("a red bicycle", "bicycle", "red", 0), ("a blue car", "car", "blue", 1),
             ("a yellow star", "star", "yellow", 2)]
    for prompt, kind, colour, seed in cases:
        image = default_pipe(prompt, seed=seed)[0]
        reading = judge.classify([image])[0]
        assert (reading["object"], reading["colour"]) == (kind, colour), (prompt, reading)


def test_diffusers_loads_the_exported_default_model_and_draws_the_same_image(default_pipe, tmp_path):
    import diffusers

    default_pipe.save_pretrained(tmp_path / "sd", format="diffusers")
    sd = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    sd.set_progress_bar_config(disable=True)
    defaults = default_pipe.config.sampling
    assert defaults.signal_leak is not None  # the defaults start from noise + leak: give diffusers that start
    ours = default_pipe("a green tree", seed=3, output_type="pt")
    theirs = sd("a green tree", num_inference_steps=defaults.steps, guidance_scale=defaults.guidance_scale,
                height=64, width=64, latents=default_pipe.diffusers_latents(3), output_type="pt").images
    assert (ours - theirs).abs().max().item() < 1e-3
    # without the leak, diffusers' own seeded noise gives the same image
    ours = default_pipe("a green tree", seed=3, guidance_scale=5.0, signal_leak=False, output_type="pt")
    theirs = sd("a green tree", num_inference_steps=defaults.steps, guidance_scale=5.0, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(3), output_type="pt").images
    assert (ours - theirs).abs().max().item() < 1e-3


def test_training_record_is_shipped():
    record = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())
    assert record["steps"] > 0 and record["samples_seen"] > 0
