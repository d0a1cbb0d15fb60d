"""scripts/txt2img.py: outputs, PNG parameters, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_pipeline, write_random_lora

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "txt2img.py"


def load_script():
    """The command's module (``scripts/txt2img.py`` and ``tinysd-txt2img`` both call its ``main``)."""
    from ldm.cli import txt2img

    return txt2img


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "tiny-model"
    tiny_pipeline(seed=7).save_pretrained(folder)
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_writes_numbered_pngs_with_a1111_parameters_and_never_overwrites(tmp_path, model_dir, capsys):
    from ldm.images import read_a1111_parameters

    script = load_script()
    args = ["a red bicycle", "--model", str(model_dir), "--outdir", str(tmp_path), "--seed", "5",
            "--steps", "3", "--negative-prompt", "blurry, dark", "--quiet"]
    assert script.main(args) == 0
    assert script.main(args) == 0
    printed = capsys.readouterr().out.split()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00000-5.png", "00001-5.png"]
    assert [Path(p).name for p in printed] == files
    parameters = read_a1111_parameters(Image.open(tmp_path / "00000-5.png").text["parameters"])
    assert parameters["Prompt"] == "a red bicycle"
    assert parameters["Negative prompt"] == "blurry, dark"
    assert parameters["Steps"] == "3" and parameters["Seed"] == "5" and parameters["Size"] == "32x32"
    assert parameters["Sampler"] == "Euler" and parameters["CFG scale"] == "5"


def _unet_batch_sizes(monkeypatch) -> list[int]:
    """Record the batch size of every U-Net call (guidance doubles it: [uncond, cond])."""
    from ldm.models.unet import UNetModel

    sizes, forward = [], UNetModel.forward
    monkeypatch.setattr(UNetModel, "forward", lambda self, x, *a, **k: sizes.append(x.shape[0]) or forward(self, x, *a, **k))
    return sizes


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.int16)


def test_n_samples_use_consecutive_seeds_and_make_a_grid_bitwise_with_batch_size_1(tmp_path, model_dir, monkeypatch):
    from ldm.pipeline import Txt2ImgPipeline

    script = load_script()
    sizes = _unet_batch_sizes(monkeypatch)
    assert script.main(["a blue car", "--model", str(model_dir), "--outdir", str(tmp_path), "--seed", "20",
                        "--n-samples", "3", "--steps", "2", "--quiet"]) == 0
    assert set(sizes) == {2}  # one image (x2 for guidance) per U-Net call
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00000-20.png", "00001-21.png", "00002-22.png", "00003-grid.png"]
    pipe = Txt2ImgPipeline.from_pretrained(model_dir)
    for seed, name in zip((20, 21, 22), names):
        expected = pipe("a blue car", seed=seed, steps=2)[0]
        assert torch.equal(_pixels(expected), _pixels(Image.open(tmp_path / name)))
    assert Image.open(tmp_path / "00003-grid.png").size == (64, 64)


def test_batch_size_really_batches_and_stays_close_to_single_images(tmp_path, model_dir, monkeypatch):
    script = load_script()
    sizes = _unet_batch_sizes(monkeypatch)
    assert script.main(["a blue car", "--model", str(model_dir), "--outdir", str(tmp_path / "batched"), "--seed", "20",
                        "--n-samples", "3", "--batch-size", "2", "--steps", "2", "--quiet", "--no-grid"]) == 0
    assert sizes == [4, 4, 2, 2]  # seeds 20+21 together, then 22 alone; 2 steps each
    assert script.main(["a blue car", "--model", str(model_dir), "--outdir", str(tmp_path / "single"), "--seed", "20",
                        "--n-samples", "3", "--steps", "2", "--quiet", "--no-grid"]) == 0
    for name in ("00000-20.png", "00001-21.png", "00002-22.png"):
        difference = _pixels(Image.open(tmp_path / "batched" / name)) - _pixels(Image.open(tmp_path / "single" / name))
        assert difference.abs().max() <= 1  # float rounding of batched kernels, at most one uint8 level


def test_from_file_reads_one_prompt_per_line(tmp_path, model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star\n\na green tree\n", encoding="utf-8")
    out = tmp_path / "out"
    script = load_script()
    assert script.main(["--from-file", str(prompts), "--model", str(model_dir), "--outdir", str(out),
                        "--steps", "2", "--no-grid", "--quiet"]) == 0
    texts = [Image.open(p).text["parameters"].split("\n")[0] for p in sorted(out.iterdir())]
    assert texts == ["a red star", "a green tree"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["x", "--H", "36"], "--H must be a positive multiple of 8"),
        (["x", "--W", "0"], "--W must be a positive multiple of 8"),
        (["x", "--steps", "0"], "--steps must be at least 1"),
        (["x", "--sampler", "dpm_fast"], "unknown sampler 'dpm_fast'"),
        (["x", "--model", "/no/such/model/dir"], "model path not found"),
        (["x", "--model", "nobody/not-a-cached-model"], "could not download"),
        ([], "a prompt is required"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_corrupt_model_is_one_line_and_exit_code_2(tmp_path, model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    result = run_cli("x", "--model", str(broken), "--outdir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "corrupt or truncated" in result.stderr
    assert not (tmp_path / "out").exists()


def test_help_explains_the_prompt_language_and_chunks():
    result = run_cli("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "77 tokens" in text and "chunks of 75 tokens" in text and "BREAK" in text


def test_lora_flag_applies_the_adapter_with_its_scale(tmp_path, model_dir):
    from ldm.images import read_a1111_parameters
    from ldm.pipeline import Txt2ImgPipeline

    write_random_lora(Txt2ImgPipeline.from_pretrained(model_dir), tmp_path / "style.safetensors")

    script = load_script()
    common = ["a red star", "--model", str(model_dir), "--steps", "2", "--seed", "4", "--quiet"]
    for name, extra in (("base", []), ("zero", ["--lora", f"{tmp_path / 'style.safetensors'}:0"]),
                        ("full", ["--lora", str(tmp_path / "style.safetensors")])):
        assert script.main([*common, "--outdir", str(tmp_path / name), *extra]) == 0
    pixels = {name: list(Image.open(next((tmp_path / name).iterdir())).getdata()) for name in ("base", "zero", "full")}
    assert pixels["zero"] == pixels["base"]
    assert pixels["full"] != pixels["base"]
    text = Image.open(next((tmp_path / "full").iterdir())).text["parameters"]
    assert read_a1111_parameters(text)["LoRA"] == "style:1"


def test_missing_lora_file_is_one_line_and_exit_code_2():
    result = run_cli("x", "--lora", "/no/such/lora.safetensors:0.5")
    assert result.returncode == 2
    assert result.stderr.strip() == "txt2img.py: error: --lora file not found: /no/such/lora.safetensors"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A 32x32 image, a mask over its upper-left quarter, a wrong-size mask and a file that is not an image."""
    folder = tmp_path_factory.mktemp("pictures")
    Image.radial_gradient("L").resize((32, 32)).convert("RGB").save(folder / "image.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 16))
    mask.save(folder / "mask.png")
    Image.new("L", (16, 16), 255).save(folder / "small-mask.png")
    (folder / "not-an-image.png").write_text("hello")
    return folder


def test_img2img_and_inpaint_write_pngs_with_a1111_fields(tmp_path, model_dir, pictures):
    from ldm.cli import img2img, inpaint
    from ldm.images import read_a1111_parameters

    common = ["a blue car", "--model", str(model_dir), "--steps", "4", "--quiet"]
    assert img2img.main([*common, "--init-img", str(pictures / "image.png"), "--strength", "0.5",
                         "--outdir", str(tmp_path / "i2i")]) == 0
    assert inpaint.main([*common, "--image", str(pictures / "image.png"), "--mask", str(pictures / "mask.png"),
                         "--mask-blur", "2", "--outdir", str(tmp_path / "inpaint")]) == 0
    assert inpaint.main([*common, "--image", str(pictures / "image.png"), "--outpaint", "0,16,0,0",
                         "--outdir", str(tmp_path / "outpaint")]) == 0
    redrawn = Image.open(next((tmp_path / "i2i").glob("*.png")))
    assert read_a1111_parameters(redrawn.info["parameters"])["Denoising strength"] == "0.5"
    inpainted = Image.open(next((tmp_path / "inpaint").glob("*.png")))
    fields = read_a1111_parameters(inpainted.info["parameters"])
    assert fields["Mask blur"] == "2" and fields["Denoising strength"] == "1"
    original = np.asarray(Image.open(pictures / "image.png"))
    assert np.array_equal(np.asarray(inpainted)[24:, 24:], original[24:, 24:])  # far from the mask: untouched
    assert Image.open(next((tmp_path / "outpaint").glob("*.png"))).size == (48, 32)


@pytest.mark.parametrize(
    "mode, args, message",
    [
        ("img2img", ["--init-img", "{p}/missing.png"], "--init-img file not found"),
        ("img2img", ["--init-img", "{p}/not-an-image.png"], "is not a readable image"),
        ("img2img", ["--init-img", "{p}/image.png", "--strength", "1.5"], "--strength must be in (0, 1]"),
        ("img2img", [], "the following arguments are required: --init-img"),
        ("inpaint", ["--image", "{p}/image.png"], "--mask is required"),
        ("inpaint", ["--image", "{p}/image.png", "--mask", "{p}/small-mask.png"], "must be the same size"),
        ("inpaint", ["--image", "{p}/image.png", "--outpaint", "1,2"], "--outpaint takes LEFT,RIGHT,TOP,BOTTOM"),
    ],
)
def test_image_modes_bad_input_is_one_line_and_exit_code_2(pictures, mode, args, message):
    script = ROOT / "scripts" / f"{mode}.py"
    result = subprocess.run([sys.executable, str(script), "x", *(a.format(p=pictures) for a in args)],
                            capture_output=True, text=True, cwd=ROOT,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_empty_mask_is_one_line_and_exit_code_2(tmp_path, model_dir, pictures):
    Image.new("L", (32, 32), 0).save(tmp_path / "empty.png")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "inpaint.py"), "x", "--model", str(model_dir),
                             "--image", str(pictures / "image.png"), "--mask", str(tmp_path / "empty.png"),
                             "--outdir", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert "the mask is empty" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_from_png_regenerates_the_same_image(tmp_path, model_dir):
    from ldm.images import read_a1111_parameters

    script = load_script()
    assert script.main(["a (red:1.2) bicycle", "--negative-prompt", "blurry", "--model", str(model_dir),
                        "--steps", "3", "--sampler", "Euler a", "--scale", "4", "--seed", "11", "--clip-skip", "2",
                        "--karras", "--outdir", str(tmp_path / "first"), "--quiet"]) == 0
    first = next((tmp_path / "first").glob("*.png"))
    assert script.main(["--from-png", str(first), "--model", str(model_dir), "--outdir", str(tmp_path / "again"),
                        "--quiet"]) == 0
    again = next((tmp_path / "again").glob("*.png"))
    assert list(Image.open(again).getdata()) == list(Image.open(first).getdata())
    assert read_a1111_parameters(Image.open(again).info["parameters"]) == \
        read_a1111_parameters(Image.open(first).info["parameters"])
    assert script.main(["--from-png", str(first), "--seed", "12", "--model", str(model_dir),
                        "--outdir", str(tmp_path / "other"), "--quiet"]) == 0  # flags given win
    assert "Seed: 12" in Image.open(next((tmp_path / "other").glob("*.png"))).info["parameters"]


def test_from_png_without_parameters_is_one_line_and_exit_code_2(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    result = run_cli("--from-png", str(tmp_path / "plain.png"))
    assert result.returncode == 2 and "carries no AUTOMATIC1111 parameters" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_variation_seeds_are_recorded_per_image_and_regenerated_from_the_png(tmp_path, model_dir):
    from ldm.images import read_a1111_parameters

    script = load_script()
    assert script.main(["a red star", "--model", str(model_dir), "--steps", "2", "--seed", "3", "--subseed", "40",
                        "--subseed-strength", "0.3", "--n-samples", "2", "--no-grid", "--outdir", str(tmp_path / "v"),
                        "--quiet"]) == 0
    pngs = sorted((tmp_path / "v").glob("*.png"))
    fields = [read_a1111_parameters(Image.open(p).info["parameters"]) for p in pngs]
    assert [f["Variation seed"] for f in fields] == ["40", "41"] and fields[1]["Variation seed strength"] == "0.3"
    assert script.main(["--from-png", str(pngs[1]), "--model", str(model_dir), "--outdir", str(tmp_path / "again"),
                        "--quiet"]) == 0
    again = next((tmp_path / "again").glob("*.png"))
    assert list(Image.open(again).getdata()) == list(Image.open(pngs[1]).getdata())
