"""Training plumbing shared by the training scripts: learning-rate schedule and resumable state.

A run directory holds numbered checkpoints ``checkpoints/step-0000100/``; each is written
into a temporary folder and moved into place only when complete, so a run killed at any
moment leaves either the previous checkpoint or the new one, never a half-written one.
``resume`` picks the newest complete checkpoint; older ones beyond ``keep`` are deleted.

A run directory also knows whose it is: ``run.json`` records a run id and the settings that define
the run (:func:`plan_session` compares them with a new session's and refuses to mix two runs), and
the run id is stamped on what the run exports, so that it never replaces an output it did not make.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.config_io import plain_data
from ldm.errors import ConfigError
from ldm.formats import checkpoints

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
RUN_RECORD = "run.json"
SETTINGS_CHANGED = ("refuse", "continue", "restart")  # what a session does when the defining settings differ


def warmup_cosine_lr(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, final_lr: float) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay to ``final_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * progress))


def rng_state() -> dict[str, Any]:
    """Python and torch CPU random states, to restore on resume (the training scripts use no NumPy RNG)."""
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as ``(step, folder)``."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Atomically write ``weights`` (safetensors) and ``state`` (optimizer etc.) for ``step``.

    ``state`` must hold only tensors, numbers, strings, lists, tuples and dicts, so that it reads
    back with ``torch.load(weights_only=True)``.
    """
    destination = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    with checkpoints.atomic_folder(destination, model_markers=("weights.safetensors",)) as folder:
        checkpoints.save_safetensors_atomic(weights, folder / "weights.safetensors")
        torch.save({"step": step, **state}, folder / "state.pt")
    for _, old in list_checkpoints(run_dir)[:-keep]:
        _remove_atomically(old)
    _remove_leftovers(destination.parent)
    logger.info("saved checkpoint %s", destination)
    return destination


def _remove_atomically(folder: Path) -> None:
    """Rename ``folder`` out of the ``step-*`` namespace first, so a kill mid-delete leaves no half checkpoint."""
    doomed = folder.with_name(f".{folder.name}.deleting")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_leftovers(checkpoint_dir: Path) -> None:
    """Delete hidden temporary folders a killed run left behind (unfinished writes and deletes)."""
    for path in checkpoint_dir.glob(".step-*"):
        shutil.rmtree(path, ignore_errors=True)


def load_latest_checkpoint(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(weights, state)`` of the newest complete checkpoint, or ``None`` for a fresh run."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    step, folder = found[-1]
    weights = checkpoints.load_state_dict(folder / "weights.safetensors")
    state = torch.load(folder / "state.pt", weights_only=True)
    logger.info("resuming from %s (step %d)", folder, step)
    return weights, state


# --------------------------------------------------------------------------------------------
# Which run a run directory holds
# --------------------------------------------------------------------------------------------


@dataclass
class SessionPlan:
    """What :func:`plan_session` decided for a run directory; :func:`open_session` carries it out."""

    run_dir: Path
    run_id: str
    settings: dict[str, Any]  # the defining settings of this session ({dotted key: value})
    changed: list[str] = field(default_factory=list)  # defining settings that differ from the recorded ones
    set_aside: bool = False  # move the old run directory away first (--restart)
    write_record: bool = True


def read_run_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` of ``run_dir`` (``{"run_id", "settings", ...}``), or ``None`` when there is none.

    Raises:
        ConfigError: the file is unreadable or not a run record.
    """
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: unreadable run record ({error}); move it away to start a new run") from None
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str) \
            or not isinstance(record.get("settings"), dict):
        raise ConfigError(f"{path}: not a run record (no run_id and settings); move it away to start a new run")
    return record


def differing_settings(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Sorted dotted keys whose values differ (a key present on one side only differs too)."""
    ours, missing = _as_json(current), object()
    return sorted(key for key in set(recorded) | set(ours) if recorded.get(key, missing) != ours.get(key, missing))


def _as_json(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as they read back from ``run.json`` (tuples -> lists), so that comparisons are exact."""
    return json.loads(json.dumps(plain_data(settings)))


def plan_session(run_dir: str | Path, settings: dict[str, Any], *, settings_changed: str = "refuse") -> SessionPlan:
    """Decide how a session with defining ``settings`` uses ``run_dir`` (reads only; safe on every process).

    * a new or empty run directory, or one without checkpoints: a run (re)starts there with ``settings``;
    * the recorded settings equal ``settings``: the run resumes;
    * they differ: ``settings_changed`` decides: ``"refuse"`` raises, ``"continue"`` resumes the run
      with the new settings (recorded from now on), ``"restart"`` sets the old run directory aside
      and starts a new run (also when nothing differs);
    * checkpoints without ``run.json`` (written before runs were recorded): adopted with a warning.

    Raises:
        ConfigError: the settings differ and ``settings_changed`` is ``"refuse"``; the message names the
            differing dotted keys.
    """
    if settings_changed not in SETTINGS_CHANGED:
        raise ValueError(f"settings_changed must be one of {SETTINGS_CHANGED}, got {settings_changed!r}")
    run_dir = Path(run_dir)
    record, has_checkpoints = read_run_record(run_dir), bool(list_checkpoints(run_dir))
    if settings_changed == "restart" and (record is not None or has_checkpoints):
        return SessionPlan(run_dir, uuid.uuid4().hex, settings, set_aside=True)
    if record is None:
        if has_checkpoints:
            logger.warning("%s has checkpoints but no %s (an older version wrote them): resuming them as this run",
                           run_dir, RUN_RECORD)
        return SessionPlan(run_dir, uuid.uuid4().hex, settings)
    changed = differing_settings(record["settings"], settings)
    if changed and has_checkpoints and settings_changed == "refuse":
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({', '.join(changed)} differ; see {run_dir / RUN_RECORD}): "
            "use another --run-dir, --resume-with-new-settings to continue it with these, or --restart to set it "
            "aside and start over")
    return SessionPlan(run_dir, record["run_id"], settings, changed=changed, write_record=bool(changed))


def open_session(plan: SessionPlan) -> None:
    """Carry out ``plan`` (main process only): set the old run aside, write ``run.json``; logs what changed.

    Raises:
        ConfigError: the old run directory cannot be moved aside (nothing is deleted).
    """
    if plan.set_aside:
        aside = set_run_aside(plan.run_dir)
        logger.warning("--restart: moved the previous run to %s", aside)
    elif plan.changed:
        logger.warning("settings changed since the run was recorded: %s", ", ".join(plan.changed))
    if plan.write_record:
        record = {"run_id": plan.run_id, "settings": _as_json(plan.settings),
                  "recorded": time.strftime("%Y-%m-%d %H:%M:%S")}
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.write_text_atomic(plan.run_dir / RUN_RECORD, json.dumps(record, indent=2) + "\n")


def set_run_aside(run_dir: str | Path) -> Path:
    """Rename ``run_dir`` to a free ``NAME.previous-N`` beside it and return the new path.

    Raises:
        ConfigError: the rename fails (the directory is left as it was).
    """
    run_dir = Path(run_dir).resolve()
    number = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.previous-{number}")).exists():
        number += 1
    try:
        os.rename(run_dir, aside)
    except OSError as error:
        raise ConfigError(f"--restart: cannot move {run_dir} aside to {aside} ({error}); "
                          "move it yourself or use another --run-dir") from None
    return aside
