"""The instance store: a spool of DICOM files plus their rows in the node database.

Contract of :meth:`InstanceStore.put` (what makes "Success" safe to answer): when it returns, the
instance's bytes, its name ``<root>/instances/<study>/<series>/<sop>.dcm`` and its database row are all
on disk, the row written only once the bytes and the name were. The SCP hands over the file pynetdicom
streamed the data set into (in ``<root>/tmp``), so an instance is never held whole in memory and never
re-encoded. The steps:

1. the received file gets its final name as soon as the instance's UIDs are known, and the fsyncs of
   its bytes and of its directory start in helper threads, while the SCP reads and validates every
   element (:meth:`InstanceStore.staging`). The SCP takes the UIDs from the file's first bytes
   (dicomnode.validate.peek_instance_uids) and renames the file again should the full read give others
   (:meth:`Staged.rename`, under the same SOP Instance UID's lock); a file it cannot peek it fsyncs
   first (:meth:`InstanceStore.begin_sync`) and names once read. Renamed before either fsync, the
   bytes and the name can share one journal commit (ext4: the row's commit then waited about half as
   long, benchmarks/results/receive.md). Bytes, or a file on another file system, are written to a
   temporary file first;
2. the caller goes on only once each helper is inside its fsync (or waits for another store's batch):
   reading and validating hold the GIL, and a helper that had not reached its fsync would otherwise
   begin only after them (:meth:`InstanceStore._in_helpers`). A refused instance's file is removed
   again. Concurrent stores into one directory share one directory fsync (:class:`GroupRunner`);
3. once the instance is valid and both fsyncs have returned, its row is inserted: the rows of
   concurrent associations are committed together, one SQLite transaction and one WAL fsync for all of
   them (group commit, :class:`GroupRunner`).

One association thus waits for the disk about once per instance (the row's commit): the file's and the
directory's fsyncs overlap the reading and validation, instead of file, directory and row in a row. The
commit stays ``synchronous=FULL``. With ``NORMAL`` the row would not be durable at Success and would
have to be rebuilt from the file after a power cut, but the row holds what the file does not (the
calling AE title, whether the series is this node's own output, which guards against enhancing it
again), and finding row-less files means walking the whole spool at every start.

Renaming before the file's fsync has returned, and before the instance is validated, is safe because a
name means nothing without a row: a power cut before step 3 can leave a complete, partial or invalid
file under its final name with no row. Nothing reads such a file (every reader goes through the
index); the sender, never acknowledged, sends the instance again, and the new copy replaces it. What
must never happen is that a rename replaces the file of an *indexed* instance: stores of one SOP
Instance UID are therefore serialised (a lock per UID hash) and an indexed UID is answered as stored
without writing anything (idempotent).

A crash between any two steps thus leaves either nothing the index knows about (a stray temp file,
removed at the next start; or a file without a row, replaced when the instance is sent again) or a
complete instance. The UID lock also keeps a failing store, which removes its file, from removing the
file of a concurrent store of the same instance. Any write error, or less than ``storage.min_free_mb``
free, raises :class:`OutOfResources` with nothing of the call left behind. Free space is measured
again for every instance, so the node accepts instances again by itself as soon as space returns.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from dicomnode.db import Database
from dicomnode.group_commit import GroupRunner
from dicomnode.validate import InstanceMeta

__all__ = ["InstanceStore", "OutOfResources", "PutResult", "Staged", "free_bytes", "fsync_dir"]

log = logging.getLogger("upete.store")

_INSERT = """
INSERT OR IGNORE INTO instances (
    sop_uid, study_uid, series_uid, sop_class_uid, modality, frame_of_reference_uid, units,
    corrected_image, series_type, number_of_slices, position_x, position_y, position_z, orientation,
    rows, columns, row_spacing, col_spacing, derived_by_us, calling_ae, received_at, path)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_EXISTS = "SELECT 1 FROM instances WHERE sop_uid = ?"


class OutOfResources(Exception):
    """The instance could not be stored (disk full, write error, database error); nothing was kept."""


class PutResult(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"


_COPY_CHUNK = 1024 * 1024
# Stores of one SOP Instance UID are serialised by one of these locks (picked by a hash of the UID).
_UID_LOCKS = 64
# Threads that fsync received files and their directories while the association's thread parses and
# validates them: two per association storing at that moment; beyond that, fsyncs queue (still correct,
# a little later).
_FSYNC_THREADS = 16
# A helper's job: an fsync that calls its argument (ready) just before it waits for the disk.
Job = Callable[[Callable[[], None]], None]
# How long a store waits for a helper to begin its fsync (InstanceStore._in_helper) before it goes on.
_HELPER_START_WAIT_S = 0.02

def free_bytes(path: Path) -> int:
    """Free space of the file system holding ``path`` (a module function so tests can fake a full disk)."""
    return shutil.disk_usage(path).free


def _fsync(path: Path, flags: int = os.O_RDONLY, ready: Callable[[], None] | None = None) -> None:
    _fsync_and_close(os.open(path, flags), ready)


def _fsync_and_close(fd: int, ready: Callable[[], None] | None = None) -> None:
    try:
        if ready is not None:
            ready()  # the helper's caller may go on: from here this thread waits for the disk only
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path, ready: Callable[[], None] | None = None) -> None:
    """Make the directory's entries (a rename, a new file) durable; ``ready()`` just before its fsync."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY, ready)


@dataclass(frozen=True)
class _DirectorySync:
    path: Path
    ready: Callable[[], None]


def _fsync_dirs(items: list[_DirectorySync]) -> list[None]:
    def ready() -> None:
        for item in items:
            item.ready()

    for directory in dict.fromkeys(item.path for item in items):  # each distinct directory once, in order
        fsync_dir(directory, ready)
    return [None] * len(items)


def _makedirs_durable(path: Path, root: Path) -> None:
    """``mkdir -p`` that fsyncs each parent whose entries changed (a new directory must survive too)."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        if current == root or current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue  # another association created it at the same moment
        fsync_dir(directory.parent)


class Staged:
    """An instance whose file has its final name and is being made durable (:meth:`InstanceStore.staging`)."""

    def __init__(
        self,
        root: Path,
        relative: Path,
        durable: list[Future[None]],
        commit_row: Callable[[tuple], int],
        *,
        duplicate: bool = False,
        rename: Callable[[Path, Path], Future[None]] | None = None,
    ) -> None:
        self.relative = relative
        self.root = root
        self.path = root / relative  # where the file is now (not for a duplicate: nothing was written)
        self.duplicate = duplicate
        self.committed = False
        self._durable = durable
        self._commit_row = commit_row
        self._rename = rename

    def rename(self, study_uid: str, series_uid: str) -> None:
        """Name the file by other Study and Series UIDs (checked ones); the SOP Instance UID stays.

        For a caller that staged the file by UIDs it guessed before reading the instance in full, when
        the full read gives others (dicomnode.scp). Nothing to do for a duplicate or the same name.
        Raises :class:`OutOfResources` when the file cannot be renamed; it keeps its old name then.
        """
        relative = _relative(study_uid, series_uid, self.relative.stem)
        if self.duplicate or relative == self.relative or self._rename is None:
            return
        self._durable.append(self._rename(self.path, relative))  # the new name's directory fsync
        self.relative, self.path = relative, self.root / relative

    def commit(self, meta: InstanceMeta, *, calling_ae: str = "") -> PutResult:
        """Wait until the file and its name are durable, then commit the row; the answer to give.

        Raises :class:`OutOfResources` (the block of :meth:`InstanceStore.staging` then removes the
        file) and ValueError when ``meta`` names another file than the one staged.
        """
        if self.duplicate:
            return PutResult.DUPLICATE
        named = _relative(meta.study_uid, meta.series_uid, meta.sop_uid)
        if named != self.relative:
            raise ValueError(f"the instance is {named}, but {self.relative} was staged")
        try:
            for future in self._durable:
                future.result()
        except OSError as exc:
            raise _write_error(exc) from exc
        try:
            inserted = self._commit_row(_row(meta, calling_ae, str(self.relative)))
        except sqlite3.Error as exc:
            # The file is complete but unindexed: it is removed (the sender gets a failure status and
            # sends it again), so no half-stored instance remains.
            raise OutOfResources(f"cannot index the instance: {exc}") from exc
        self.committed = True
        # rowcount 0: the row is there already (another process wrote it; this one serialises by UID).
        return PutResult.STORED if inserted else PutResult.DUPLICATE

    def wait_quietly(self) -> None:
        """Let the fsyncs under way finish (their errors no longer matter: the file is abandoned)."""
        for future in self._durable:
            try:
                future.result()
            except OSError:
                pass


def _relative(study_uid: str, series_uid: str, sop_uid: str) -> Path:
    # UIDs are checked as digits and dots (dicomnode.validate), so they are safe file names.
    return Path("instances") / study_uid / series_uid / f"{sop_uid}.dcm"


def _write_error(exc: OSError) -> OutOfResources:
    reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return OutOfResources(f"cannot write the instance: {reason}")


class InstanceStore:
    """Spool directory + instance index. Thread-safe: every association's thread calls :meth:`put`."""

    def __init__(self, root: Path, db: Database, *, min_free_mb: int = 0) -> None:
        self.root = Path(root)
        self.db = db
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.tmp_dir = self.root / "tmp"
        self.instances_dir = self.root / "instances"
        for directory in (self.root, self.tmp_dir, self.instances_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._uid_locks = [threading.Lock() for _ in range(_UID_LOCKS)]
        self._file_syncs = ThreadPoolExecutor(_FSYNC_THREADS, thread_name_prefix="upete-fsync")
        self._directory_sync: GroupRunner[_DirectorySync, None] = GroupRunner(_fsync_dirs)
        self._row_commit: GroupRunner[tuple, int] = GroupRunner(self._insert_rows)
        self._own_changes = 0  # instance rows inserted by _insert_rows (other_changes)

    def remove_stale_temp_files(self) -> int:
        """Delete temp files a killed process left (never acknowledged); returns how many. Call at start."""
        count = 0
        for path in self.tmp_dir.iterdir():
            path.unlink(missing_ok=True)
            count += 1
        return count

    def contains(self, sop_uid: str) -> bool:
        return bool(self.db.query(_EXISTS, (sop_uid,)))

    def begin_sync(self, received: Path) -> Future[None]:
        """Start fsyncing a received file in a helper thread; give the future to :meth:`put`.

        Called before the file is parsed and validated, so the disk works while the CPU does: the
        file's fsync then costs an association little or nothing. A file that is refused afterwards
        was fsynced for nothing, which is harmless.
        """
        try:
            # Opened here, not in the helper: the file is renamed while the fsync may still wait to run.
            fd = os.open(received, os.O_RDONLY)
        except OSError as exc:
            failed: Future[None] = Future()
            failed.set_exception(exc)  # raised by put(), which answers Out of Resources
            return failed
        return self._in_helper(lambda ready: _fsync_and_close(fd, ready))

    def _in_helper(self, job: Callable[[Callable[[], None]], None]) -> Future[None]:
        """Run ``job(ready)`` (an fsync) in a helper thread; return once it called ``ready()``.

        The helper calls ``ready()`` just before its fsync. Waiting for that costs one thread switch;
        without it the helper would not even begin while the caller parses and validates (pure Python,
        holding the GIL) until the interpreter hands the GIL over, up to ``sys.getswitchinterval()``
        (5 ms) later: the fsync ran after the validation instead of during it. The wait is bounded (all
        helpers busy: the fsync then runs later, which is still correct).
        """
        return self._in_helpers([job])[0]

    def _in_helpers(self, jobs: list[Job]) -> list[Future[None]]:
        """:meth:`_in_helper` for several jobs at once: one wait until each is inside its fsync."""
        futures, events = [], []
        for job in jobs:
            started = threading.Event()

            def run(job: Job = job, started: threading.Event = started) -> None:
                try:
                    job(started.set)
                finally:
                    started.set()  # also when the job failed before its fsync: never leave the caller waiting

            futures.append(self._file_syncs.submit(run))
            events.append(started)
        deadline = time.monotonic() + _HELPER_START_WAIT_S
        for started in events:
            started.wait(max(0.0, deadline - time.monotonic()))
        return futures

    def put(
        self,
        meta: InstanceMeta,
        source: bytes | Path,
        *,
        calling_ae: str = "",
        synced: Future[None] | None = None,
    ) -> PutResult:
        """Store one validated instance durably (see the module docstring); :meth:`staging` in one go.

        ``source`` is a DICOM file (with meta): a path, which is moved into the spool (the caller's file
        is gone afterwards unless the instance was a duplicate or refused), or its bytes. ``synced`` is
        what :meth:`begin_sync` returned for that path; without it the file is fsynced here.
        Raises :class:`OutOfResources` when it cannot; then nothing of this call remains on disk.
        """
        with self.staging(meta.study_uid, meta.series_uid, meta.sop_uid, source, synced=synced) as staged:
            return staged.commit(meta, calling_ae=calling_ae)

    @contextmanager
    def staging(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        source: bytes | Path,
        *,
        synced: Future[None] | None = None,
    ) -> Iterator[Staged]:
        """Name an instance's file and make it durable in helper threads while the caller validates it.

        Within the block the UID's lock is held. An indexed UID yields a :class:`Staged` whose
        ``duplicate`` is true, and nothing is written. Otherwise the file gets its final name (the UIDs
        must have been checked, :func:`dicomnode.validate.instance_uids`: they become its path) and its
        fsync and its directory's run while the caller validates the instance and then calls
        :meth:`Staged.commit`. Leaving the block without a commit (a refusal, any exception) removes
        the file again. Raises :class:`OutOfResources` when the file cannot be written.
        """
        with self._uid_locks[zlib.crc32(sop_uid.encode()) % _UID_LOCKS]:
            if self.contains(sop_uid):
                yield Staged(self.root, Path(), [], self._row_commit.run, duplicate=True)
                return
            self._check_free_space(source)
            relative = _relative(study_uid, series_uid, sop_uid)
            final = self.root / relative
            try:
                _makedirs_durable(final.parent, self.root)
                file_synced = self._place(source, final, sop_uid, synced)
            except OSError as exc:
                raise _write_error(exc) from exc
            # The bytes' fsync (unless under way) and the name's start together: one wait for both.
            jobs: list[Job] = [self._name_job(final)]
            if file_synced is None:
                jobs.append(lambda ready: _fsync(final, ready=ready))
            durable = self._in_helpers(jobs) + ([file_synced] if file_synced else [])
            staged = Staged(self.root, relative, durable, self._row_commit.run, rename=self._rename_staged)
            try:
                yield staged
            finally:
                if not staged.committed:
                    # No row names the file and no other store of this UID runs (the UID lock).
                    staged.wait_quietly()
                    staged.path.unlink(missing_ok=True)

    def _name_job(self, final: Path) -> Job:
        """The fsync of ``final``'s directory, for a helper (shared with concurrent stores into it)."""
        return lambda ready: self._directory_sync.run(_DirectorySync(final.parent, ready), waiting=ready)

    def _rename_staged(self, current: Path, relative: Path) -> Future[None]:
        final = self.root / relative
        try:
            _makedirs_durable(final.parent, self.root)
            os.replace(current, final)
        except OSError as exc:
            raise _write_error(exc) from exc
        return self._in_helper(self._name_job(final))

    def _check_free_space(self, source: bytes | Path) -> None:
        try:
            size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
            free = free_bytes(self.root)
        except OSError as exc:
            raise OutOfResources(f"cannot measure the instance or the free space: {exc}") from exc
        if free - size < self.min_free_bytes:
            free_mb, min_mb = free // (1024 * 1024), self.min_free_bytes // (1024 * 1024)
            raise OutOfResources(f"{free_mb} MB free, below storage.min_free_mb ({min_mb})")

    def _place(
        self, source: bytes | Path, final: Path, sop_uid: str, synced: Future[None] | None
    ) -> Future[None] | None:
        """Give the instance its final name; returns ``synced``, the fsync of its bytes under way, if any.

        A received file is renamed (its fsync is ``synced``, when begun before it was read); bytes, or a
        file on another file system, are written to a temporary file first. None: the caller fsyncs.
        """
        if not isinstance(source, bytes):
            try:
                os.replace(source, final)
                return synced
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
        tmp = self.tmp_dir / f"{sop_uid}.{uuid.uuid4().hex}.part"
        try:
            if isinstance(source, bytes):
                _write_new(tmp, source)
            else:
                with open(source, "rb") as src, open(tmp, "xb") as dst:
                    shutil.copyfileobj(src, dst, _COPY_CHUNK)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return None

    def _insert_rows(self, rows: list[tuple]) -> list[int]:
        """One transaction for every row of the batch: one WAL fsync (synchronous=FULL) for all."""
        with self.db.transaction() as conn:
            inserted = [conn.execute(_INSERT, row).rowcount for row in rows]
            self._own_changes += sum(inserted)  # under the database's lock, after the rows (other_changes)
            return inserted

    def other_changes(self) -> int:
        """A count that grows with every row this process changes in the database, except the instance
        rows this store inserts: while it stays the same, no job, series decision or removal happened.

        Read without a lock: during a commit of this store it may read too high for a moment, never
        too low, so a cache keyed by it is at worst dropped for nothing (dicomnode.scp's loop guard).
        """
        return self.db.changes() - self._own_changes

    def paths(self, sop_uids: Iterable[str]) -> dict[str, Path]:
        """Absolute file paths of indexed instances, by SOP Instance UID (unknown UIDs are left out)."""
        result: dict[str, Path] = {}
        uids = list(sop_uids)
        for start in range(0, len(uids), 500):  # SQLite's default limit on bound parameters is 999
            chunk = uids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.query(
                f"SELECT sop_uid, path FROM instances WHERE sop_uid IN ({marks})", tuple(chunk)
            )
            result.update({row["sop_uid"]: self.root / row["path"] for row in rows})
        return result


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    finally:
        os.close(fd)


def _row(meta: InstanceMeta, calling_ae: str, path: str) -> tuple:
    return (
        meta.sop_uid,
        meta.study_uid,
        meta.series_uid,
        meta.sop_class_uid,
        meta.modality,
        meta.frame_of_reference_uid,
        meta.units,
        "\\".join(meta.corrected_image),
        meta.series_type,
        meta.number_of_slices,
        *meta.position_mm,
        "\\".join(f"{v:.6f}" for v in meta.orientation),
        meta.rows,
        meta.columns,
        *meta.pixel_spacing_mm,
        int(meta.derived_by_us),
        calling_ae,
        time.time(),
        path,
    )
