"""Training SDXL layouts (ldm/training, scripts/train.py) on a tiny SDXL model: the size/crop micro-conditioning
each sample carries to the U-Net, LoRA and full fine-tuning, the saved LoRA in our pipeline and in diffusers'
``load_lora_weights``, resuming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_run_config
from ldm.models.sdxl_conditioning import base_time_ids, conditioning_vector, refiner_time_ids
from ldm.training import run_state
from ldm.training.data import ImageCaptionDataset, collate_batch, image_to_tensor, load_image_caption_dataset
from ldm.training.run_config import TrainSettings, read_run_config
from ldm.training.trainer import diffusion_loss_on_batch, sdxl_time_ids, train
from tests.test_sdxl import tiny_sdxl_pipeline

RESOLUTION = 64  # pixels; the tiny SDXL VAE has f = 2, so 32x32 latents
PROMPT = "a white square on red"


def gradient_image(width: int, height: int, colour: tuple[int, int, int]) -> Image.Image:
    """A horizontal ramp over ``colour`` with a white square: every crop and flip of it looks different."""
    ramp = np.linspace(0, 1, width)[None, :, None]
    pixels = (np.array(colour)[None, None, :] * (0.3 + 0.7 * ramp)).repeat(height, axis=0)
    image = Image.fromarray(pixels.astype(np.uint8))
    image.paste((255, 255, 255), (width // 5, height // 4, width // 5 + height // 3, height // 4 + height // 3))
    return image


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny SDXL model (ours and its diffusers export) and 4 images: 300x200 and 200x300 (width x height)
    and two at the training size."""
    root = tmp_path_factory.mktemp("sdxl-train")
    pipe = tiny_sdxl_pipeline(seed=2)
    pipe.save_pretrained(root / "base")
    pipe.save_pretrained(root / "base-diffusers", format="diffusers")
    images = root / "images"
    images.mkdir()
    rows = []
    for name, size, colour in (("wide", (300, 200), (220, 30, 30)), ("tall", (200, 300), (30, 200, 60)),
                               ("blue", (64, 64), (40, 60, 220)), ("yellow", (64, 64), (230, 220, 40))):
        gradient_image(*size, colour).save(images / f"{name}.png")
        rows.append({"file_name": f"{name}.png", "text": f"a white square on {name}"})
    (images / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def write_config(root: Path, name: str, **sections) -> Path:
    config = {
        "model": {"init": str(root / "base")},
        "data": {"kind": "folder", "source": str(root / "images"), "resolution": RESOLUTION, "crop": "center",
                 "cache_latents": True},
        "training": {"batch_size": 2, "steps": 6, "lr": 2e-3, "final_lr": 2e-4, "warmup_steps": 1,
                     "checkpoint_every": 3, "ema_decay": None, "train_text_encoder": False, "min_snr_gamma": None},
        "output": {"path": str(root / name / "model"), "dtype": "float32"},
    }
    return write_run_config(root / f"{name}.yaml", config, **sections)


def known_batch(workspace, **dataset_options):
    dataset = ImageCaptionDataset(load_image_caption_dataset(workspace / "images"), resolution=RESOLUTION,
                                  **dataset_options)
    return dataset, collate_batch([dataset[i] for i in range(len(dataset))])


# ---------------------------------------------------------------------- the micro-conditioning


def test_the_size_and_crop_of_each_sample_reach_the_unet(workspace):
    """300x200 (w x h) -> resized to 96x64 to cover 64x64, centre crop at left 16: original (200, 300), crop
    (0, 16), target (64, 64); the U-Net's vector holds exactly those numbers' Fourier features."""
    from ldm.pipeline import Txt2ImgPipeline

    pipe = Txt2ImgPipeline.from_pretrained(workspace / "base")
    dataset, batch = known_batch(workspace)
    captions = [record.caption for record in dataset.records]
    order = [captions.index(f"a white square on {name}") for name in ("wide", "tall", "blue")]
    z = pipe.vae.encode_latents(batch["pixel_values"])
    time_ids = sdxl_time_ids(pipe, batch, z)
    assert time_ids[order].tolist() == [base_time_ids((200, 300), (0, 16), (64, 64)),
                                        base_time_ids((300, 200), (16, 0), (64, 64)),
                                        base_time_ids((64, 64), (0, 0), (64, 64))]

    seen = {}
    hook = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    settings = TrainSettings(caption_dropout=0.0, min_snr_gamma=None)
    with torch.no_grad():
        diffusion_loss_on_batch(pipe.unet, pipe.text_encoder, pipe.text_encoder.tokenizer, pipe.schedule, z,
                                batch["captions"], settings, torch.Generator().manual_seed(0), time_ids=time_ids)
        _, pooled = pipe.text_encoder.forward_with_pooled(pipe.text_encoder.tokenizer(batch["captions"]))
    hook.remove()
    expected = conditioning_vector(pooled, time_ids)
    assert seen["y"].shape == expected.shape
    assert (seen["y"] - expected).abs().max() < 1e-6
    # cached latents carry the same numbers
    from ldm.training.data import cache_latents

    cached = cache_latents(pipe.vae, dataset, workspace / "micro-cache.safetensors")
    cached_batch = collate_batch([cached[i] for i in range(len(cached))])
    assert torch.equal(sdxl_time_ids(pipe, cached_batch, cached_batch["latents"]), time_ids)
    # a refiner takes original size, crop and the model's aesthetic score
    refiner = tiny_sdxl_pipeline(refiner=True)
    assert sdxl_time_ids(refiner, batch, z)[order[0]].tolist() == refiner_time_ids(
        (200, 300), (0, 16), refiner.config.sdxl.aesthetic_score)


def test_a_flipped_random_crop_records_the_crop_of_the_image_the_model_sees(workspace):
    dataset, _ = known_batch(workspace, crop="random")
    wide = [record.caption for record in dataset.records].index("a white square on wide")
    plain = dataset.load(wide, crop="random", rng=np.random.default_rng(3))
    flipped = dataset.load(wide, flip=True, crop="random", rng=np.random.default_rng(3))
    top, left = plain["crop_top_left"]
    assert top == 0 and 0 < left < 32 and flipped["crop_top_left"] == (0, 96 - 64 - left)
    resized = gradient_image(300, 200, (220, 30, 30)).resize((96, 64), Image.Resampling.BICUBIC, reducing_gap=2.0)
    mirrored = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    seen = image_to_tensor(mirrored.crop((96 - 64 - left, 0, 96 - left, 64)))
    assert torch.equal(flipped["pixel_values"], seen)
    assert plain["original_size"] == flipped["original_size"] == (200, 300)


# ---------------------------------------------------------------------- training runs


def fixed_batch_loss(model_dir: Path, workspace: Path, lora_file: Path | None = None) -> float:
    """Unweighted diffusion loss of a model on the 4 images, over fixed timesteps and noise."""
    from ldm.formats.lora import load_lora
    from ldm.pipeline import Txt2ImgPipeline

    pipe = Txt2ImgPipeline.from_pretrained(model_dir)
    if lora_file is not None:
        load_lora(pipe, lora_file)
    _, batch = known_batch(workspace)
    settings = TrainSettings(caption_dropout=0.0, min_snr_gamma=None)
    with torch.no_grad():
        z = pipe.vae.encode_latents(batch["pixel_values"])
        losses = [diffusion_loss_on_batch(pipe.unet, pipe.text_encoder, pipe.text_encoder.tokenizer, pipe.schedule,
                                          z, batch["captions"], settings, torch.Generator().manual_seed(seed),
                                          time_ids=sdxl_time_ids(pipe, batch, z))
                  for seed in range(6)]
    return float(torch.stack(losses).mean())


def test_sdxl_full_fine_tune_lowers_the_loss_and_exports_an_sdxl_model(workspace):
    from ldm.pipeline import Txt2ImgPipeline

    path = write_config(workspace, "full", training={"steps": 30, "checkpoint_every": 30, "batch_size": 4,
                                                      "caption_dropout": 0.25, "train_text_encoder": True,
                                                      "text_encoder_lr": 1e-4},
                        validation={"prompts": [PROMPT], "every": 30, "steps": 2})
    result = train(read_run_config(path), workspace / "full", progress=False)
    assert result.step == 30
    before = fixed_batch_loss(workspace / "base", workspace)
    after = fixed_batch_loss(workspace / "full" / "model", workspace)
    print(f"SDXL fixed-batch loss {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before, f"loss {before:.4f} -> {after:.4f}"
    exported = Txt2ImgPipeline.from_pretrained(workspace / "full" / "model")
    base = Txt2ImgPipeline.from_pretrained(workspace / "base")
    assert exported.config.is_sdxl and exported.config.text_encoder_configs == base.config.text_encoder_configs
    for tower in ("embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                  "embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"):  # both text encoders trained
        assert not torch.equal(exported.text_encoder.state_dict()[tower], base.text_encoder.state_dict()[tower])
    assert (workspace / "full" / "validation" / "step-0000030.png").is_file()


def test_sdxl_lora_training_saves_a_file_ours_and_diffusers_read_alike(workspace):
    from ldm.formats.lora import load_lora
    from ldm.pipeline import Txt2ImgPipeline
    from tests.test_sdxl import diffusers_sdxl

    """U-Net and both text encoders (bigG's q/k/v as one adapter on its fused weight, written as kohya's q, k, v)."""
    from safetensors import safe_open

    path = write_config(workspace, "lora", training={"steps": 12, "lr": 1e-2, "checkpoint_every": 12,
                                                      "lora": {"rank": 4, "alpha": 2, "text_encoder": True}})
    train(read_run_config(path), workspace / "lora", progress=False)
    lora_file = workspace / "lora" / "model" / "lora.safetensors"
    with safe_open(str(lora_file), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    for part in ("q", "k", "v", "out"):
        assert f"lora_te1_text_model_encoder_layers_0_self_attn_{part}_proj.lora_up.weight" in keys
        assert f"lora_te2_text_model_encoder_layers_2_self_attn_{part}_proj.lora_up.weight" in keys
    assert metadata["ss_text_encoder_trained"] == "True"
    before = fixed_batch_loss(workspace / "base", workspace)
    after = fixed_batch_loss(workspace / "base", workspace, lora_file)
    print(f"SDXL LoRA fixed-batch loss {before:.4f} -> {after:.4f}")
    assert after < before

    options = dict(sampler="euler", steps=3, guidance_scale=5.0, seed=4, output_type="pt")
    pipe = Txt2ImgPipeline.from_pretrained(workspace / "base-diffusers")
    plain = pipe(PROMPT, "blurry", **options)
    load_lora(pipe, lora_file, scale=0.8)
    ours = pipe(PROMPT, "blurry", **options)
    xl = diffusers_sdxl(workspace / "base-diffusers", "euler")
    xl.load_lora_weights(str(lora_file), adapter_name="trained")
    xl.set_adapters(["trained"], adapter_weights=[0.8])
    theirs = xl(PROMPT, negative_prompt="blurry", generator=torch.Generator().manual_seed(4), num_inference_steps=3,
                guidance_scale=5.0, height=32, width=32, output_type="pt").images
    assert (ours - plain).abs().max() > 1e-3
    print(f"trained SDXL LoRA, scale 0.8: max |ours - diffusers| = {(ours - theirs).abs().max():.1e}")
    assert (ours - theirs).abs().max().item() < 1e-4
    with torch.no_grad():  # the trained bigG adapters reach diffusers' text_encoder_2
        _, pooled = pipe.text_encoder.forward_with_pooled(pipe.text_encoder.tokenizer([PROMPT]))
        ids = xl.tokenizer_2([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert (pooled - xl.text_encoder_2(ids).text_embeds).abs().max() < 1e-5


def test_sdxl_lora_training_resumes_as_an_uninterrupted_run(workspace):
    lora = {"rank": 2, "alpha": 2, "text_encoder": True}
    path = write_config(workspace, "resume", data={"random_flip": True, "crop": "random", "cache_latents": False},
                        training={"lora": lora})
    config = read_run_config(path)
    train(config, workspace / "straight", progress=False)
    train(config, workspace / "interrupted", progress=False, overwrite=True)
    shutil.rmtree(workspace / "interrupted" / "checkpoints" / "step-0000006")  # as if killed after step 3
    result = train(config, workspace / "interrupted", resume="latest", progress=False)
    assert result.step == 6 and len(result.losses) == 3
    a = run_state.load_latest_checkpoint(workspace / "straight")[0]
    b = run_state.load_latest_checkpoint(workspace / "interrupted")[0]
    assert a.keys() == b.keys() and all(".lora_" in key for key in a)
    assert any(key.startswith("conditioner.embedders.1.") for key in a)  # bigG's adapters are checkpointed too
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, f"resumed run diverged (max abs diff {worst:.2e})"


def test_lora_dropout_on_the_sdxl_bigg_encoder_is_refused_in_one_line(workspace):
    from ldm.errors import ConfigError

    path = write_config(workspace, "te-lora", training={"lora": {"rank": 2, "alpha": 2, "text_encoder": True,
                                                                 "dropout": 0.1}})
    with pytest.raises(ConfigError, match="dropout"):
        train(read_run_config(path), workspace / "te-lora", progress=False)


def test_the_sdxl_example_config_parses():
    config = read_run_config(Path(__file__).resolve().parent.parent / "configs" / "sdxl-lora-example.yaml")
    assert config.training.lora.rank == 16 and config.data.bucketing and config.training.lora.dropout == 0


@pytest.mark.slow
def test_command_line_sdxl_lora_run_with_bf16_autocast(workspace):
    """scripts/train.py --config in a fresh process: an SDXL LoRA run (U-Net and text encoders) under bf16 autocast."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    path = write_config(workspace, "cli", training={"steps": 2, "checkpoint_every": 2, "mixed_precision": "bf16",
                                                     "lora": {"rank": 2, "alpha": 2, "text_encoder": True}})
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(root / "scripts" / "train.py"), "--config", str(path), "--run-dir",
                           str(workspace / "cli"), "--threads", "1", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (workspace / "cli" / "model" / "lora.safetensors").is_file()
