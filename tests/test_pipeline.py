"""The pipeline end to end, with diffusers' StableDiffusionPipeline as the oracle."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.errors import ConfigError
from ldm.sampling.registry import SAMPLER_INFO
from tests.conftest import tiny_pipeline, tiny_pipeline_config

PROMPT = "a red bicycle on a blue background"
NEGATIVE = "blurry"

def diffusers_images(folder, sampler: str, *, seed: int, steps: int = 4, scale: float = 5.0, n: int = 1):
    """Images [n, 3, H, W] in [0, 1] from diffusers loading ``folder`` offline with the matching scheduler."""
    import diffusers

    sd = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    scheduler_class = getattr(diffusers, SAMPLER_INFO[sampler].diffusers_class)
    sd.scheduler = scheduler_class.from_config(sd.scheduler.config)
    sd.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    out = sd([PROMPT] * n, negative_prompt=[NEGATIVE] * n, num_inference_steps=steps, guidance_scale=scale,
             generator=generators if n > 1 else generators[0], height=32, width=32, output_type="pt")
    return out.images


@pytest.fixture(scope="module")
def saved_diffusers(tmp_path_factory):
    """Our tiny pipeline, saved as a diffusers folder."""
    pipe = tiny_pipeline(seed=3)
    folder = tmp_path_factory.mktemp("sd") / "diffusers"
    pipe.save_pretrained(folder, format="diffusers")
    return pipe, folder


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "euler_ancestral"])
def test_same_image_as_diffusers_for_same_seed(saved_diffusers, sampler):
    pipe, folder = saved_diffusers
    ours = pipe(PROMPT, NEGATIVE, sampler=sampler, steps=4, guidance_scale=5.0, seed=11, output_type="pt")
    theirs = diffusers_images(folder, sampler, seed=11)
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_diffusers_folder_loads_and_gives_the_same_image(saved_diffusers):
    from ldm.pipeline import Txt2ImgPipeline

    pipe, folder = saved_diffusers
    loaded = Txt2ImgPipeline.from_pretrained(folder)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    for section in ("unet", "vae", "schedule"):
        assert getattr(loaded.config, section) == getattr(pipe.config, section), section
    options = dict(sampler="euler", steps=4, guidance_scale=5.0, seed=5, output_type="pt")
    assert torch.equal(pipe(PROMPT, **options), loaded(PROMPT, **options))


def test_folder_written_by_diffusers_loads(tmp_path, saved_diffusers):
    """A folder that diffusers itself wrote (not our writer) loads and matches diffusers' image."""
    import diffusers

    from ldm.pipeline import Txt2ImgPipeline

    _, folder = saved_diffusers
    sd = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    rewritten = tmp_path / "by-diffusers"
    sd.save_pretrained(rewritten)
    loaded = Txt2ImgPipeline.from_pretrained(rewritten)
    ours = loaded(PROMPT, NEGATIVE, sampler="euler", steps=4, guidance_scale=5.0, seed=2, output_type="pt")
    theirs = diffusers_images(rewritten, "euler", seed=2)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_v_prediction_matches_diffusers(tmp_path):
    pipe = tiny_pipeline(seed=4, prediction="v")
    pipe.save_pretrained(tmp_path / "v", format="diffusers")
    config = json.loads((tmp_path / "v" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    ours = pipe(PROMPT, NEGATIVE, sampler="euler", steps=4, guidance_scale=5.0, seed=8, output_type="pt")
    theirs = diffusers_images(tmp_path / "v", "euler", seed=8)
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral", "ddim"])
def test_zero_terminal_snr_model_matches_diffusers(tmp_path, sampler):
    pipe = tiny_pipeline(seed=4, prediction="v")
    pipe.replace_config_sections({"schedule": {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                               "steps_offset": 0}})
    pipe.save_pretrained(tmp_path / "zsnr", format="diffusers")
    config = json.loads((tmp_path / "zsnr" / "scheduler" / "scheduler_config.json").read_text())
    assert config["rescale_betas_zero_snr"] is True and config["timestep_spacing"] == "trailing"
    ours = pipe(PROMPT, NEGATIVE, sampler=sampler, steps=4, guidance_scale=5.0, seed=8, output_type="pt")
    theirs = diffusers_images(tmp_path / "zsnr", sampler, seed=8)
    assert (ours - theirs).abs().max().item() < (1e-3 if sampler == "ddim" else 1e-4)  # see test_samplers
    pipe.replace_config_sections({"sampling": {"sampler": "heun"}})
    with pytest.raises(ConfigError, match="no zero-terminal-SNR option"):
        pipe.save_pretrained(tmp_path / "heun", format="diffusers")


def test_openclip_text_encoder_pipeline_matches_diffusers(tmp_path):
    """SD2-style: OpenCLIP text tower (penultimate layer, zero padding), linear projections, head dim."""
    pipe = tiny_pipeline(seed=6, text_kind="openclip")
    pipe.save_pretrained(tmp_path / "sd2", format="diffusers")
    ours = pipe(PROMPT, NEGATIVE, sampler="ddim", steps=4, guidance_scale=5.0, seed=9, output_type="pt")
    theirs = diffusers_images(tmp_path / "sd2", "ddim", seed=9)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_batch_image_i_is_the_single_image_with_seed_plus_i(pipe):
    batch = pipe(PROMPT, num_images=3, seed=40, sampler="euler_ancestral", output_type="pt")
    for i in range(3):
        alone = pipe(PROMPT, num_images=1, seed=40 + i, sampler="euler_ancestral", output_type="pt")
        assert torch.equal(batch[i], alone[0]), f"image {i} differs from seed {40 + i} alone"


def test_seeded_generation_is_repeatable_and_seed_matters(pipe):
    a = pipe(PROMPT, seed=1, output_type="pt")
    b = pipe(PROMPT, seed=1, output_type="pt")
    c = pipe(PROMPT, seed=2, output_type="pt")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_guidance_scale_one_equals_the_conditional_model_alone(pipe):
    from ldm.sampling.denoiser import DiscreteDenoiser
    from ldm.sampling.samplers import SAMPLERS, final_latents, initial_latents

    guided = pipe(PROMPT, "anything at all", guidance_scale=1.0, seed=3, sampler="euler", output_type="pt")
    context = pipe.encode_prompt([PROMPT])
    denoiser = DiscreteDenoiser(pipe.unet_prediction, pipe.schedule, "eps")
    sigmas = pipe.schedule.sampling_sigmas(4, sampler="euler")
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    x = SAMPLERS["euler"].fn(lambda x, s: denoiser(x, s, context), initial_latents(noise, sigmas, sampler="euler"),
                             sigmas)
    image = (pipe.vae.decode_latents(final_latents(x, sigmas, sampler="euler")) / 2 + 0.5).clamp(0, 1)
    assert torch.equal(guided, image)


def test_every_sampler_produces_images(pipe):
    from ldm.sampling.samplers import SAMPLERS

    for name in SAMPLERS:
        images = pipe(PROMPT, sampler=name, steps=3, seed=0)
        assert len(images) == 1 and images[0].size == (32, 32), name


def test_native_save_load_round_trip_is_bitwise(tmp_path, pipe):
    from ldm.pipeline import Txt2ImgPipeline

    pipe.save_pretrained(tmp_path / "model")
    loaded = Txt2ImgPipeline.from_pretrained(tmp_path / "model")
    assert loaded.config == pipe.config
    original, reloaded = pipe.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    assert torch.equal(pipe(PROMPT, seed=4, output_type="pt"), loaded(PROMPT, seed=4, output_type="pt"))


def test_native_weights_use_original_sd_key_names(tmp_path, pipe):
    from safetensors import safe_open

    pipe.save_pretrained(tmp_path / "model")
    with safe_open(tmp_path / "model" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.time_embed.0.weight" in keys
    assert "first_stage_model.encoder.conv_in.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys


def test_save_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path, pipe):
    from ldm.errors import CheckpointError

    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a saved model"):
        pipe.save_pretrained(precious)
    assert (precious / "holiday.jpg").read_bytes() == b"not a model"


def test_saving_over_a_model_replaces_its_weights_and_keeps_its_model_card(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "MODEL_CARD.md").write_text("# my model\n")
    (tmp_path / "model" / "stale.bin").write_bytes(b"old")
    pipe.save_pretrained(tmp_path / "model", dtype=torch.float16)
    assert (tmp_path / "model" / "MODEL_CARD.md").read_text() == "# my model\n"
    assert not (tmp_path / "model" / "stale.bin").exists()  # only documents are carried over
    from ldm.formats.checkpoints import load_state_dict

    assert next(iter(load_state_dict(tmp_path / "model" / "model.safetensors").values())).dtype == torch.float16


def test_bad_options_raise_config_errors(pipe):
    from ldm.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of 8"):
        pipe(PROMPT, height=36)
    with pytest.raises(ConfigError, match="steps"):
        pipe(PROMPT, steps=0)
    with pytest.raises(ConfigError, match="unknown sampler"):
        pipe(PROMPT, sampler="dpm_fast")


def test_missing_and_corrupt_models_are_clear_errors(tmp_path):
    from ldm.errors import CheckpointError
    from ldm.pipeline import Txt2ImgPipeline

    with pytest.raises(CheckpointError, match="not found"):
        Txt2ImgPipeline.from_pretrained(tmp_path / "nope")
    folder = tmp_path / "broken"
    tiny_pipeline().save_pretrained(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Txt2ImgPipeline.from_pretrained(folder)


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    from ldm.errors import CheckpointError
    from ldm.pipeline import Txt2ImgPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not download"):
        Txt2ImgPipeline.from_pretrained("someone/some-model-that-is-not-cached")


def test_config_yaml_is_strict(tmp_path):
    from ldm.config import load_config, save_config
    from ldm.errors import ConfigError

    path = tmp_path / "config.yaml"
    save_config(tiny_pipeline_config(), path)
    assert load_config(path) == tiny_pipeline_config()
    path.write_text(path.read_text().replace("model_channels:", "model_chanels:"))
    with pytest.raises(ConfigError, match="unet.*model_chanels"):
        load_config(path)
