"""The txt2img command's stages: the super-resolution stage after the base model (cascade) and classifier
guidance, through the library and the command line (tiny random upscaler/classifier, the shipped base model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli.stages import DEFAULT_UPSCALER
from ldm.cli.txt2img import main as txt2img
from ldm.errors import ArgumentError
from ldm.formats.classifier import save_classifier
from ldm.models.noisy_classifier import ClassifierConfig, NoisyLatentClassifier
from ldm.pipeline import Txt2ImgPipeline
from ldm.sampling.classifier_guidance import ClassifierGuidance
from ldm.training.noisy_classifier import HEADS
from tests.test_upscaler import tiny_upscaler


@pytest.fixture(scope="module")
def base():
    return Txt2ImgPipeline.from_pretrained()


@pytest.fixture(scope="module")
def upscaler_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upscaler") / "tiny-x4"
    tiny_upscaler().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = NoisyLatentClassifier(ClassifierConfig(channels=(16, 32), norm_groups=8, heads=HEADS))
    return save_classifier(model, tmp_path_factory.mktemp("classifier") / "clf")


def test_cascade_cli_writes_the_upscaled_image_the_library_draws(base, upscaler_folder, tmp_path, capsys):
    args = ["a red bicycle", "--steps", "3", "--upscaler", str(upscaler_folder), "--upscale-steps", "2",
            "--upscale-noise-level", "30", "--seed", "5", "--outdir", str(tmp_path), "--quiet"]
    assert txt2img(args) == 0
    written = Image.open(tmp_path / "00000-5.png")
    assert written.size == (256, 256)
    parameters = written.text["parameters"]
    assert "Size: 64x64" in parameters and "Upscaler: tiny-x4" in parameters
    assert "Noise level: 30" in parameters and "Upscale steps: 2" in parameters
    small = base("a red bicycle", steps=3, seed=5)
    upscaler = Txt2ImgPipeline.from_pretrained(upscaler_folder)
    expected = upscaler.upscale(small, "a red bicycle", seed=5, steps=2, noise_level=30)[0]
    assert (np.asarray(written.convert("RGB")) == np.asarray(expected)).all()


@pytest.mark.skipif(not DEFAULT_UPSCALER.is_dir(), reason="the default upscaler is not in this checkout")
def test_default_model_writes_256_pixels_and_base_only_64(tmp_path):
    assert txt2img(["a red bicycle", "--steps", "2", "--upscale-steps", "2", "--outdir", str(tmp_path / "a"),
                    "--quiet"]) == 0
    assert Image.open(tmp_path / "a" / "00000-0.png").size == (256, 256)
    assert txt2img(["a red bicycle", "--steps", "2", "--base-only", "--outdir", str(tmp_path / "b"), "--quiet"]) == 0
    assert Image.open(tmp_path / "b" / "00000-0.png").size == (64, 64)


@pytest.mark.parametrize("extra, message", [
    (["--base-only", "--upscaler", "UPSCALER"], "exclude each other"),
    (["--upscaler", "BASE"], "not a super-resolution model"),
    (["--upscale-steps", "0"], "--upscale-steps must be at least 1"),
    (["--class", "red bicycle"], "--class needs --classifier-scale"),
    (["--classifier-scale", "3"], "--classifier-scale needs --class"),
    (["--classifier-scale", "3", "--class", "green spaceship", "--classifier", "CLASSIFIER"], "not known"),
    (["--classifier", "/no/such/folder", "--classifier-scale", "1", "--class", "red"], "does not exist"),
])
def test_stage_flags_bad_inputs_are_one_line_errors(extra, message, upscaler_folder, classifier_folder, tmp_path,
                                                    capsys):
    paths = {"UPSCALER": str(upscaler_folder), "BASE": str(DEFAULT_UPSCALER.parent / "default_model"),
             "CLASSIFIER": str(classifier_folder)}
    argv = ["a red bicycle", "--steps", "2", "--outdir", str(tmp_path / "out"), "--quiet",
            *[paths.get(a, a) for a in extra]]
    try:
        code = txt2img(argv)
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_classifier_guidance_in_the_pipeline(base, classifier_folder):
    """Scale 0 changes nothing; a positive scale moves the sampler towards the class (the classifier's
    log-probability of the target on the final latents rises); misuse is a one-line ArgumentError."""
    from ldm.formats.classifier import load_classifier

    classifier = load_classifier(classifier_folder)
    guidance = ClassifierGuidance(classifier, "red bicycle")
    labels = guidance.labels()
    plain = base("a red bicycle", steps=4, seed=1, output_type="pt")
    assert torch.equal(base("a red bicycle", steps=4, seed=1, classifier_guidance=guidance, classifier_scale=0,
                            output_type="pt"), plain)

    def final_log_prob(scale: float) -> float:
        last = []
        base("a red bicycle", steps=4, seed=1, classifier_guidance=guidance, classifier_scale=scale,
             preview=last.append)
        with torch.no_grad():
            return classifier.log_prob(last[-1], torch.zeros(1), labels).item()

    assert final_log_prob(300.0) > final_log_prob(0.0) + 0.2  # measured: -4.38 -> -4.06 (random classifier)
    with pytest.raises(ArgumentError, match="needs classifier_guidance"):
        base("a red bicycle", classifier_scale=2)
    wrong = NoisyLatentClassifier(ClassifierConfig(in_channels=3, channels=(8,), norm_groups=4, heads=HEADS))
    with pytest.raises(ArgumentError, match="3-channel"):
        base("a red bicycle", classifier_guidance=ClassifierGuidance(wrong, "red"), classifier_scale=1)
