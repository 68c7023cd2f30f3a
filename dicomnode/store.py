"""The instance store: a spool of DICOM files plus their rows in the node database.

Contract of :meth:`InstanceStore.put` (what makes "Success" safe to answer):

1. the received DICOM file is moved (renamed; copied when it lives on another file system) — or, given
   as bytes, written — to a new temporary file under ``<root>/tmp``, and fsynced. The SCP hands over
   the file pynetdicom streamed the data set into, so an instance is never held whole in memory and
   never re-encoded;
2. the file is renamed atomically to ``<root>/instances/<study>/<series>/<sop>.dcm`` and the directory
   is fsynced, so the name survives a power cut;
3. only then its row is inserted (one committed SQLite transaction, WAL fsynced).

A crash between any two steps leaves either nothing the index knows about (a stray temp file, removed
at the next start; or a renamed file without a row, overwritten when the sender resends the instance
it never saw acknowledged) or a complete instance. A second copy of an indexed SOP Instance UID is
answered as stored without writing anything (idempotent). Any write error, or less than
``storage.min_free_mb`` free, raises :class:`OutOfResources` with nothing half-written left behind.
Free space is measured again for every instance, so the node accepts instances again by itself as
soon as space returns.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

from dicomnode.db import Database
from dicomnode.validate import InstanceMeta

__all__ = ["InstanceStore", "OutOfResources", "PutResult", "free_bytes", "fsync_dir"]

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


def free_bytes(path: Path) -> int:
    """Free space of the file system holding ``path`` (a module function so tests can fake a full disk)."""
    return shutil.disk_usage(path).free


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def remove_stale_temp_files(self) -> int:
        """Delete temp files a killed process left (never acknowledged); returns how many. Call at start."""
        count = 0
        for path in self.tmp_dir.iterdir():
            path.unlink(missing_ok=True)
            count += 1
        return count

    def relative_path(self, meta: InstanceMeta) -> Path:
        # UIDs are validated as digits and dots (dicomnode.validate), so they are safe file names.
        return Path("instances") / meta.study_uid / meta.series_uid / f"{meta.sop_uid}.dcm"

    def contains(self, sop_uid: str) -> bool:
        return bool(self.db.query(_EXISTS, (sop_uid,)))

    def put(self, meta: InstanceMeta, source: bytes | Path, *, calling_ae: str = "") -> PutResult:
        """Store one instance durably (see the module docstring).

        ``source`` is a DICOM file (with meta): a path, which is moved into the spool (the caller's file
        is gone afterwards unless the instance was a duplicate or refused), or its bytes.
        Raises :class:`OutOfResources` when it cannot; then nothing of this call remains on disk.
        """
        if self.contains(meta.sop_uid):
            return PutResult.DUPLICATE
        try:
            size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
            free = free_bytes(self.root)
        except OSError as exc:
            raise OutOfResources(f"cannot measure the instance or the free space: {exc}") from exc
        if free - size < self.min_free_bytes:
            free_mb, min_mb = free // (1024 * 1024), self.min_free_bytes // (1024 * 1024)
            raise OutOfResources(f"{free_mb} MB free, below storage.min_free_mb ({min_mb})")
        relative = self.relative_path(meta)
        final = self.root / relative
        tmp = self.tmp_dir / f"{meta.sop_uid}.{uuid.uuid4().hex}.part"
        try:
            if isinstance(source, bytes):
                self._write_durably(tmp, source)
            else:
                self._move_durably(Path(source), tmp)
            _makedirs_durable(final.parent, self.root)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise OutOfResources(f"cannot write the instance: {reason}") from exc
        try:
            with self.db.transaction() as conn:
                inserted = conn.execute(_INSERT, _row(meta, calling_ae, str(relative))).rowcount
        except sqlite3.Error as exc:
            # The file is complete but unindexed: remove it so no half-stored instance remains (the
            # sender gets a failure status and sends it again).
            final.unlink(missing_ok=True)
            raise OutOfResources(f"cannot index the instance: {exc}") from exc
        # rowcount 0: another association stored the same SOP Instance UID in between (same bytes).
        return PutResult.STORED if inserted else PutResult.DUPLICATE

    @staticmethod
    def _move_durably(source: Path, path: Path) -> None:
        """Rename ``source`` to ``path`` (a copy in chunks across file systems), then fsync it."""
        try:
            os.replace(source, path)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            with open(source, "rb") as src, open(path, "xb") as dst:
                shutil.copyfileobj(src, dst, _COPY_CHUNK)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _write_durably(path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

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
