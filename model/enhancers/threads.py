"""How many threads torch's intra-op pool gets: the CPUs this process may use, not the machine's.

torch sizes its pool by the machine's core count, but a node runs under systemd or in a container
with a CPU affinity mask or a cgroup v2 ``cpu.max`` quota; threads beyond what it may use only wait
on each other (OpenMP spins), which on a shared machine is several times slower, not faster.
``OMP_NUM_THREADS``, when set, is the operator's choice and wins.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["CGROUP_CPU_MAX", "usable_cpus", "intra_op_threads", "use_usable_cpus"]

#: cgroup v2: ``"<quota> <period>"`` in µs, or ``"max <period>"`` for no quota.
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def _quota_cpus(cpu_max: Path) -> int | None:
    """CPUs the cgroup v2 quota allows (rounded up), or None without a readable quota."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None  # no cgroup v2 here, or a file this code does not understand: no quota known
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def usable_cpus(*, cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs in this process's affinity mask, capped by the cgroup v2 ``cpu.max`` quota when there is one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity mask to read
        cpus = os.cpu_count() or 1
    quota = _quota_cpus(cpu_max)
    return max(1, min(cpus, quota) if quota is not None else cpus)


def intra_op_threads(
    *, environ: Mapping[str, str] = os.environ, cpu_max: Path = CGROUP_CPU_MAX
) -> int:
    """``OMP_NUM_THREADS`` when set (a positive integer), else :func:`usable_cpus`."""
    value = environ.get("OMP_NUM_THREADS", "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, found {value!r}") from None
        if threads < 1:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, found {value!r}")
        return threads
    return usable_cpus(cpu_max=cpu_max)


def use_usable_cpus() -> int:
    """Size torch's intra-op pool by :func:`intra_op_threads`; returns the count set."""
    import torch  # here: the function above is useful (and tested) without torch

    threads = intra_op_threads()
    torch.set_num_threads(threads)
    return threads
