"""Nothing lost, nothing silent, on the training and conversion side: a run directory that holds another
run, outputs that another run (or the user) made, killed conversions, deflated ``.ckpt`` files, step
counts that train nothing or forever, and wrongly typed config values. Tiny models, seconds each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import tiny_pipeline, write_run_config
from ldm.cli.convert_checkpoint import main as convert_main
from ldm.cli.train import main as train_main
from ldm.errors import ConfigError
from ldm.formats.checkpoints import load_state_dict
from ldm.training import run_state
from ldm.training.run_config import read_run_config
from ldm.training.trainer import train

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "toy"))

import train_autoencoder  # noqa: E402


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny pretrained model folder and two folders of four captioned 32x32 images."""
    root = tmp_path_factory.mktemp("bad-inputs")
    tiny_pipeline(seed=0).save_pretrained(root / "base")
    for name, colour in (("images", (220, 30, 30)), ("other-images", (30, 60, 220))):
        (root / name).mkdir()
        rows = []
        for i in range(4):
            Image.new("RGB", (32, 32), tuple(c // (i + 1) for c in colour)).save(root / name / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "text": f"{name} number {i}"})
        (root / name / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def write_config(root: Path, name: str, **sections) -> Path:
    """A one-step full fine-tune of ``base`` on ``images`` exporting to ``root/name/model``."""
    config = {
        "model": {"init": str(root / "base")},
        "data": {"kind": "folder", "source": str(root / "images"), "resolution": 32},
        "training": {"batch_size": 2, "steps": 1, "warmup_steps": 1, "checkpoint_every": 1, "ema_decay": None,
                     "train_text_encoder": False},
        "output": {"path": str(root / name / "model"), "dtype": "float32"},
    }
    return write_run_config(root / f"{name}.yaml", config, **sections)


def one_line(text: str) -> str:
    assert text.count("\n") == 1 and text.endswith("\n"), text
    return text


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- 1. a run dir holding another run


def test_a_run_dir_holding_a_run_with_other_settings_is_not_resumed(workspace, capsys):
    path = write_config(workspace, "identity")
    run_dir = workspace / "identity-run"
    assert train_main(["--config", str(path), "--run-dir", str(run_dir), "--no-progress"]) == 0
    before = snapshot(run_dir / "checkpoints")
    capsys.readouterr()
    other = ["data.source=" + str(workspace / "other-images"), "training.seed=5",
             "output.path=" + str(workspace / "identity-other")]
    assert train_main(["--config", str(path), "--run-dir", str(run_dir), "--no-progress", *other]) == 2
    err = one_line(capsys.readouterr().err)
    assert "(data.source, training.seed differ" in err and "--restart" in err
    assert snapshot(run_dir / "checkpoints") == before and not (workspace / "identity-other").exists()

    # Step counts may change on resume; the run continues where it was.
    result = train(read_run_config(path, ["training.steps=2"]), run_dir, progress=False)
    assert result.step == 2 and len(result.losses) == 1
    # --resume-with-new-settings continues the run, recording the new settings.
    new_data = ["data.source=" + str(workspace / "other-images"), "training.steps=3"]
    result = train(read_run_config(path, new_data), run_dir, progress=False, settings_changed="continue")
    assert result.step == 3 and len(result.losses) == 1
    assert run_state.read_run_record(run_dir)["settings"]["data.source"] == str(workspace / "other-images")
    # --restart moves the old run aside (nothing deleted) and starts a new one.
    result = train(read_run_config(path), run_dir, progress=False, settings_changed="restart", overwrite=True)
    assert result.step == 1 and len(result.losses) == 1
    aside = workspace / "identity-run.previous-1"
    assert [s for s, _ in run_state.list_checkpoints(aside)] == [2, 3]


# ---------------------------------------------------------------------- 2. outputs not made by this run


def test_a_model_folder_this_run_did_not_write_is_never_replaced(workspace):
    theirs = workspace / "their-model"
    shutil.copytree(workspace / "base", theirs)
    (theirs / "notes.txt").write_text("my notes")
    before = snapshot(theirs)
    config = read_run_config(write_config(workspace, "replace", output={"path": str(theirs)}))
    with pytest.raises(ConfigError, match="their-model exists and was not written by this run.*--overwrite"):
        train(config, workspace / "replace-run", progress=False)
    assert snapshot(theirs) == before and not run_state.list_checkpoints(workspace / "replace-run")

    # Our own output is re-exported, but not over files the user put into it.
    config = read_run_config(write_config(workspace, "own"))
    train(config, workspace / "own-run", progress=False)
    mine = workspace / "own" / "model"
    (mine / "samples.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds 'samples.txt', which the export would delete"):
        train(config, workspace / "own-run", export_only=True, progress=False)
    assert (mine / "samples.txt").read_text() == "keep me" and (mine / "model.safetensors").is_file()


def test_a_lora_run_does_not_overwrite_another_runs_lora(workspace):
    lora = {"lora": {"rank": 2}}
    first = read_run_config(write_config(workspace, "lora-a", training=lora))
    train(first, workspace / "lora-a-run", progress=False)
    output = workspace / "lora-a" / "model"
    before = snapshot(output)
    second = read_run_config(write_config(workspace, "lora-b", training={**lora, "seed": 1},
                                          output={"path": str(output)}))
    with pytest.raises(ConfigError, match="lora.safetensors exists and was not written by this run"):
        train(second, workspace / "lora-b-run", progress=False)
    assert snapshot(output) == before
    train(second, workspace / "lora-b-run", progress=False, overwrite=True)  # the user says so
    note = json.loads((output / "training.json").read_text())
    assert note["run_id"] == run_state.read_run_record(workspace / "lora-b-run")["run_id"]
    assert not [p.name for p in output.parent.iterdir() if p.name.startswith(".")]  # no temporaries left


# ---------------------------------------------------------------------- 3. convert_checkpoint.py


def test_convert_refuses_to_overwrite_an_existing_output(workspace, tmp_path, capsys):
    for output in (tmp_path / "model.safetensors", tmp_path / "folder"):
        to = "original" if output.suffix else "native"
        if output.suffix:
            output.write_bytes(b"precious")
        else:
            output.mkdir()
            (output / "precious.txt").write_text("precious")
        before = output.read_bytes() if output.suffix else snapshot(output)
        with pytest.raises(SystemExit) as exit_info:
            convert_main([str(workspace / "base"), str(output), "--to", to, "--quiet"])
        err = one_line(capsys.readouterr().err)
        assert exit_info.value.code == 2 and "exists" in err and "--overwrite" in err
        assert before == (output.read_bytes() if output.suffix else snapshot(output))
    assert convert_main([str(workspace / "base"), str(tmp_path / "model.safetensors"), "--to", "original",
                         "--quiet", "--overwrite"]) == 0
    assert load_state_dict(tmp_path / "model.safetensors")  # replaced by the converted model


def test_convert_killed_mid_write_leaves_nothing_behind_for_the_next_run(workspace, tmp_path):
    output = tmp_path / "converted"
    killed = ("import os, sys, safetensors.torch\n"
              "def die(tensors, filename, metadata=None):\n"
              "    open(filename, 'wb').write(b'half a file')\n"
              "    os._exit(9)\n"
              "safetensors.torch.save_file = die\n"
              "from ldm.cli.convert_checkpoint import main\n"
              "main(sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", killed, str(workspace / "base"), str(output), "--to", "native",
                           "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers and all(name.startswith(".converted.") for name in leftovers)  # what a kill leaves
    assert convert_main([str(workspace / "base"), str(output), "--to", "native", "--quiet"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]
    assert torch.equal(load_state_dict(output / "model.safetensors")["model.diffusion_model.out.2.weight"],
                       load_state_dict(workspace / "base" / "model.safetensors")["model.diffusion_model.out.2.weight"])


# ---------------------------------------------------------------------- 4. deflate-compressed .ckpt


def test_a_deflated_ckpt_loads_the_same_tensors_as_a_stored_one(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(64, 33, generator=generator), "b.half": torch.randn(7, generator=generator).half(),
             "c.index": torch.arange(100), "state_dict_like": torch.zeros(3)}
    torch.save(state, tmp_path / "stored.ckpt")
    with zipfile.ZipFile(tmp_path / "stored.ckpt") as source, \
            zipfile.ZipFile(tmp_path / "deflated.ckpt", "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    stored, deflated = load_state_dict(tmp_path / "stored.ckpt"), load_state_dict(tmp_path / "deflated.ckpt")
    assert sorted(stored) == sorted(deflated) == sorted(state)
    assert all(deflated[k].dtype == state[k].dtype and torch.equal(deflated[k], state[k]) for k in state)


# ---------------------------------------------------------------------- 5. step counts


def test_zero_or_negative_steps_are_refused(workspace, tmp_path, capsys):
    path = write_config(workspace, "steps")
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", str(path), "--run-dir", str(tmp_path / "run"), "--steps", "0"])
    assert exit_info.value.code == 2 and "--steps must be >= 1, got 0" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()

    vae_config = tmp_path / "vae.yaml"
    vae_config.write_text(yaml.safe_dump({
        "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 4,
                  "mid_attention": False},
        "training": {"pool_size": 8, "crop_size": 16, "batch_size": 2, "steps": 1, "eval_images": 4}}))
    with pytest.raises(SystemExit) as exit_info:
        train_autoencoder.main(["--config", str(vae_config), "--run-dir", str(tmp_path / "vae"), "--steps", "-1"])
    assert exit_info.value.code == 2 and "--steps must be >= 1, got -1" in one_line(capsys.readouterr().err)
    vae_config.write_text(vae_config.read_text().replace("steps: 1", "steps: 0"))
    assert train_autoencoder.main(["--config", str(vae_config), "--run-dir", str(tmp_path / "vae")]) == 2
    assert "training.steps must be >= 1, got 0" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "vae").exists()


# ---------------------------------------------------------------------- 6. wrongly typed values


@pytest.mark.parametrize("override, message", [
    ("training.steps=abc", "training.steps must be an integer, got 'abc'"),
    ("training.lr=nan", "training.lr must be a finite number, got nan"),
    ("training.final_lr=.inf", "training.final_lr must be a finite number, got inf"),
    ("training.lora.rank=[2]", "training.lora.rank must be an integer, got [2]"),
    ("data.random_flip=3", "data.random_flip must be true or false, got 3"),
    ("model.schedule.num_train_timesteps=ten", "model.schedule.num_train_timesteps must be an integer, got 'ten'"),
])
def test_a_wrongly_typed_override_is_one_line_naming_key_and_type(workspace, tmp_path, capsys, override, message):
    path = write_config(workspace, "types")
    code = train_main(["--config", str(path), "--run-dir", str(tmp_path / "run"), override])
    assert code == 2 and message in one_line(capsys.readouterr().err)


def test_a_wrongly_typed_model_config_yaml_is_one_line_naming_key_and_type(workspace, tmp_path, capsys):
    bad = tmp_path / "bad-model"
    shutil.copytree(workspace / "base", bad)
    config = yaml.safe_load((bad / "config.yaml").read_text())
    config["unet"]["model_channels"] = "abc"
    (bad / "config.yaml").write_text(yaml.safe_dump(config))
    path = write_config(workspace, "bad-model", model={"init": str(bad)})
    assert train_main(["--config", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "config.yaml: unet: model_channels must be an integer, got 'abc'" in err
