"""The server's settings as AUTOMATIC1111's ``/sdapi/v1/options`` shows them (the subset this package has).

``GET`` returns them all; ``POST`` may change those in :data:`SETTABLE` (``sd_model_checkpoint``
switches the model) and may send any other one unchanged (clients echo back what they read);
a different value for a setting this server lacks, or an unknown name, is a 422 naming it.
"""

from __future__ import annotations

import numbers
import threading
from typing import Any

from ldm.server.limits import RequestError

SETTABLE = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "show_progress_every_n_steps")


class ServerOptions:
    """Thread-safe option values."""

    def __init__(self, checkpoint: str) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {
            "sd_model_checkpoint": checkpoint,
            "sd_checkpoint_hash": None,
            "CLIP_stop_at_last_layers": 1,
            # The server decodes a preview only when one is asked for, so keeping every step's costs nothing.
            "show_progress_every_n_steps": 1,
            "live_previews_enable": True,
            "samples_format": "png",
            "samples_save": False,
            "grid_save": False,
            "sd_vae": "Automatic",
            "enable_pnginfo": True,
        }

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)

    def get(self, key: str) -> Any:
        with self._lock:
            return self._values[key]

    def check(self, changes: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """The ``changes`` that alter a settable value, each checked; :class:`RequestError` naming the first
        key that is unknown or that would change a setting this server cannot change."""
        current = self.snapshot()
        altered = {}
        for key, value in changes.items():
            if key not in current:
                raise RequestError(prefix + key, f"this server has no setting {key!r} "
                                                 f"(it has {', '.join(sorted(current))})")
            if value == current[key]:
                continue
            if key not in SETTABLE:
                raise RequestError(prefix + key, f"this server cannot change {key!r} (it stays {current[key]!r})")
            if key == "sd_model_checkpoint" and not isinstance(value, str):
                raise RequestError(prefix + key, f"must be a model title, got {value!r}")
            if key == "CLIP_stop_at_last_layers" and not _integer_at_least(value, 1):
                raise RequestError(prefix + key, f"must be an integer >= 1, got {value!r}")
            if key == "show_progress_every_n_steps" and not _integer_at_least(value, -1):
                raise RequestError(prefix + key, f"must be an integer >= -1, got {value!r}")
            altered[key] = value
        return altered

    def update(self, values: dict[str, Any]) -> None:
        with self._lock:
            self._values.update(values)


def _integer_at_least(value, minimum: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
