"""Training math (objective, EMA, lr schedule) and resumable, atomic checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ldm.training import objectives

from ldm.training import run_state
from ldm.training.ema import EMA

ROOT = Path(__file__).resolve().parent.parent


def test_add_noise_and_targets_invert_to_the_clean_latent():
    generator = torch.Generator().manual_seed(0)
    z, eps = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    abar = torch.tensor([0.999, 0.7, 0.2, 0.005], dtype=torch.float64)
    x_t = objectives.add_noise(z, eps, abar)
    a = abar.float().view(-1, 1, 1, 1)
    # eps target: z = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
    assert torch.allclose((x_t - (1 - a).sqrt() * eps) / a.sqrt(), z, atol=1e-4)
    # v target (Salimans & Ho 2022): z = sqrt(abar) x_t - sqrt(1 - abar) v
    v = objectives.training_target(z, eps, abar, "v")
    assert torch.allclose(a.sqrt() * x_t - (1 - a).sqrt() * v, z, atol=1e-5)
    assert torch.equal(objectives.training_target(z, eps, abar, "eps"), eps)


def test_min_snr_weights_follow_the_paper():
    abar = torch.tensor([0.99, 0.5, 0.01], dtype=torch.float64)
    snr = abar / (1 - abar)
    eps_w = objectives.min_snr_weights(abar, 5.0, "eps")
    v_w = objectives.min_snr_weights(abar, 5.0, "v")
    assert torch.allclose(eps_w.double(), snr.clamp(max=5) / snr, atol=1e-6)
    assert torch.allclose(v_w.double(), snr.clamp(max=5) / (snr + 1), atol=1e-6)
    assert torch.equal(objectives.min_snr_weights(abar, None, "eps"), torch.ones(3))


def test_caption_dropout_rate_and_determinism():
    captions = [f"caption {i}" for i in range(20000)]
    dropped = objectives.drop_captions(captions, 0.1, generator=torch.Generator().manual_seed(1))
    rate = sum(c == "" for c in dropped) / len(captions)
    assert abs(rate - 0.1) < 0.01
    again = objectives.drop_captions(captions, 0.1, generator=torch.Generator().manual_seed(1))
    assert dropped == again
    assert objectives.drop_captions(captions[:5], 0.0) == captions[:5]


def test_noise_offset_shifts_each_channel_mean():
    z = torch.zeros(512, 4, 8, 8)
    plain = objectives.sample_noise(z, generator=torch.Generator().manual_seed(0))
    offset = objectives.sample_noise(z, generator=torch.Generator().manual_seed(0), offset=0.5)
    channel_means = offset.mean(dim=(2, 3))
    assert abs(plain.mean(dim=(2, 3)).std().item() - 1 / 8) < 0.02  # 64 pixels: std of a mean = 1/8
    assert abs(channel_means.std().item() - math.sqrt(0.25 + 1 / 64)) < 0.05


def test_ema_tracks_the_average_with_warmup():
    model = torch.nn.Linear(3, 1, bias=False)
    ema = EMA(model, decay=0.9)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.ones(1, 3), atol=1e-6)
    clone = EMA(model, decay=0.9)
    clone.load_state_dict(ema.state_dict())
    assert clone.step == 200 and torch.equal(clone.shadow["weight"], ema.shadow["weight"])


def test_warmup_cosine_schedule_endpoints():
    lr = lambda s: run_state.warmup_cosine_lr(s, base_lr=1.0, warmup_steps=10, total_steps=110, final_lr=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0) and lr(60) == pytest.approx(0.55) and lr(110) == pytest.approx(0.1)


def test_checkpoint_write_is_atomic_and_keeps_the_last_k(tmp_path, monkeypatch):
    weights = {"w": torch.arange(4.0)}
    for step in (1, 2, 3):
        run_state.save_checkpoint(tmp_path, step, weights, {"optimizer": {}}, keep=2)
    assert [s for s, _ in run_state.list_checkpoints(tmp_path)] == [2, 3]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        run_state.save_checkpoint(tmp_path, 4, weights, {"optimizer": {}}, keep=2)
    assert [s for s, _ in run_state.list_checkpoints(tmp_path)] == [2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    loaded, state = run_state.load_latest_checkpoint(tmp_path)
    assert state["step"] == 3 and torch.equal(loaded["w"], weights["w"])


# ---------------------------------------------------------------------- end to end: kill and resume


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    """A tiny VAE folder, an image folder, and two tiny train.py configs (procedural / folder data)
    that train in seconds: ``procedural.yaml`` and ``folder.yaml``."""
    from PIL import Image

    from autoencoder.model import AutoencoderConfig, AutoencoderKL
    from ldm.formats.checkpoints import save_safetensors_atomic

    root = tmp_path_factory.mktemp("recipe")
    vae_config = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                                   mid_attention=False, scaling_factor=0.5)
    torch.manual_seed(0)
    save_safetensors_atomic(AutoencoderKL(vae_config).state_dict(), root / "vae" / "vae.safetensors")
    (root / "vae" / "vae.yaml").write_text(yaml.safe_dump({"model": vae_config.to_dict()}))
    config = yaml.safe_load((ROOT / "configs" / "default-model.yaml").read_text())
    config["model"]["unet"].update(model_channels=16, channel_mult=[1, 2], attention_resolutions=[2],
                                   num_heads=2, context_dim=32, norm_groups=8)
    config["model"]["text_encoder"].update(width=32, layers=1, heads=2, projection_dim=32)
    config["model"]["sampling"].update(height=32, width=32, steps=3)
    config.update(vae=str(root / "vae"), output=str(root / "out"))
    config["data"]["pool_size"] = 64
    config["training"].update(batch_size=4, steps=12, warmup_steps=2, checkpoint_every=2)
    (root / "procedural.yaml").write_text(yaml.safe_dump(config))

    images = root / "images"
    images.mkdir()
    rows = []
    for i in range(10):  # two aspect ratios -> two buckets; 10 images -> several epochs in 12 steps
        image = Image.new("RGB", (48, 32) if i % 2 else (32, 32), (25 * i, 255 - 20 * i, 90))
        image.save(images / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture number {i}"})
    (images / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config["data"] = {"kind": "folder", "source": str(images), "resolution": 32, "crop": "random",
                      "random_flip": True, "bucketing": True}
    config["output"] = str(root / "out-folder")
    (root / "folder.yaml").write_text(yaml.safe_dump(config))
    return root


def run_train(config: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), "--config",
                             str(config), "--run-dir", str(run_dir), "--threads", "1", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return run_state.load_latest_checkpoint(run_dir)[0]


@pytest.mark.slow
@pytest.mark.parametrize("data", ["procedural", "folder"])
def test_sigkill_and_resume_reaches_the_same_weights_as_an_uninterrupted_run(tiny_recipe, tmp_path, data):
    """At least five SIGKILLs at varying points after a checkpoint; on folder data the resumed runs
    must also continue the shuffled, bucketed, randomly cropped and flipped epochs where they were."""
    config = tiny_recipe / f"{data}.yaml"
    straight = run_train(config, tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    interrupted = tmp_path / "interrupted"
    kills = 0
    for _ in range(8):
        process = run_train(config, interrupted, "--overwrite")  # the output of the straight run
        deadline = time.time() + 120
        before = {s for s, _ in run_state.list_checkpoints(interrupted)}
        while time.time() < deadline and process.poll() is None:
            now = {s for s, _ in run_state.list_checkpoints(interrupted)}
            if now - before:  # a new checkpoint landed: kill at a random-ish point after it
                time.sleep(0.05 * (kills % 3))
                process.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.02)
        process.wait(timeout=60)
        for step, folder in run_state.list_checkpoints(interrupted):
            assert (folder / "weights.safetensors").is_file() and (folder / "state.pt").is_file()
        if process.returncode == 0:
            break
    final = run_train(config, interrupted, "--overwrite")
    assert final.wait(timeout=300) == 0, final.stderr.read()
    assert kills >= 5
    assert run_state.list_checkpoints(interrupted)[-1][0] == 12
    a, b = final_weights(tmp_path / "straight"), final_weights(interrupted)
    assert a.keys() == b.keys()
    # Same data, noise and optimizer state after every resume: the weights agree to float rounding
    # (~1e-7 seen; a lost or repeated batch moves them by ~1e-3).
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"resumed run diverged from the uninterrupted one (max abs diff {worst:.2e})"
    output = tiny_recipe / ("out" if data == "procedural" else "out-folder")
    note = json.loads((output / "training.json").read_text())
    assert note["steps"] == 12
