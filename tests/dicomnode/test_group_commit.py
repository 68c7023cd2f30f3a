"""Group commit: callers of many threads share one batch; a lone caller runs at once."""

from __future__ import annotations

import errno
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dicomnode.group_commit import GroupRunner


def test_group_runner_runs_what_waits_in_one_batch() -> None:
    batches: list[list[int]] = []
    first_started, release = threading.Event(), threading.Event()

    def run_batch(items: list[int]) -> list[int]:
        batches.append(items)
        if items == [0]:
            first_started.set()
            release.wait(5)
        return [item * 10 for item in items]

    group: GroupRunner[int, int] = GroupRunner(run_batch)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(group.run, 0)
        assert first_started.wait(5)
        others = [pool.submit(group.run, item) for item in (1, 2, 3)]
        while len(group._pending) < 3:  # all three queued behind the running batch
            time.sleep(0.01)
        release.set()
        assert first.result() == 0
        assert [f.result() for f in others] == [10, 20, 30]
    assert batches == [[0], [1, 2, 3]]


def test_group_runner_gives_the_error_to_every_caller_of_the_batch() -> None:
    def run_batch(items: list[int]) -> list[int]:
        raise OSError(errno.EIO, "I/O error")

    group: GroupRunner[int, int] = GroupRunner(run_batch)
    with pytest.raises(OSError, match="I/O error"):
        group.run(1)
    with pytest.raises(OSError, match="I/O error"):
        group.run(2)


def test_group_runner_tells_a_caller_that_waits_for_another_batch() -> None:
    running, release = threading.Event(), threading.Event()
    waited: list[int] = []

    def run_batch(items: list[int]) -> list[int]:
        if items == [0]:
            running.set()
            release.wait(5)
        return items

    group: GroupRunner[int, int] = GroupRunner(run_batch)
    assert group.run(7, waiting=lambda: waited.append(7)) == 7
    assert waited == []  # a lone caller runs its batch at once
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(group.run, 0)
        assert running.wait(5)
        second = pool.submit(group.run, 1, waiting=lambda: waited.append(1))
        while not waited:
            time.sleep(0.01)
        release.set()
        assert (first.result(), second.result()) == (0, 1)
    assert waited == [1]
