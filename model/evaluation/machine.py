"""The machine a benchmark ran on, for its report's header: timings depend on it."""

from __future__ import annotations

from pathlib import Path

__all__ = ["machine_description"]


def machine_description() -> str:
    """CPU model, core count and Python/NumPy versions, for a report's header (timings depend on them)."""
    import os
    import platform

    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPU core(s) visible, Python {platform.python_version()}, "
            f"NumPy {np.__version__}")
