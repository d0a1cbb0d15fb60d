"""Bad input on the generation side ("nothing lost, nothing silent").

Every bad value of the txt2img / img2img / inpaint commands is refused with one line
(``prog: error: ...``) and exit code 2, before anything is written; every bad argument of the
Python API raises a ``ValueError`` (a package error) naming the argument; a PNG killed mid-write
never appears under a numbered name.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import tiny_pipeline, write_random_lora

ROOT = Path(__file__).resolve().parent.parent
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-inputs") / "tiny-model"
    tiny_pipeline(seed=7).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(model_dir):
    from ldm.pipeline import Txt2ImgPipeline

    return Txt2ImgPipeline.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory, pipe):
    """An image, a mask, a LoRA file with non-zero weights, a non-UTF-8 prompt file and a plain file."""
    folder = tmp_path_factory.mktemp("bad-input-files")
    Image.radial_gradient("L").resize((32, 32)).convert("RGB").save(folder / "image.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 16))
    mask.save(folder / "mask.png")
    write_random_lora(tiny_pipeline(seed=7), folder / "style.safetensors")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (folder / "a-file").write_text("not a folder")
    return folder


def run_command(mode: str, args: list[str], capsys) -> tuple[int, list[str]]:
    """Run the command in this process: (exit code, non-empty stderr lines). A traceback fails the test."""
    from ldm.cli import txt2img

    try:
        code = txt2img.main(args, mode=mode)
    except SystemExit as exit:
        code = exit.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_line_error(code: int, lines: list[str], prog: str, *fragments: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines


# ---------------------------------------------------------------------------------- 1. NaN and infinity


@pytest.mark.parametrize(
    "mode, args, fragments",
    [
        ("txt2img", ["--scale", "nan"], ("--scale", "'nan'")),
        ("txt2img", ["--scale", "inf"], ("--scale", "'inf'")),
        ("txt2img", ["--scale=-inf"], ("--scale", "'-inf'")),
        ("txt2img", ["--sampler", "ddim", "--eta", "nan"], ("--eta", "'nan'")),
        ("txt2img", ["--hires-scale", "nan"], ("--hires-scale", "'nan'")),
        ("txt2img", ["--hires-scale", "2", "--hires-strength", "nan"], ("--hires-strength", "'nan'")),
        ("txt2img", ["--lora", "{files}/style.safetensors:nan"], ("--lora", "'nan'")),
        ("txt2img", ["--lora", "{files}/style.safetensors:inf"], ("--lora", "'inf'")),
        ("img2img", ["--init-img", "{files}/image.png", "--strength", "nan"], ("--strength", "nan")),
        ("inpaint", ["--image", "{files}/image.png", "--mask", "{files}/mask.png", "--mask-blur", "nan"],
         ("--mask-blur", "'nan'")),
        ("inpaint", ["--image", "{files}/image.png", "--mask", "{files}/mask.png", "--mask-blur", "inf"],
         ("--mask-blur", "'inf'")),
    ],
)
def test_non_finite_float_option_is_one_line_and_exit_code_2(mode, args, fragments, model_dir, files, tmp_path,
                                                             capsys):
    out = tmp_path / "out"
    argv = ["a red star", "--model", str(model_dir), "--steps", "1", "--quiet", "--outdir", str(out),
            *(arg.format(files=files) for arg in args)]
    assert_one_line_error(*run_command(mode, argv, capsys), f"{mode}.py", *fragments)
    assert not out.exists()


@pytest.mark.parametrize(
    "keywords, name",
    [
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": float("inf")}, "guidance_scale"),
        ({"sampler": "ddim", "eta": float("nan")}, "eta"),
        ({"hires_scale": float("nan")}, "hires_scale"),
        ({"hires_scale": float("inf")}, "hires_scale"),
        ({"image": "image", "strength": float("nan")}, "strength"),
        ({"image": "image", "mask_image": "mask", "mask_blur": float("nan")}, "mask_blur"),
    ],
)
def test_non_finite_float_argument_raises_value_error_naming_it(pipe, files, keywords, name):
    pictures = {"image": Image.open(files / "image.png"), "mask": Image.open(files / "mask.png")}
    keywords = {key: pictures.get(value, value) if isinstance(value, str) else value
                for key, value in keywords.items()}
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number"):
        pipe("a red star", steps=1, **keywords)


# ------------------------------------------------------------------- 2. one-line errors, not tracebacks


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["x", "--seed", str(2**64)], ("--seed", str(2**64))),
        (["x", "--seed", "-2"], ("--seed", "-2")),
        (["x", "--seed", str(2**64 - 1), "--n-samples", "2", "--no-grid"], ("--seed", str(2**64))),
        (["--from-file", "{files}/latin1.txt"], ("--from-file", "not UTF-8", "0xe9")),
        (["x", "--outdir", "{files}/a-file"], ("--outdir", "a-file", "is a file")),
        (["x", "--outdir", "{files}/a-file/sub/folder"], ("--outdir", "a-file", "is a file")),
        (["x\udcff\udcfe"], ("prompt", "not valid UTF-8", "\\udcff")),
        (["x", "--negative-prompt", "\udce9t\udce9"], ("--negative-prompt", "not valid UTF-8", "\\udce9")),
    ],
)
def test_bad_command_line_value_is_one_line_and_exit_code_2(args, fragments, model_dir, files, tmp_path, capsys):
    argv = [arg.format(files=files) for arg in args]
    if "--outdir" not in argv:
        argv += ["--outdir", str(tmp_path / "out")]
    code, lines = run_command("txt2img", [*argv, "--model", str(model_dir), "--steps", "1", "--quiet"], capsys)
    assert_one_line_error(code, lines, "txt2img.py", *fragments)
    assert not (tmp_path / "out").exists()


def test_absurd_n_samples_is_refused_before_loading_the_model(tmp_path, capsys):
    # The old command started on 10**9 images; --model points nowhere to show the check comes first.
    code, lines = run_command("txt2img", ["x", "--n-samples", str(10**9), "--model", str(tmp_path / "missing"),
                                          "--outdir", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, lines, "txt2img.py", "--n-samples must be at most 10000", str(10**9))


@pytest.mark.skipif(os.access("/proc/sys", os.W_OK), reason="needs a read-only folder (/proc/sys)")
def test_outdir_in_a_read_only_folder_is_one_line_and_exit_code_2(model_dir, capsys):
    code, lines = run_command("txt2img", ["x", "--model", str(model_dir), "--outdir", "/proc/sys/ldm-outputs",
                                          "--steps", "1", "--quiet"], capsys)
    assert_one_line_error(code, lines, "txt2img.py", "--outdir /proc/sys/ldm-outputs is not writable")


def test_failed_png_write_is_one_line_and_exit_code_2(model_dir, tmp_path, monkeypatch, capsys):
    def disk_full(image, handle, filename):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(Image.SAVE, "PNG", disk_full)
    code, lines = run_command("txt2img", ["x", "--model", str(model_dir), "--outdir", str(tmp_path / "out"),
                                          "--steps", "1", "--quiet"], capsys)
    assert_one_line_error(code, lines, "txt2img.py", "cannot write into --outdir", "No space left on device")
    assert list((tmp_path / "out").iterdir()) == []


@NO_CUDA
@pytest.mark.parametrize("device, fragment", [("cuda", "--device 'cuda' is not available"),
                                              ("cuda:1", "--device 'cuda:1' is not available"),
                                              ("gpu", "--device 'gpu' is not a device name")])
def test_unusable_device_is_one_line_and_exit_code_2(device, fragment, model_dir, tmp_path, capsys):
    code, lines = run_command("txt2img", ["x", "--model", str(model_dir), "--device", device, "--quiet",
                                          "--outdir", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, lines, "txt2img.py", fragment)
    assert not (tmp_path / "out").exists()


def test_non_utf8_bytes_in_the_command_line_are_one_line_and_exit_code_2(model_dir, tmp_path):
    """The real thing: bytes of another encoding in argv (Python turns them into lone surrogates)."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "txt2img.py"), b"caf\xe9", "--model",
                             str(model_dir), "--outdir", str(tmp_path / "out"), "--steps", "1", "--quiet"],
                            capture_output=True, cwd=ROOT, env={**ENV, "LC_ALL": "C.UTF-8"})
    lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
    assert_one_line_error(result.returncode, lines, "txt2img.py", "the prompt is not valid UTF-8 text")
    assert not (tmp_path / "out").exists()


def test_seed_minus_one_draws_a_random_seed_and_records_it(model_dir, tmp_path, capsys):
    from ldm.images import read_a1111_parameters

    code, lines = run_command("txt2img", ["x", "--model", str(model_dir), "--outdir", str(tmp_path), "--seed", "-1",
                                          "--n-samples", "2", "--no-grid", "--steps", "1", "--quiet"], capsys)
    assert code == 0, lines
    names = sorted(path.name for path in tmp_path.iterdir())
    seeds = [int(re.fullmatch(r"\d{5}-(\d+)\.png", name).group(1)) for name in names]
    assert 0 <= seeds[0] < 2**32 and seeds[1] == seeds[0] + 1
    for name, seed in zip(names, seeds):
        assert read_a1111_parameters(Image.open(tmp_path / name).text["parameters"])["Seed"] == str(seed)


# ------------------------------------------------------------------------ 3. API arguments, clear errors


@pytest.mark.parametrize(
    "args, keywords, name",
    [
        ((), {"prompt": None}, "prompt"),
        ((123,), {}, "prompt"),
        ((["a", 5],), {}, "prompt"),
        (([],), {}, "prompt"),
        (("x", None), {}, "negative_prompt"),
        (("x",), {"num_images": 0}, "num_images"),
        (("x",), {"num_images": 10_001}, "num_images"),  # above MAX_IMAGES_PER_CALL
        (("x",), {"num_images": 2.0}, "num_images"),
        (("x",), {"steps": 0}, "steps"),
        (("x",), {"steps": 2.5}, "steps"),
        (("x",), {"height": 32.0}, "height"),
        (("x",), {"seed": -1}, "seed"),
        (("x",), {"seed": 2**64}, "seed"),
        (("x",), {"seed": 2**64 - 1, "num_images": 2}, "seed"),
        (("x",), {"seed": "7"}, "seed"),
    ],
)
def test_bad_call_argument_raises_value_error_naming_it(pipe, args, keywords, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        pipe(*args, **{"steps": 1, **keywords})


def test_largest_seed_still_works(pipe):
    image, = pipe("x", steps=1, seed=2**64 - 1, output_type="pt")
    assert torch.isfinite(image).all()


@NO_CUDA
def test_missing_cuda_raises_a_package_error_before_loading(model_dir, pipe):
    from ldm.errors import DeviceError, LdmError
    from ldm.pipeline import Txt2ImgPipeline

    assert issubclass(DeviceError, LdmError) and issubclass(DeviceError, ValueError)
    with pytest.raises(DeviceError, match=r"^device 'cuda' is not available"):
        Txt2ImgPipeline.from_pretrained(model_dir, device="cuda")
    with pytest.raises(DeviceError, match=r"^device 'cuda' is not available"):
        Txt2ImgPipeline.from_pretrained(model_dir.parent / "missing", device="cuda")  # checked first
    with pytest.raises(DeviceError, match=r"^device 'cuda' is not available"):
        pipe.to("cuda")
    assert pipe.device.type == "cpu"


# ------------------------------------------------------------------------------- 4. atomic PNG writes

FINAL_NAME = re.compile(r"^\d{5}-")
TEMPORARY = re.compile(r"^\.\d{5}-.*\.png\.tmp-\d+$")


def test_png_write_failing_midway_leaves_no_numbered_file(tmp_path, monkeypatch):
    from ldm.images import save_new_png

    def write_half_then_fail(image, handle, filename):
        handle.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
        raise OSError(28, "No space left on device")

    image = Image.new("RGB", (16, 16), "red")
    with monkeypatch.context() as patch:
        patch.setitem(Image.SAVE, "PNG", write_half_then_fail)
        with pytest.raises(OSError, match="No space left"):
            save_new_png(image, tmp_path, "5", "a red square")
    assert list(tmp_path.iterdir()) == []  # neither a truncated 00000-5.png nor the temporary
    path = save_new_png(image, tmp_path, "5", "a red square")
    assert path.name == "00000-5.png" and Image.open(path).text["parameters"] == "a red square"


SLOW_WRITER = """
import sys, time
from pathlib import Path
from PIL import Image
from ldm.images import save_new_png

def write_half_then_hang(image, handle, filename):
    handle.write(b"\\x89PNG\\r\\n\\x1a\\n" + b"\\x00" * 100)
    handle.flush()
    print("writing", flush=True)
    time.sleep(120)

Image.SAVE["PNG"] = write_half_then_hang
save_new_png(Image.new("RGB", (16, 16), "red"), Path(sys.argv[1]), "7")
"""

WRITER = """
import sys
from pathlib import Path
from PIL import Image
from ldm.images import save_new_png

print(save_new_png(Image.new("RGB", (16, 16), "blue"), Path(sys.argv[1]), "7").name)
"""


def test_png_writer_killed_midway_leaves_no_numbered_file_and_the_next_run_cleans_up(tmp_path):
    (tmp_path / "notes.png.tmp-1").write_text("not ours: stays")
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True, cwd=ROOT, env=ENV)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    left = sorted(path.name for path in tmp_path.iterdir())
    assert not [name for name in left if FINAL_NAME.match(name)], left
    assert [name for name in left if TEMPORARY.match(name)] == [f".00000-7.png.tmp-{child.pid}"]

    result = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path)], capture_output=True, text=True,
                            cwd=ROOT, env=ENV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "00000-7.png"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["00000-7.png", "notes.png.tmp-1"]
    assert Image.open(tmp_path / "00000-7.png").getpixel((0, 0)) == (0, 0, 255)


def test_only_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    from ldm.images import remove_stale_temporaries, temporary_name

    dead_pid = 2**30  # above any pid_max: no such process
    old = {"dead": temporary_name("00000-1.png", dead_pid), "ours": temporary_name("00001-1.png"),
           "alive": temporary_name("00002-1.png", os.getppid())}
    for name in old.values():
        (tmp_path / name).write_bytes(b"\x89PNG")
        os.utime(tmp_path / name, (1, 1))  # written long before this process started
    fresh = temporary_name("00003-1.png", dead_pid)  # written after this process started: not ours to judge
    (tmp_path / fresh).write_bytes(b"\x89PNG")
    (tmp_path / "00004-1.png").write_bytes(b"\x89PNG")
    removed = remove_stale_temporaries(tmp_path)
    # "ours": this pid did not exist when the file was written (a killed run's pid, reused)
    assert sorted(path.name for path in removed) == sorted([old["dead"], old["ours"]])
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([old["alive"], fresh, "00004-1.png"])


@pytest.mark.parametrize("args, message", [
    (["--n", "-5"], "--n must be at least 1"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--n", "3"], "cannot hold 5 prompts"),
])
def test_evaluate_bad_arguments_are_one_line_and_exit_code_2(args, message):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "toy" / "evaluate.py"), *args, "--quiet"],
                            capture_output=True, text=True, cwd=ROOT,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
