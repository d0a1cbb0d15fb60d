"""Training plumbing shared by the training scripts: learning-rate schedule and resumable state.

A run directory holds numbered checkpoints ``checkpoints/step-0000100/``; each is written
into a temporary folder and moved into place only when complete, so a run killed at any
moment leaves either the previous checkpoint or the new one, never a half-written one.
``resume`` picks the newest complete checkpoint; older ones beyond ``keep`` are deleted.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ldm.formats import checkpoints

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


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
