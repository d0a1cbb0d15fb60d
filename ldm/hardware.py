"""Where and in which precision to run: the device, the dtype and the memory layout.

``--dtype`` names, as the commands accept them:

- ``auto``: float16 on CUDA and MPS; float32 on the CPU (the reproducible default, equal to
  diffusers' float32 pipeline to the last bit of the sampling arithmetic).
- ``fast``: the quickest precision this machine runs well: float16 on CUDA and MPS; on a CPU
  with native bfloat16 arithmetic (AVX512-BF16 or AMX, read from the CPU's flags at run time)
  bfloat16 with channels-last convolutions; float32 on other CPUs (no bfloat16 arithmetic in
  hardware there, so the speed-up measured in the README does not apply).
- ``float32``, ``float16``, ``bfloat16``: exactly that.

The measurements behind the choice of ``auto`` are in the README (``scripts/bench/benchmark.py``).
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.errors import DeviceError

if TYPE_CHECKING:  # torch is imported where it is used: the commands read DTYPE_NAMES before torch loads
    import torch

logger = logging.getLogger(__name__)

DTYPE_NAMES = ("auto", "fast", "float32", "float16", "bfloat16")
# Linux /proc/cpuinfo flags of CPUs with bfloat16 dot products in hardware (oneDNN uses them).
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    """A dtype (torch's name for it) and whether 4-D activations and convolution weights are channels-last."""

    dtype_name: str
    channels_last: bool = False

    @property
    def dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def memory_format(self) -> "torch.memory_format":
        import torch

        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        return self.dtype_name + (" + channels_last" if self.channels_last else "")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The instruction-set flags of the first CPU listed in ``cpuinfo`` (empty where it is absent)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs that multiply bfloat16 in hardware (read once per process)."""
    if platform.system() != "Linux":
        return False
    return any(flag in cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)


def pick_device(name: "str | torch.device" = "auto", *, what: str = "device") -> "torch.device":
    """``auto`` -> cuda, then mps, then cpu; any other name as torch spells it, checked by :func:`check_device`
    (``what`` names the argument in its error, e.g. ``"--device"``)."""
    import torch

    if str(name) != "auto":
        return check_device(name, what=what)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(name: "str | torch.device", *, what: str = "device") -> "torch.device":
    """The torch device ``name`` names, or :class:`DeviceError` (one line) when torch does not know the
    name or this machine lacks the device (``cuda`` without a usable GPU, ``cuda:3`` on a 2-GPU machine,
    ``mps`` off Apple silicon). ``what`` names the argument in the message. Devices of other kinds
    (``meta``, ``xpu``, ...) are passed through unchecked."""
    import torch

    try:
        device = name if isinstance(name, torch.device) else torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"{what} {str(name)!r} is not a device name (expected cpu, cuda, cuda:N or mps)") from None
    problem = _device_problem(device)
    if problem:
        raise DeviceError(f"{what} {str(name)!r} is not available: {problem}")
    return device


def _device_problem(device: "torch.device") -> str | None:
    """Why ``device`` cannot be used here, or ``None`` (unknown kinds: ``None``, torch will tell)."""
    import torch

    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "torch finds no CUDA GPU on this machine (torch.cuda.is_available() is False)"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"this machine has {count} CUDA GPU{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})"
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            return "torch finds no Apple GPU (torch.backends.mps.is_available() is False)"
    return None


def pick_precision(name: str, device: "torch.device", *, native_bf16: bool | None = None) -> Precision:
    """A ``--dtype`` name (see the module docstring) -> the precision to run in on ``device``.

    ``native_bf16`` overrides the CPU detection (for tests and for ``--help`` texts).
    """
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_NAMES)}")
    if name not in ("auto", "fast"):
        return Precision(name)
    if device.type in ("cuda", "mps"):
        return Precision("float16")
    if name == "fast":
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        if native:
            return Precision("bfloat16", channels_last=True)
        logger.info("this CPU has no native bfloat16: the fast path is float32")
    return Precision("float32")
