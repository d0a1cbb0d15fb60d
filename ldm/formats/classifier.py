"""Files of a noise-aware classifier (:class:`ldm.models.noisy_classifier.NoisyLatentClassifier`): a folder
with ``classifier.yaml`` (its :class:`~ldm.models.noisy_classifier.ClassifierConfig`) and
``classifier.safetensors`` (float32 weights), each written atomically."""

from __future__ import annotations

from pathlib import Path

from ldm.config_io import read_yaml, write_yaml
from ldm.errors import CheckpointError
from ldm.formats import checkpoints
from ldm.models.noisy_classifier import ClassifierConfig, NoisyLatentClassifier

CONFIG_FILE = "classifier.yaml"
WEIGHTS_FILE = "classifier.safetensors"


def save_classifier(model: NoisyLatentClassifier, folder: str | Path) -> Path:
    """Write ``model`` into ``folder`` (created if needed); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().float().contiguous() for name, tensor in model.state_dict().items()}
    checkpoints.save_safetensors_atomic(weights, folder / WEIGHTS_FILE)
    with checkpoints.atomic_file(folder / CONFIG_FILE) as temporary:
        write_yaml(model.config.to_dict(), temporary)
    return folder


def load_classifier(folder: str | Path) -> NoisyLatentClassifier:
    """The classifier saved in ``folder``, in eval mode on the CPU (float32).

    Raises:
        CheckpointError: the folder holds no classifier, or weights that do not fit its config.
    """
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder} holds no classifier ({CONFIG_FILE} is missing)")
    try:
        model = NoisyLatentClassifier(ClassifierConfig.from_dict(read_yaml(folder / CONFIG_FILE, what="classifier config")))
        model.load_state_dict(checkpoints.load_state_dict(folder / WEIGHTS_FILE))
    except (ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{folder}: not a valid classifier ({str(error).splitlines()[0]})") from None
    return model.eval()


__all__ = ["save_classifier", "load_classifier", "CONFIG_FILE", "WEIGHTS_FILE"]
