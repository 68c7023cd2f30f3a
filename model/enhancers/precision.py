"""The arithmetic precision of inference: float32, or bfloat16 autocast where the hardware has it.

bfloat16 halves the bytes a convolution moves and, on a CPU with AVX-512-BF16 or AMX (or a CUDA GPU
with bf16), doubles its arithmetic rate; without them torch emulates it and it is slower than
float32. ``auto`` therefore picks bf16 only where the device computes it natively.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

__all__ = ["PRECISIONS", "autocast", "cpu_has_native_bf16", "resolve_precision"]

#: ``auto``: bf16 where native (see :func:`resolve_precision`); ``fp32``; ``bf16``: always.
PRECISIONS = ("auto", "fp32", "bf16")
#: /proc/cpuinfo flags of x86 CPUs with bf16 arithmetic in hardware.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU's flags name bf16 arithmetic (False where they cannot be read: not Linux)."""
    try:
        lines: Iterable[str] = cpuinfo.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        if line.startswith("flags"):
            return not NATIVE_BF16_FLAGS.isdisjoint(line.split(":", 1)[1].split())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: ``auto`` is bf16 on a CUDA GPU with bf16 or a CPU with it natively."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, found {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision == "bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
