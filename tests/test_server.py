"""The HTTP server (``scripts/serve.py``) as clients see it: the real server in a subprocess on a free
loopback port, started once for this module with basic auth, a small body limit and a models folder
holding a second (tiny random) model; the shipped default model at 64x64 with a few steps.

Oracles: the library's own :class:`~ldm.pipeline.Txt2ImgPipeline` (served images are bitwise its
images for the same settings), and an existing AUTOMATIC1111 client library (``webuiapi``) driving the
server unchanged.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from ldm.images import read_a1111_parameters
from ldm.server.process import ServerProcess
from tests.conftest import tiny_pipeline

USER, PASSWORD = "tester", "s3cret"
AUTH = (USER, PASSWORD)
BODY_LIMIT_MB = 1
SIZE, STEPS = 64, 4


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    tiny_pipeline().save_pretrained(folder / "tiny")
    return folder


@pytest.fixture(scope="module")
def server(models_dir):
    """The base URL of a running server; no traceback may reach its log."""
    with ServerProcess(["--threads", "1", "--api-auth", f"{USER}:{PASSWORD}", "--models-dir", str(models_dir),
                        "--max-body-mb", str(BODY_LIMIT_MB), "--max-pixels", str(256 * 256),
                        "--max-steps", "150"]) as process:
        yield process.url
    assert not any("Traceback" in line for line in process.log), "".join(process.log)


@pytest.fixture(scope="module")
def pipe():
    from ldm.pipeline import Txt2ImgPipeline

    return Txt2ImgPipeline.from_pretrained()


def post(server: str, path: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(server + path, json=body, auth=AUTH, timeout=120, **kwargs)


def decode(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def encode(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def txt2img_body(**fields) -> dict:
    return {"prompt": "a red ball", "steps": STEPS, "width": SIZE, "height": SIZE, "seed": 7,
            "sampler_name": "Euler a", "cfg_scale": 2.0, **fields}


# ---------------------------------------------------------------------- the pipeline's hooks the server uses


def test_interrupt_returns_the_decoded_estimate_of_the_step_it_stopped_at():
    from ldm.image_inputs import to_pil

    pipe = tiny_pipeline()
    estimates, steps_seen = [], []
    images = pipe("a cat", seed=3, num_images=3, steps=6, sampler="euler",
                  progress=lambda done, total: steps_seen.append(done),
                  preview=lambda x0: estimates.append(x0.clone()), interrupt=lambda: len(estimates) >= 8)
    # image 0 ran its 6 steps; image 1 stopped after its 2nd step; image 2 never started
    assert len(images) == 2 and steps_seen == [1, 2, 3, 4, 5, 6, 7, 8] and estimates[0].shape == (1, 4, 16, 16)
    assert np.array_equal(pixels(images[1]), pixels(to_pil(pipe.decode(estimates[7]))[0]))
    full = pipe("a cat", seed=3, num_images=2, steps=6, sampler="euler")
    assert np.array_equal(pixels(images[0]), pixels(full[0]))  # the hooks change nothing else
    assert not np.array_equal(pixels(images[1]), pixels(full[1]))


# ---------------------------------------------------------------------- generation


def test_txt2img_equals_the_library_and_repeats_bitwise(server, pipe):
    first = post(server, "/sdapi/v1/txt2img", txt2img_body(n_iter=2))
    assert first.status_code == 200, first.text
    result = first.json()
    info = json.loads(result["info"])
    assert info["all_seeds"] == [7, 8] and info["seed"] == 7 and len(result["images"]) == 2
    images = [decode(text) for text in result["images"]]
    fields = read_a1111_parameters(images[1].info["parameters"])
    assert {key: fields[key] for key in ("Prompt", "Steps", "Sampler", "CFG scale", "Seed", "Size", "Model")} == {
        "Prompt": "a red ball", "Steps": "4", "Sampler": "Euler a", "CFG scale": "2", "Seed": "8", "Size": "64x64",
        "Model": "default"}
    assert info["infotexts"][1] == images[1].info["parameters"]
    assert result["parameters"]["prompt"] == "a red ball" and result["parameters"]["n_iter"] == 2
    for seed, image in zip((7, 8), images):
        expected = pipe("a red ball", seed=seed, steps=STEPS, sampler="euler_ancestral", guidance_scale=2.0,
                        height=SIZE, width=SIZE)[0]
        assert np.array_equal(pixels(image), pixels(expected)), seed
    again = post(server, "/sdapi/v1/txt2img", txt2img_body(n_iter=2)).json()
    assert again["images"] == result["images"]


@pytest.mark.parametrize("sampler_fields, library", [
    ({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}, {"sampler": "dpmpp_2m", "schedule": "karras"}),
    ({"sampler_name": "DPM++ 2M Karras"}, {"sampler": "dpmpp_2m", "schedule": "karras"}),  # the pre-1.9 name
    ({"sampler_name": "DDIM", "eta": 0.5}, {"sampler": "ddim", "eta": 0.5}),
])
def test_samplers_schedules_and_eta_reach_the_pipeline(server, pipe, sampler_fields, library):
    body = {**txt2img_body(), **sampler_fields}
    response = post(server, "/sdapi/v1/txt2img", body)
    assert response.status_code == 200, response.text
    expected = pipe("a red ball", seed=7, steps=STEPS, guidance_scale=2.0, height=SIZE, width=SIZE, **library)[0]
    assert np.array_equal(pixels(decode(response.json()["images"][0])), pixels(expected))


def test_img2img_and_inpainting_equal_the_library(server, pipe):
    start = pipe("a blue tree", seed=1, steps=STEPS, height=SIZE, width=SIZE)[0]
    body = txt2img_body(init_images=[encode(start)], denoising_strength=0.5, prompt="a red tree")
    response = post(server, "/sdapi/v1/img2img", body)
    assert response.status_code == 200, response.text
    served = decode(response.json()["images"][0])
    assert "Denoising strength: 0.5" in served.info["parameters"]
    assert response.json()["parameters"]["init_images"] is None  # as AUTOMATIC1111 without include_init_images
    expected = pipe("a red tree", image=start, strength=0.5, seed=7, steps=STEPS, sampler="euler_ancestral",
                    guidance_scale=2.0, height=SIZE, width=SIZE)[0]
    assert np.array_equal(pixels(served), pixels(expected))

    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    body.update(mask=encode(mask), denoising_strength=1.0, inpainting_fill=1, inpaint_full_res=False, mask_blur=2)
    response = post(server, "/sdapi/v1/img2img", body)
    assert response.status_code == 200, response.text
    served = decode(response.json()["images"][0])
    expected = pipe("a red tree", image=start, mask_image=mask, strength=1.0, mask_blur=2, seed=7, steps=STEPS,
                    sampler="euler_ancestral", guidance_scale=2.0, height=SIZE, width=SIZE)[0]
    assert np.array_equal(pixels(served), pixels(expected))
    assert np.array_equal(pixels(served)[:8], pixels(start)[:8])  # outside the mask: the input's pixels


def test_progress_moves_queue_positions_and_interrupt_stops_within_a_step(server):
    long_job = {}
    thread = threading.Thread(target=lambda: long_job.update(response=post(
        server, "/sdapi/v1/txt2img", txt2img_body(n_iter=8, steps=120, force_task_id="long"))))
    thread.start()
    seen = _poll_until(server, lambda p: p["state"]["sampling_step"] > 2 and p["current_image"])
    assert 0 < seen["progress"] < 1 and seen["state"]["job"] == "long" and seen["eta_relative"] > 0
    assert decode(seen["current_image"]).size == (SIZE, SIZE)
    later = _poll_until(server, lambda p: p["progress"] > seen["progress"])
    assert later["state"]["sampling_step"] != seen["state"]["sampling_step"] or later["state"]["job_no"] > 0

    short_job = {}
    waiter = threading.Thread(target=lambda: short_job.update(response=post(
        server, "/sdapi/v1/txt2img", txt2img_body(force_task_id="short"))))
    waiter.start()
    queued = _poll_task(server, "short", lambda p: p["queued"])
    assert queued["queue_position"] == 1 and not queued["active"]

    interrupted_at = time.monotonic()
    assert post(server, "/sdapi/v1/interrupt", {}).status_code == 200
    thread.join(timeout=60)
    stopped_after = time.monotonic() - interrupted_at
    response = long_job["response"]
    assert response.status_code == 200, response.text
    assert 1 <= len(response.json()["images"]) < 8  # the images done so far plus the interrupted one
    assert stopped_after < 5, stopped_after
    waiter.join(timeout=60)
    assert short_job["response"].status_code == 200  # the interrupt stopped only the running job
    assert len(short_job["response"].json()["images"]) == 1
    assert _poll_task(server, "short", lambda p: p["completed"])["progress"] == 1


def _poll_until(server: str, condition, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = requests.get(server + "/sdapi/v1/progress", auth=AUTH, timeout=30).json()
        if condition(progress):
            return progress
        time.sleep(0.05)
    pytest.fail(f"progress never reached the condition; last: { {k: v for k, v in progress.items() if k != 'current_image'} }")


def _poll_task(server: str, task: str, condition, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = post(server, "/internal/progress", {"id_task": task, "live_preview": False}).json()
        if condition(progress):
            return progress
        time.sleep(0.05)
    pytest.fail(f"task {task} never reached the condition; last: {progress}")


def test_a_client_that_disconnects_does_not_hold_the_queue(server):
    body = json.dumps(txt2img_body(n_iter=8, steps=150, force_task_id="gone")).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        credentials = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        connection.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Authorization: Basic {credentials}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                           + body)
        _poll_until(server, lambda p: p["state"]["job"] == "gone" and p["state"]["sampling_step"] > 0)
    started = time.monotonic()
    response = post(server, "/sdapi/v1/txt2img", txt2img_body())
    assert response.status_code == 200 and time.monotonic() - started < 10


def test_switching_models_from_the_models_folder(server):
    assert [m["title"] for m in requests.get(server + "/sdapi/v1/sd-models", auth=AUTH, timeout=30).json()] \
        == ["default", "tiny"]
    one_off = post(server, "/sdapi/v1/txt2img", txt2img_body(width=32, height=32,
                                                            override_settings={"sd_model_checkpoint": "tiny"}))
    assert one_off.status_code == 200, one_off.text
    assert "Model: tiny" in decode(one_off.json()["images"][0]).info["parameters"]
    assert requests.get(server + "/sdapi/v1/options", auth=AUTH, timeout=30).json()["sd_model_checkpoint"] == "default"
    try:
        assert post(server, "/sdapi/v1/options", {"sd_model_checkpoint": "tiny"}).status_code == 200
        assert requests.get(server + "/sdapi/v1/options", auth=AUTH, timeout=30).json()["sd_model_checkpoint"] == "tiny"
        image = decode(post(server, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2}).json()["images"][0])
        assert image.size == (32, 32)  # the tiny model's default size
    finally:
        assert post(server, "/sdapi/v1/options", {"sd_model_checkpoint": "default"}).status_code == 200


def test_png_info_reads_the_parameters(server, pipe):
    served = post(server, "/sdapi/v1/txt2img", txt2img_body(negative_prompt="blurry")).json()["images"][0]
    info = post(server, "/sdapi/v1/png-info", {"image": served}).json()
    assert info["info"].startswith("a red ball\nNegative prompt: blurry\nSteps: 4")
    assert info["parameters"]["Seed"] == "7" and info["parameters"]["Size-1"] == "64"


def test_lists(server):
    samplers = requests.get(server + "/sdapi/v1/samplers", auth=AUTH, timeout=30).json()
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in samplers}
    schedulers = requests.get(server + "/sdapi/v1/schedulers", auth=AUTH, timeout=30).json()
    assert {"Automatic", "Karras"} <= {s["label"] for s in schedulers}


# ---------------------------------------------------------------------- safety


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/sdapi/v1/options", "/sdapi/v1/progress", "/docs"])
def test_auth_guards_every_route(server, path):
    assert requests.get(server + path, timeout=30).status_code == 401
    wrong = requests.get(server + path, auth=(USER, "wrong"), timeout=30)
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(server + path, auth=(USER + "x", PASSWORD), timeout=30).status_code == 401
    assert requests.get(server + path, auth=AUTH, timeout=30).status_code == 200


def test_post_without_auth_is_refused_before_any_work(server):
    response = requests.post(server + "/sdapi/v1/txt2img", json=txt2img_body(), timeout=30)
    assert response.status_code == 401


@pytest.mark.parametrize("name", ["../tiny", "/etc/passwd", "tiny/../../default", str(Path.home()), "missing"])
def test_model_names_resolve_only_inside_the_models_folder(server, name):
    response = post(server, "/sdapi/v1/options", {"sd_model_checkpoint": name})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "sd_model_checkpoint"]
    response = post(server, "/sdapi/v1/txt2img", txt2img_body(override_settings={"sd_model_checkpoint": name}))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "override_settings", "sd_model_checkpoint"]


def test_oversized_bodies_are_refused_with_413(server):
    big = "A" * (BODY_LIMIT_MB * 1024 * 1024 + 1)
    response = post(server, "/sdapi/v1/img2img", {"init_images": [big]})
    assert response.status_code == 413

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(BODY_LIMIT_MB * 16 + 1):
            yield b" " * 65536

    response = requests.post(server + "/sdapi/v1/txt2img", data=chunks(), auth=AUTH, timeout=60,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize("fields, field", [
    ({"width": 1024, "height": 1024}, "width"),  # over --max-pixels
    ({"width": 60}, "width"),  # not a multiple of 8
    ({"steps": 151}, "steps"),
    ({"batch_size": 4, "n_iter": 5}, "batch_size"),
    ({"prompt": "x" * 4001}, "prompt"),
    ({"steps": "many"}, "steps"),  # wrong type
    ({"restore_faces": True}, "restore_faces"),  # a feature this server does not have
    ({"styles": ["cinematic"]}, "styles"),
    ({"sampler_name": "Nonexistent"}, "sampler_name"),
    ({"scheduler": "polyexponential"}, "scheduler"),
    ({"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, "hr_upscaler"),
    ({"enable_hr": True, "hr_scale": 8}, "hr_scale"),  # the second pass would pass --max-pixels
    ({"override_settings": {"sd_vae": "other.safetensors"}}, "override_settings.sd_vae"),
    ({"seed": -5}, "seed"),
    ({"bogus_field": 1}, "bogus_field"),  # AUTOMATIC1111 has no such field: never silently dropped
])
def test_bad_requests_get_422_naming_the_field(server, fields, field):
    response = post(server, "/sdapi/v1/txt2img", txt2img_body(**fields))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", *field.split(".")], response.text
    assert "Traceback" not in response.text


@pytest.mark.parametrize("fields, field", [
    ({}, "init_images"),
    ({"init_images": ["not base64 !"]}, "init_images.0"),
    ({"init_images": ["QUJD"]}, "init_images.0"),  # base64, but not an image
    ({"inpainting_fill": 2, "mask": "<mask>"}, "inpainting_fill"),
    ({"resize_mode": 1}, "resize_mode"),
    ({"init_images": ["<huge>"]}, "init_images.0"),  # an image over --max-pixels
])
def test_bad_img2img_requests_get_422_naming_the_field(server, fields, field):
    small = encode(Image.new("RGB", (SIZE, SIZE), "red"))
    replace = {"<mask>": small, "<huge>": encode(Image.new("RGB", (1024, 1024), "red"))}
    body = {**txt2img_body(init_images=[small]), **fields}
    if not fields:
        del body["init_images"]
    body = {key: ([replace.get(v, v) for v in value] if isinstance(value, list) else replace.get(value, value))
            for key, value in body.items()}
    response = post(server, "/sdapi/v1/img2img", body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", *(int(p) if p.isdigit() else p for p in field.split("."))], \
        response.text


def test_invalid_json_is_a_422(server):
    response = requests.post(server + "/sdapi/v1/txt2img", data=b"{not json", auth=AUTH, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "Traceback" not in response.text


# ---------------------------------------------------------------------- an existing client library


def test_webuiapi_drives_the_server_unchanged(server, pipe):
    import webuiapi

    host, port = server.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=STEPS, username=USER,
                            password=PASSWORD)
    assert "default" in api.util_get_model_names()
    assert "DPM++ 2M" in [sampler["name"] for sampler in api.get_samplers()]
    result = api.txt2img(prompt="a green ball", seed=11, width=SIZE, height=SIZE, cfg_scale=2)
    assert result.info["all_seeds"] == [11] and "Seed: 11" in result.image.info["parameters"]
    expected = pipe("a green ball", seed=11, steps=STEPS, sampler="euler_ancestral", guidance_scale=2,
                    height=SIZE, width=SIZE, schedule="Automatic")[0]  # webuiapi sends scheduler "automatic"
    assert np.array_equal(pixels(result.image), pixels(expected))
    redrawn = api.img2img(images=[result.image], prompt="a red ball", seed=3, width=SIZE, height=SIZE,
                          denoising_strength=0.6, cfg_scale=2)
    assert redrawn.image.size == (SIZE, SIZE) and "Denoising strength: 0.6" in redrawn.image.info["parameters"]
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (20, 20, 44, 44))
    inpainted = api.img2img(images=[result.image], mask_image=mask, prompt="a red ball", seed=3, width=SIZE,
                            height=SIZE, denoising_strength=1.0, cfg_scale=2)
    assert np.array_equal(pixels(inpainted.image)[:4], pixels(result.image)[:4])  # kept outside the mask


def test_cors_is_off_unless_asked(server):
    response = requests.get(server + "/sdapi/v1/options", auth=AUTH, timeout=30,
                            headers={"Origin": "http://elsewhere.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    preflight = requests.options(server + "/sdapi/v1/txt2img", auth=AUTH, timeout=30, headers={
        "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


# ---------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv, message", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 is not a loopback address: add --listen"),
    (["--host", "192.168.1.5"], "add --listen"),
    (["--api-auth", "nopassword"], "--api-auth takes USER:PASS"),
    (["--api-auth", "a:b,:c"], "--api-auth takes USER:PASS"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--models-dir", "/nonexistent/models"], "is not a folder"),
])
def test_serve_refuses_unsafe_or_bad_arguments_in_one_line(argv, message, capsys):
    from ldm.cli.serve import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    error = capsys.readouterr().err
    assert stop.value.code == 2 and message in error and error.count("\n") == 1, error


def test_serve_binds_loopback_by_default_and_everywhere_only_with_listen():
    from ldm.cli.serve import build_parser, check_arguments

    parser = build_parser()
    for argv, host in (([], "127.0.0.1"), (["--listen"], "0.0.0.0"), (["--host", "::1"], "::1"),
                       (["--listen", "--host", "10.0.0.2"], "10.0.0.2")):
        args = parser.parse_args(argv)
        check_arguments(parser, args)
        assert args.host == host, argv
