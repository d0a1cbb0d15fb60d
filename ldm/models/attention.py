"""One multi-head attention function for the whole package.

Every attention layer of the U-Net calls :func:`attention`, so the backend (torch's fused
``scaled_dot_product_attention`` or xformers' ``memory_efficient_attention``) is chosen in one
place. Both compute ``softmax(q k^T / sqrt(head_dim)) v`` per head (Vaswani et al. 2017, eq. 1).

Backend choice: xformers when it is importable *and* the tensors live on CUDA, otherwise torch
SDPA; :func:`use_attention_backend` forces one (benchmarks compare them). xformers is imported
lazily on first use and the result is cached, so importing this module does no work. Each
backend is logged once, the first time it runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator
from types import ModuleType

import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

_logged_backends: set[str] = set()
BACKENDS = ("auto", "sdpa", "xformers")
_backend: contextvars.ContextVar[str] = contextvars.ContextVar("attention_backend", default="auto")


@functools.lru_cache(maxsize=1)
def _xformers_ops() -> ModuleType | None:
    """Return ``xformers.ops`` if xformers imports cleanly, else ``None`` (cached)."""
    try:
        import xformers.ops  # noqa: PLC0415 - optional, imported on first use only
    except Exception:  # ImportError, or a broken build compiled for another torch
        return None
    return xformers.ops


def available_backends() -> list[str]:
    """The backends that can run here: ``sdpa`` always, ``xformers`` where it imports and CUDA exists."""
    import torch

    return ["sdpa"] + (["xformers"] if torch.cuda.is_available() and _xformers_ops() is not None else [])


@contextlib.contextmanager
def use_attention_backend(name: str) -> Iterator[None]:
    """Within the block, attention runs on ``name`` (one of :data:`BACKENDS`; ``auto`` is the default rule)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def _log_backend_once(name: str) -> None:
    """Log the backend the first time it runs (not while torch.compile traces: logging would split its graph)."""
    import torch

    if name not in _logged_backends and not torch.compiler.is_compiling():
        _logged_backends.add(name)
        logger.info("attention backend: %s", name)


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, L, H*D] -> [B, L, H, D]."""
    batch, length, width = x.shape
    if width % num_heads:
        raise ValueError(f"width {width} is not divisible by num_heads={num_heads}")
    return x.reshape(batch, length, num_heads, width // num_heads)


def attention(q: Tensor, k: Tensor, v: Tensor, *, num_heads: int, upcast: bool = False) -> Tensor:
    """Multi-head scaled dot-product attention without masking.

    Args:
        q: queries ``[B, Lq, H*D]``.
        k: keys ``[B, Lk, H*D]``.
        v: values ``[B, Lk, H*D]``.
        num_heads: ``H``; the last dimension is split into ``H`` heads of ``D`` channels.
        upcast: compute in float32 and cast the result back to ``q.dtype`` (SD2's
            ``upcast_attention``, which avoids fp16 overflow in ``q k^T``).

    Returns:
        ``[B, Lq, H*D]`` in the dtype of ``q``.
    """
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (_split_heads(x, num_heads) for x in (q, k, v))  # [B, L, H, D]

    backend = _backend.get()
    xops = _xformers_ops() if q.is_cuda and backend != "sdpa" else None
    if backend == "xformers" and xops is None:
        raise RuntimeError("xformers attention was asked for, but xformers is not importable or the tensors are not on CUDA")
    if xops is not None:
        _log_backend_once("xformers.memory_efficient_attention")
        out = xops.memory_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous())
    else:
        _log_backend_once("torch.nn.functional.scaled_dot_product_attention")
        # SDPA wants [B, H, L, D]; softmax(q k^T / sqrt(D)) v, Vaswani et al. eq. 1.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2)
    batch, length = out.shape[:2]
    return out.reshape(batch, length, -1).to(out_dtype)


__all__ = ["attention"]
