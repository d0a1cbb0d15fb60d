"""SDXL base + refiner as an ensemble of experts (``pipe(..., refiner=, refiner_switch=)``, :mod:`ldm.refiner`)
against diffusers' two-pipeline sequence with the same random weights: ``StableDiffusionXLPipeline(
denoising_end=s, output_type="latent")`` then ``StableDiffusionXLImg2ImgPipeline(image=latents, denoising_start=s)``,
one generator shared by both; and the argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.errors import ArgumentError
from ldm.refiner import steps_before_switch
from tests.test_sdxl import NEGATIVE, PROMPT, tiny_sdxl_pipeline

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def base_and_refiner(tmp_path_factory):
    """Our tiny SDXL base and refiner (different random VAEs: the refiner's decodes) and their diffusers folders."""
    folder = tmp_path_factory.mktemp("ensemble")
    base, refiner = tiny_sdxl_pipeline(seed=3), tiny_sdxl_pipeline(seed=8, refiner=True)
    base.save_pretrained(folder / "base", format="diffusers")
    refiner.save_pretrained(folder / "refiner", format="diffusers")
    return base, refiner, folder


def _diffusers_pair(folder, sampler: str):
    from ldm.sampling.registry import SAMPLER_INFO

    pipes = []
    for name, cls in (("base", diffusers.StableDiffusionXLPipeline),
                      ("refiner", diffusers.StableDiffusionXLImg2ImgPipeline)):
        pipe = cls.from_pretrained(folder / name, local_files_only=True, add_watermarker=False)
        pipe.scheduler = getattr(diffusers, SAMPLER_INFO[sampler].diffusers_class).from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    return pipes


@pytest.mark.parametrize("sampler, switch", [("euler", 0.6), ("dpmpp_2m", 0.6), ("euler_ancestral", 0.8)])
def test_base_and_refiner_match_diffusers_denoising_end_and_start(base_and_refiner, sampler, switch):
    base, refiner, folder = base_and_refiner
    base_xl, refiner_xl = _diffusers_pair(folder, sampler)
    generator = torch.Generator().manual_seed(11)  # one generator through both pipelines
    options = dict(num_inference_steps=6, guidance_scale=5.0, generator=generator)
    latents = base_xl(PROMPT, negative_prompt=NEGATIVE, height=32, width=32, denoising_end=switch,
                      output_type="latent", **options).images
    theirs = refiner_xl(PROMPT, negative_prompt=NEGATIVE, image=latents, denoising_start=switch, output_type="pt",
                        **options).images

    steps = []
    ours = base(PROMPT, NEGATIVE, sampler=sampler, steps=6, guidance_scale=5.0, seed=11, output_type="pt",
                refiner=refiner, refiner_switch=switch, progress=lambda done, total: steps.append((done, total)))
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert steps[-1] == (6, 6)  # the two parts share one step count
    alone = base(PROMPT, NEGATIVE, sampler=sampler, steps=6, guidance_scale=5.0, seed=11, output_type="pt")
    assert (ours - alone).abs().max().item() > 1e-2  # the refiner took part


def test_img2img_base_and_refiner_match_diffusers(base_and_refiner):
    """img2img: the base model runs the strength's part of the chain until the switch (diffusers' img2img
    pipeline with ``strength`` and ``denoising_end``), the refiner the rest."""
    from tests.test_image_conditioning import make_image

    base, refiner, folder = base_and_refiner
    base_xl = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder / "base", local_files_only=True,
                                                                         add_watermarker=False)
    base_xl.set_progress_bar_config(disable=True)
    _, refiner_xl = _diffusers_pair(folder, "euler")
    generator = torch.Generator().manual_seed(5)
    options = dict(num_inference_steps=8, guidance_scale=5.0, generator=generator)
    latents = base_xl(PROMPT, negative_prompt=NEGATIVE, image=make_image(4), strength=0.8, denoising_end=0.7,
                      output_type="latent", **options).images
    theirs = refiner_xl(PROMPT, negative_prompt=NEGATIVE, image=latents, denoising_start=0.7, output_type="pt",
                        **options).images
    ours = base(PROMPT, NEGATIVE, image=make_image(4), strength=0.8, sampler="euler", steps=8, guidance_scale=5.0,
                seed=5, output_type="pt", refiner=refiner, refiner_switch=0.7)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_switch_follows_diffusers_timestep_cut_off(base_and_refiner):
    """The base model runs the steps whose timestep is >= round(T * (1 - switch)): 6 Euler steps ("leading",
    offset 1) are at t = 831, 665, 499, 333, 167, 1."""
    base, _, _ = base_and_refiner
    assert base.schedule.timesteps(6, sampler="euler").tolist() == [831, 665, 499, 333, 167, 1]
    sigmas = base.schedule.sampling_sigmas(6, sampler="euler")
    assert [steps_before_switch(base.schedule, sigmas, s) for s in (0.1, 0.2, 0.5, 0.6, 0.8, 0.9)] == [0, 1, 2, 3, 4, 5]
    assert steps_before_switch(base.schedule, sigmas, 0.501) == 3  # cut-off 499 = that step's timestep: the base's


def test_refiner_arguments_are_checked(base_and_refiner):
    from PIL import Image

    from tests.conftest import tiny_pipeline

    base, refiner, _ = base_and_refiner
    run = dict(steps=2, output_type="pt")
    for switch in (0, 1, 1.5, float("nan"), True, "0.8"):
        with pytest.raises(ArgumentError, match="refiner_switch"):
            base(PROMPT, refiner=refiner, refiner_switch=switch, **run)
    with pytest.raises(ArgumentError, match="needs a refiner"):
        base(PROMPT, refiner_switch=0.7, **run)
    with pytest.raises(ArgumentError, match="Txt2ImgPipeline"):
        base(PROMPT, refiner="refiner.safetensors", **run)
    with pytest.raises(ArgumentError, match="latents"):  # another VAE scaling: another latent space
        base(PROMPT, refiner=tiny_pipeline(), **run)
    image, mask = Image.new("RGB", (32, 32), "red"), Image.new("L", (32, 32), 255)
    with pytest.raises(ArgumentError, match="inpainting"):
        base(PROMPT, image=image, mask_image=mask, refiner=refiner, **run)
    with pytest.raises(ArgumentError, match="hires"):
        base(PROMPT, hires_scale=2, refiner=refiner, **run)


# ---------------------------------------------------------------------------------------------
# txt2img --refiner
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folders(base_and_refiner, tmp_path_factory):
    """The tiny base and refiner as our own folders side by side: models/base, models/refiner."""
    base, refiner, _ = base_and_refiner
    models = tmp_path_factory.mktemp("models")
    base.save_pretrained(models / "base")
    refiner.save_pretrained(models / "refiner")
    return models


def test_txt2img_refiner_writes_a1111_fields_and_from_png_regenerates(base_and_refiner, model_folders, tmp_path,
                                                                       monkeypatch):
    from PIL import Image

    from ldm.cli import txt2img
    from ldm.images import read_a1111_parameters

    base, refiner, _ = base_and_refiner
    common = ["--model", str(model_folders / "base"), "--quiet"]
    assert txt2img.main([PROMPT, *common, "--refiner", str(model_folders / "refiner"), "--refiner-switch", "0.6",
                         "--steps", "5", "--seed", "3", "--outdir", str(tmp_path / "first")]) == 0
    first = next((tmp_path / "first").glob("*.png"))
    fields = read_a1111_parameters(Image.open(first).info["parameters"])
    assert fields["Refiner"] == "refiner" and fields["Refiner switch at"] == "0.6"
    expected = base(PROMPT, steps=5, seed=3, refiner=refiner, refiner_switch=0.6)[0]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(expected))

    monkeypatch.chdir(tmp_path)  # the refiner is found beside --model, not in the current folder
    assert txt2img.main(["--from-png", str(first), *common, "--outdir", str(tmp_path / "again")]) == 0
    again = next((tmp_path / "again").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    assert read_a1111_parameters(Image.open(again).info["parameters"]) == fields


def test_txt2img_refiner_errors_are_one_line_exit_2(model_folders, tmp_path, capsys):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from ldm.cli import txt2img

    common = [PROMPT, "--model", str(model_folders / "base"), "--outdir", str(tmp_path), "--quiet"]
    refiner = ["--refiner", str(model_folders / "refiner")]
    for extra, message in ((refiner + ["--refiner-switch", "1"], "between 0 and 1"),
                           (refiner + ["--refiner-switch", "0"], "between 0 and 1"),
                           (refiner + ["--refiner-switch", "nan"], "finite"),
                           (["--refiner-switch", "0.5"], "needs --refiner"),
                           (["--refiner", str(tmp_path / "missing")], "does not exist"),
                           (refiner + ["--hires-scale", "2"], "hires fix")):
        assert _exit_code(txt2img.main, common + extra) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and message in error, error
    info = PngInfo()
    info.add_text("parameters", f"{PROMPT}\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 32x32, "
                  "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8")
    Image.new("RGB", (32, 32)).save(tmp_path / "made-elsewhere.png", pnginfo=info)
    assert _exit_code(txt2img.main, ["--from-png", str(tmp_path / "made-elsewhere.png"), *common[1:]]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "'sd_xl_refiner_1.0'" in error and "--refiner" in error, error


def _exit_code(main, argv: list[str]) -> int:
    """The command's exit code: usage errors exit from argparse, errors found later are returned."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code
