"""Group commit without a thread of its own: one batch at a time for the callers of many threads.

:class:`GroupRunner` runs the directory fsyncs and the row commits of :mod:`dicomnode.store`: the
stores of concurrent associations share one fsync, one SQLite transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["GroupRunner"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Slot(Generic[T]):
    item: T
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class GroupRunner(Generic[T, R]):
    """Group commit without a thread of its own: ``run(item)`` from many threads, one batch at a time.

    The first caller to find no batch running becomes the leader: it takes every item submitted so far
    and runs ``run_batch`` on all of them (one directory fsync, one SQLite commit for all); callers that
    arrive meanwhile wait, and the next of them leads the next batch if its item was not in this one.
    A lone caller runs its own item at once, so one association pays nothing for the grouping. When
    ``run_batch`` raises, every caller of that batch gets the exception.
    """

    def __init__(self, run_batch: Callable[[list[T]], Sequence[R]]) -> None:
        self._run_batch = run_batch
        self._pending: list[_Slot[T]] = []
        self._pending_lock = threading.Lock()
        self._leader = threading.Lock()  # held while a batch runs

    def run(self, item: T, *, waiting: Callable[[], None] | None = None) -> R:
        """Run ``item`` in a batch; its result (or the batch's exception).

        ``waiting`` is called when this caller must wait for another caller's batch first (see
        :meth:`InstanceStore._in_helper`: a helper blocked here needs no CPU until that batch ends).
        """
        slot = _Slot(item)
        with self._pending_lock:
            self._pending.append(slot)
        if not self._leader.acquire(blocking=False):
            if waiting is not None:
                waiting()
            self._leader.acquire()
        try:
            if not slot.done:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                try:
                    results = self._run_batch([s.item for s in batch])
                except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
                    for s in batch:
                        s.error = exc
                else:
                    for s, result in zip(batch, results, strict=True):
                        s.result = result
                for s in batch:
                    s.done = True
        finally:
            self._leader.release()
        if slot.error is not None:
            raise slot.error
        return slot.result
