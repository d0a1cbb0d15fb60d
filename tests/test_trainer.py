"""The general training entry point (ldm/training/trainer.py, scripts/train.py) on tiny models and a tiny image folder."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_pipeline, write_bad_image_folder, write_run_config
from ldm.training import run_state
from ldm.errors import ConfigError
from ldm.training.run_config import apply_overrides, parse_run_config, read_run_config
from ldm.training.trainer import diffusion_loss_on_batch, train

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny pretrained model folder and an image folder (metadata.jsonl) of 8 two-colour images."""
    root = tmp_path_factory.mktemp("trainer")
    tiny_pipeline(seed=0).save_pretrained(root / "base")
    images = root / "images"
    images.mkdir()
    rows = []
    for i in range(8):
        name, colour = list(COLOURS.items())[i % 4]
        image = Image.new("RGB", (40, 32) if i % 2 else (32, 32), colour)
        image.paste((255, 255, 255), (8, 8, 20, 20))
        image.save(images / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a white square on {name}"})
    # Bad data the run must survive and report: a corrupt file, a 16-bit grayscale image without a
    # caption row's text, a unicode caption.
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(images / "deep.png")
    rows += [{"file_name": "broken.png", "text": "never seen"}, {"file_name": "deep.png", "text": ""}]
    Image.new("RGB", (32, 48), (250, 250, 250)).save(images / "unicode.png")
    rows.append({"file_name": "unicode.png", "text": "ein weißes Quadrat, 白い四角 ✓"})
    (images / "metadata.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                                           encoding="utf-8")
    return root


def write_config(root: Path, name: str, **sections) -> Path:
    config = {
        "model": {"init": str(root / "base")},
        "data": {"kind": "folder", "source": str(root / "images"), "resolution": 32, "crop": "center"},
        "training": {"batch_size": 3, "steps": 6, "lr": 2e-3, "final_lr": 2e-4, "warmup_steps": 1,
                     "checkpoint_every": 3, "ema_decay": 0.9, "train_text_encoder": False},
        "output": {"path": str(root / name / "model"), "dtype": "float32"},
    }
    return write_run_config(root / f"{name}.yaml", config, **sections)


# ---------------------------------------------------------------------- config


def test_overrides_are_dotted_yaml_values_and_unknown_keys_are_named(workspace):
    data = {"training": {"lr": 1.0}}
    apply_overrides(data, ["training.lr=1e-4", "training.lora.rank=4", "validation.prompts=[a, b]"])
    assert data == {"training": {"lr": 1e-4, "lora": {"rank": 4}}, "validation": {"prompts": ["a", "b"]}}
    path = write_config(workspace, "cfg")
    config = read_run_config(path, ["training.lr=1e-4", "training.lora.rank=4", "data.bucketing=true"])
    assert config.training.lr == 1e-4 and config.training.lora.rank == 4 and config.data.bucketing is True
    for override, named in (("training.lrr=1", "'training.lrr'"), ("training.lora.rnak=2", "'training.lora.rnak'"),
                            ("datta.kind=folder", "'datta'"), ("model.unet.channels=4", "model.init and model.unet")):
        with pytest.raises(ConfigError, match=named):
            read_run_config(path, [override])
    assert read_run_config(path, ["run_dir=runs/x"]).run_dir == "runs/x"
    with pytest.raises(ConfigError, match="text_encoder_lr is set but the text encoder is not trained"):
        read_run_config(path, ["training.text_encoder_lr=1e-5"])  # the workspace config freezes it
    config = read_run_config(path, ["training.text_encoder_lr=5e-4", "training.train_text_encoder=true"])
    from ldm.training.trainer import parameter_groups

    groups = parameter_groups({"unet": torch.nn.Linear(2, 2), "text_encoder": torch.nn.Linear(2, 3)}, config.training)
    assert [g["lr_scale"] for g in groups] == [1.0, 5e-4 / config.training.lr] and len(groups[1]["params"]) == 2
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["training.lr"])
    with pytest.raises(ConfigError, match="unknown key 'model.unet.model_chanels'"):
        parse_run_config({"model": {"unet": {"model_chanels": 4}}, "vae": "runs/vae"})
    with pytest.raises(ConfigError, match="data.kind"):
        parse_run_config({"model": {"init": "x"}, "data": {"kind": "webdataset"}})


def test_script_reports_a_config_mistake_in_one_line(workspace, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train as train_script
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    code = train_script.main(["--config", str(write_config(workspace, "cli")), "training.bogus=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "unknown key 'training.bogus'" in err


def test_the_shipped_configs_parse():
    for name in ("default-model", "default-model-vpred", "finetune-example", "lora-example", "moon-finetune",
                 "moon-lora"):
        read_run_config(ROOT / "configs" / f"{name}.yaml")
    assert read_run_config(ROOT / "configs" / "lora-example.yaml").training.lora.rank == 8


# ---------------------------------------------------------------------- end to end


def test_data_mistakes_stop_before_training(workspace):
    hub = read_run_config(write_config(workspace, "hub", data={"kind": "hub", "source": "someone/captions"}))
    with pytest.raises(ConfigError, match="offline"):
        train(hub, workspace / "hub", progress=False)
    column = read_run_config(write_config(workspace, "column", data={"caption_column": "caption"}))
    with pytest.raises(ConfigError, match="caption column 'caption'"):
        train(column, workspace / "column", progress=False)
    assert not run_state.list_checkpoints(workspace / "hub") and not run_state.list_checkpoints(workspace / "column")


def test_fine_tune_into_a_zero_terminal_snr_v_model(workspace):
    schedule = {"prediction": "v", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    path = write_config(workspace, "vpred", model={"schedule": schedule},
                        training={"steps": 2, "checkpoint_every": 2, "min_snr_gamma": None})
    train(read_run_config(path), workspace / "vpred", progress=False)
    from ldm.pipeline import Txt2ImgPipeline

    tuned = Txt2ImgPipeline.from_pretrained(workspace / "vpred" / "model")
    assert tuned.config.schedule.prediction == "v" and tuned.config.schedule.rescale_betas_zero_snr
    base = Txt2ImgPipeline.from_pretrained(workspace / "base")
    assert tuned.config.schedule.steps_offset == base.config.schedule.steps_offset  # keys not given are kept
    assert tuned(["a white square on red"], steps=3, seed=0)[0].size == (32, 32)
    with pytest.raises(ConfigError, match="needs prediction 'v'"):
        train(read_run_config(path, ["model.schedule.prediction=eps"]), workspace / "eps", progress=False)
    with pytest.raises(ConfigError, match="'model.schedule.predicton'"):
        read_run_config(path, ["model.schedule.predicton=v"])


def mean_loss(model_dir: Path, workspace: Path) -> float:
    """Unweighted diffusion loss of a model on all 8 images, over fixed timesteps and noise."""
    from ldm.training.data import ImageCaptionDataset, collate_batch, load_image_caption_dataset
    from ldm.pipeline import Txt2ImgPipeline
    from ldm.training.run_config import TrainSettings

    pipe = Txt2ImgPipeline.from_pretrained(model_dir)
    dataset = ImageCaptionDataset(load_image_caption_dataset(workspace / "images"), resolution=32)
    batch = collate_batch([dataset[i] for i in range(len(dataset))])
    settings = TrainSettings(caption_dropout=0.0, min_snr_gamma=None)
    with torch.no_grad():
        z = pipe.vae.encode_latents(batch["pixel_values"])
        losses = [diffusion_loss_on_batch(pipe.unet, pipe.text_encoder, pipe.text_encoder.tokenizer, pipe.schedule,
                                          z, batch["captions"], settings, torch.Generator().manual_seed(seed))
                  for seed in range(6)]
    return float(torch.stack(losses).mean())


def test_folder_fine_tune_lowers_the_loss_and_saves_both_formats(workspace, caplog):
    caplog.set_level(logging.INFO)
    path = write_config(workspace, "full", training={"steps": 40, "checkpoint_every": 20, "ema_decay": None},
                        validation={"prompts": ["a white square on red"], "every": 40},
                        output={"diffusers": True})
    result = train(read_run_config(path), workspace / "full", progress=False)
    assert result.step == 40 and len(result.losses) == 40
    report = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    assert report and "10 of 11 images used" in report[0] and "1 unreadable skipped" in report[0]
    assert "1 missing/empty captions" in report[0]
    before, after = mean_loss(workspace / "base", workspace), mean_loss(workspace / "full" / "model", workspace)
    print(f"fixed-batch loss {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before, f"loss {before:.4f} -> {after:.4f}"
    assert (workspace / "full" / "validation" / "step-0000040.png").is_file()
    assert (workspace / "full" / "model-diffusers" / "model_index.json").is_file()
    assert json.loads((workspace / "full" / "model" / "training.json").read_text())["steps"] == 40


def test_training_on_every_kind_of_bad_data_reports_what_it_skipped(workspace, caplog):
    """Corrupt, truncated, empty, tiny, huge, 16-bit, RGBA, palette and grayscale files, missing and
    unicode captions: the run trains (with buckets, random crops and flips) and says what it skipped."""
    caplog.set_level(logging.INFO)
    write_bad_image_folder(workspace / "bad-images")
    path = write_config(workspace, "bad", data={"source": str(workspace / "bad-images"), "bucketing": True,
                                                "crop": "random", "random_flip": True},
                        training={"steps": 4, "checkpoint_every": 2})
    result = train(read_run_config(path), workspace / "bad", progress=False)
    assert result.step == 4 and all(math.isfinite(loss) for loss in result.losses)
    report = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    assert report and "8 of 12 images used" in report[0], report
    assert "3 unreadable skipped" in report[0] and "1 too small" in report[0]
    assert "2 missing/empty captions" in report[0]


def test_lora_mode_writes_a_small_file_that_load_lora_reads(workspace):
    from ldm.formats.lora import load_lora
    from ldm.pipeline import Txt2ImgPipeline

    path = write_config(workspace, "lora", training={"steps": 4, "checkpoint_every": 2, "lr": 1e-2,
                                                      "gradient_accumulation": 2, "gradient_checkpointing": True,
                                                      "lora": {"rank": 2, "alpha": 2, "text_encoder": True,
                                                               "unet_targets": ["to_k", "to_v", "ff.net.2"]}})
    train(read_run_config(path), workspace / "lora", progress=False)
    lora_file = workspace / "lora" / "model" / "lora.safetensors"
    from safetensors import safe_open

    with safe_open(lora_file, "pt") as handle:
        unet_layers = {k.split(".")[0] for k in handle.keys() if k.startswith("lora_unet_")}
    assert unet_layers and all(k.endswith(("to_k", "to_v", "ff_net_2")) for k in unet_layers), unet_layers
    assert any(k.endswith("ff_net_2") for k in unet_layers)
    base_size = (workspace / "base" / "model.safetensors").stat().st_size
    assert lora_file.stat().st_size < base_size / 4
    weights, _ = run_state.load_latest_checkpoint(workspace / "lora")
    assert weights and all(".lora_" in key for key in weights)  # checkpoints hold only the adapters

    pipe = Txt2ImgPipeline.from_pretrained(workspace / "base")
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    context = pipe.encode_prompt(["a white square on red"])
    base_out = pipe.unet(x, t, context)
    load_lora(pipe, lora_file)
    adapted = pipe.unet(x, t, pipe.encode_prompt(["a white square on red"]))
    assert (adapted - base_out).abs().max() > 1e-4  # the trained adapters change the model


def test_resume_restores_data_position_optimizer_and_rng(workspace):
    path = write_config(workspace, "resume", data={"random_flip": True, "crop": "random", "bucketing": True})
    config = read_run_config(path)
    train(config, workspace / "straight", progress=False)
    train(config, workspace / "interrupted", progress=False, overwrite=True)  # the same output as "straight"
    state = torch.load(workspace / "interrupted" / "checkpoints" / "step-0000003" / "state.pt", weights_only=True)
    assert state["data"]["batches_done"] == 3 and state["step"] == 3
    shutil.rmtree(workspace / "interrupted" / "checkpoints" / "step-0000006")  # as if killed after step 3
    result = train(config, workspace / "interrupted", resume="latest", progress=False)
    assert result.step == 6 and len(result.losses) == 3
    a = run_state.load_latest_checkpoint(workspace / "straight")[0]
    b = run_state.load_latest_checkpoint(workspace / "interrupted")[0]
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, f"resumed run diverged (max abs diff {worst:.2e})"
    # (Not restoring the data position replays epoch 0: max abs diff ~3e-3.)
    assert run_state.load_latest_checkpoint(workspace / "interrupted")[1]["data"]["batches_done"] == 6
    shutil.rmtree(workspace / "resume" / "model")
    exported = train(config, workspace / "interrupted", export_only=True, progress=False)
    assert exported.step == 6 and (exported.output / "model.safetensors").is_file()


@pytest.mark.slow
def test_command_line_run_with_bf16_autocast_and_export(workspace):
    """scripts/train.py in a fresh process (accelerate's mixed-precision state is per process)."""
    path = write_config(workspace, "bf16", training={"steps": 2, "checkpoint_every": 1, "mixed_precision": "bf16"})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(path), "--run-dir",
                           str(workspace / "bf16"), "--threads", "1", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [s for s, _ in run_state.list_checkpoints(workspace / "bf16")] == [1, 2]  # keep_checkpoints=2
    assert (workspace / "bf16" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_train_data_parallel_and_only_rank_0_writes(workspace):
    """Two processes under ``torchrun`` with ``ACCELERATE_USE_CPU`` (accelerate's DDP over gloo, the
    same code path as ``accelerate launch`` on several GPUs): each optimizer step counts both
    processes' batches, and rank 0 alone logs, writes checkpoints and exports the model."""
    path = write_config(workspace, "ddp", training={"steps": 4, "checkpoint_every": 2},
                        data={"bucketing": True, "random_flip": True, "crop": "random"})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "scripts" / "train.py"), "--config", str(path), "--run-dir",
                           str(workspace / "ddp"), "--threads", "1", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [s for s, _ in run_state.list_checkpoints(workspace / "ddp")] == [2, 4]
    note = json.loads((workspace / "ddp" / "model" / "training.json").read_text())
    assert note["steps"] == 4 and note["samples_seen"] == 4 * 3 * 2  # batch 3 per process, 2 processes
    state = torch.load(workspace / "ddp" / "checkpoints" / "step-0000004" / "state.pt", weights_only=True)
    assert state["step"] == 4
    assert done.stderr.count("saved checkpoint") == 2 and done.stderr.count("data: ") == 1  # rank 0 only
