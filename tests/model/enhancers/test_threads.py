"""torch's thread count at enhancer load: the CPUs the process may use, OMP_NUM_THREADS first."""

from __future__ import annotations

import os

import pytest
import torch

from model.enhancers.threads import intra_op_threads, usable_cpus, use_usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _cpu_max(tmp_path, text: str):  # noqa: ANN001, ANN202
    path = tmp_path / "cpu.max"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max 100000\n", AFFINITY),  # no quota: the affinity mask decides
        ("100000 100000\n", 1),  # one CPU's worth
        ("150000 100000\n", min(2, AFFINITY)),  # 1.5 CPUs: rounded up, never above the mask
        ("5000 100000\n", 1),  # a tiny quota still leaves one thread
        ("800000 100000\n", AFFINITY),  # a quota above the mask: the mask decides
        ("garbage\n", AFFINITY),  # unreadable: no quota assumed
    ],
)
def test_the_cgroup_quota_caps_the_affinity_mask(tmp_path, text: str, expected: int) -> None:
    assert usable_cpus(cpu_max=_cpu_max(tmp_path, text)) == expected


def test_without_a_cgroup_v2_file_the_affinity_mask_decides(tmp_path) -> None:
    assert usable_cpus(cpu_max=tmp_path / "absent") == AFFINITY


def test_omp_num_threads_wins_when_set(tmp_path) -> None:
    quota = _cpu_max(tmp_path, "100000 100000")
    assert intra_op_threads(environ={"OMP_NUM_THREADS": "3"}, cpu_max=quota) == 3
    assert intra_op_threads(environ={}, cpu_max=quota) == 1
    assert intra_op_threads(environ={"OMP_NUM_THREADS": " "}, cpu_max=quota) == 1  # set but empty


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_bad_omp_num_threads_is_refused_by_name(value: str) -> None:
    with pytest.raises(ValueError, match=f"OMP_NUM_THREADS must be a positive integer, found '{value}'"):
        intra_op_threads(environ={"OMP_NUM_THREADS": value})


def test_loading_sets_torchs_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        torch.set_num_threads(2)
        assert use_usable_cpus() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
