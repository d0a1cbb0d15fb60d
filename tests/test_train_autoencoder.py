"""scripts/toy/train_autoencoder.py on a tiny config: three resumable stages and --update-model."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import yaml

from conftest import tiny_pipeline_config
from ldm.formats import checkpoints
from ldm.training import run_state

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "toy"))

import train_autoencoder  # noqa: E402

TINY = {
    "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 4,
              "mid_attention": False, "latent_channels": 4, "scaling_factor": 1.0},
    "training": {"pool_size": 24, "crop_size": 16, "batch_size": 4, "steps": 3, "warmup_steps": 1,
                 "checkpoint_every": 3, "eval_images": 8},
    "decoder_finetune": {"steps": 2, "batch_size": 2, "crop_size": 32, "warmup_steps": 1, "checkpoint_every": 2},
    "joint_finetune": {"steps": 2, "batch_size": 2, "crop_size": 32, "warmup_steps": 1, "checkpoint_every": 1,
                       "anchor_weight": 1.0},
}


def test_three_stages_then_update_a_model_folder_in_place(tmp_path):
    config = tmp_path / "vae.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert train_autoencoder.main(["--config", str(config), "--run-dir", str(run), "--threads", "1"]) == 0
    assert [s for s, _ in run_state.list_checkpoints(run / "joint")] == [1, 2]
    trained = checkpoints.load_state_dict(run / "vae.safetensors")
    stage2 = run_state.load_latest_checkpoint(run / "decoder")[0]
    assert any(not torch.equal(trained[k], stage2[k]) for k in trained if k.startswith("encoder."))  # stage 3 ran
    meta = yaml.safe_load((run / "vae.yaml").read_text())

    # A pipeline folder whose autoencoder has the trained architecture, with a card and a training note.
    from autoencoder.model import AutoencoderConfig
    from ldm.pipeline import Txt2ImgPipeline

    pipe_config = dataclasses.replace(tiny_pipeline_config(), vae=AutoencoderConfig.from_dict(meta["model"]))
    folder = tmp_path / "model"
    Txt2ImgPipeline.from_config(pipe_config).save_pretrained(folder, dtype=torch.float16)
    (folder / "MODEL_CARD.md").write_text("card\n")
    (folder / "training.json").write_text(json.dumps({"steps": 7}))
    unet_before = Txt2ImgPipeline.from_pretrained(folder).unet.state_dict()

    # A folder that is not a pipeline, or whose autoencoder differs, is refused before any training.
    assert train_autoencoder.main(["--config", str(config), "--run-dir", str(tmp_path / "unused"),
                                   "--update-model", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "unused").exists()

    # Re-running resumes every finished stage and only updates the folder.
    assert train_autoencoder.main(["--config", str(config), "--run-dir", str(run), "--threads", "1",
                                   "--update-model", str(folder)]) == 0
    updated = Txt2ImgPipeline.from_pretrained(folder)
    assert all(torch.equal(updated.vae.state_dict()[k], v.half().float()) for k, v in trained.items())
    assert all(torch.equal(updated.unet.state_dict()[k], v) for k, v in unet_before.items())
    assert (folder / "MODEL_CARD.md").read_text() == "card\n"
    assert json.loads((folder / "training.json").read_text()) == {"steps": 7}
    stored = checkpoints.load_state_dict(folder / "model.safetensors")
    assert next(iter(stored.values())).dtype == torch.float16
