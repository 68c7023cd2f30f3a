"""The instance store: durable before Success, idempotent, nothing half-written on failure."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dicomnode import store as store_module
from dicomnode.db import DB_FILENAME, Database
from dicomnode.store import InstanceStore, OutOfResources, PutResult
from dicomnode.validate import InstanceMeta

STUDY, SERIES = "1.2.3", "1.2.3.4"


def meta(sop_uid: str = "1.2.3.4.5", **overrides: object) -> InstanceMeta:
    fields = dict(
        sop_uid=sop_uid,
        study_uid=STUDY,
        series_uid=SERIES,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.128",
        modality="PT",
        frame_of_reference_uid="1.2.3.9",
        position_mm=(0.0, 0.0, 4.0),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        rows=32,
        columns=32,
        pixel_spacing_mm=(4.0, 4.0),
        units="BQML",
        corrected_image=("ATTN", "DECY"),
        series_type="STATIC",
        number_of_slices=24,
    )
    fields.update(overrides)
    return InstanceMeta(**fields)


@pytest.fixture
def store(tmp_path: Path) -> InstanceStore:
    db = Database(tmp_path / DB_FILENAME)
    yield InstanceStore(tmp_path / "spool", db)
    db.close()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_writes_the_file_then_the_row(store: InstanceStore) -> None:
    result = store.put(meta(), b"DICOM bytes", calling_ae="SCANNER")
    assert result is PutResult.STORED
    path = store.root / "instances" / STUDY / SERIES / "1.2.3.4.5.dcm"
    assert path.read_bytes() == b"DICOM bytes"
    rows = store.db.query("SELECT * FROM instances")
    assert len(rows) == 1
    row = rows[0]
    assert (row["modality"], row["units"], row["corrected_image"], row["number_of_slices"]) == (
        "PT",
        "BQML",
        "ATTN\\DECY",
        24,
    )
    assert (row["position_z"], row["rows"], row["row_spacing"], row["calling_ae"]) == (
        4.0,
        32,
        4.0,
        "SCANNER",
    )
    assert store.root / row["path"] == path
    assert not list(store.tmp_dir.iterdir())
    assert store.paths(["1.2.3.4.5", "9.9"]) == {"1.2.3.4.5": path}


def test_duplicate_is_idempotent(store: InstanceStore) -> None:
    assert store.put(meta(), b"first") is PutResult.STORED
    assert store.put(meta(), b"second") is PutResult.DUPLICATE
    assert len(store.db.query("SELECT * FROM instances")) == 1
    assert (store.root / "instances" / STUDY / SERIES / "1.2.3.4.5.dcm").read_bytes() == b"first"


def test_below_min_free_space_refuses_and_writes_nothing(tmp_path: Path) -> None:
    db = Database(tmp_path / DB_FILENAME)
    store = InstanceStore(tmp_path / "spool", db, min_free_mb=10**9)  # a petabyte: never free
    with pytest.raises(OutOfResources, match="min_free_mb"):
        store.put(meta(), b"x")
    assert _files(store.root) == []
    assert db.query("SELECT * FROM instances") == []


@pytest.mark.parametrize("failing", ["os.fsync", "os.replace", "os.write"])
def test_write_error_leaves_nothing_half_written(
    store: InstanceStore, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(f"dicomnode.store.{failing}", disk_full)
    with pytest.raises(OutOfResources, match="disk full"):
        store.put(meta(), b"x" * 1000)
    monkeypatch.undo()
    assert _files(store.root) == []
    assert store.db.query("SELECT * FROM instances") == []
    # The node keeps working once the disk has room again.
    assert store.put(meta(), b"x") is PutResult.STORED


def test_index_error_removes_the_file(store: InstanceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_transaction():
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store.db, "transaction", broken_transaction)
    with pytest.raises(OutOfResources, match="cannot index"):
        store.put(meta(), b"x")
    monkeypatch.undo()
    assert _files(store.root) == []


def test_stale_temp_files_are_removed_at_start(store: InstanceStore) -> None:
    (store.tmp_dir / "1.2.3.abc.part").write_bytes(b"half")
    assert store.remove_stale_temp_files() == 1
    assert not list(store.tmp_dir.iterdir())


def test_index_survives_reopening(tmp_path: Path) -> None:
    db = Database(tmp_path / DB_FILENAME)
    InstanceStore(tmp_path / "spool", db).put(meta(), b"x")
    db.close()
    again = Database(tmp_path / DB_FILENAME)
    assert InstanceStore(tmp_path / "spool", again).contains("1.2.3.4.5")
    assert again.query("PRAGMA journal_mode")[0][0] == "wal"
    again.close()


def test_put_of_a_received_file_moves_it_into_the_spool(store: InstanceStore, tmp_path: Path) -> None:
    received = tmp_path / "received.dcm"  # what pynetdicom streamed the data set into
    received.write_bytes(b"DICOM file")
    assert store.put(meta(), received) is PutResult.STORED
    assert not received.exists()  # moved, not copied: no second copy of the pixels
    assert (store.root / "instances" / STUDY / SERIES / "1.2.3.4.5.dcm").read_bytes() == b"DICOM file"
    again = tmp_path / "again.dcm"
    again.write_bytes(b"other")
    assert store.put(meta(), again) is PutResult.DUPLICATE
    assert again.exists()  # a duplicate leaves the caller's file alone (pynetdicom deletes it)
    assert not list(store.tmp_dir.iterdir())


def test_put_of_a_file_on_another_file_system_copies_it(
    store: InstanceStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    received = tmp_path / "received.dcm"
    received.write_bytes(b"x" * 3_000_000)
    real_replace = os.replace

    def cross_device(src: object, dst: object) -> None:
        if Path(src) == received:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real_replace(src, dst)

    monkeypatch.setattr("dicomnode.store.os.replace", cross_device)
    assert store.put(meta(), received) is PutResult.STORED
    assert (store.root / "instances" / STUDY / SERIES / "1.2.3.4.5.dcm").stat().st_size == 3_000_000
    assert not list(store.tmp_dir.iterdir())


def test_free_space_is_measured_for_every_instance(
    store: InstanceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.min_free_bytes = 500 * 1024 * 1024
    free = {"bytes": 100 * 1024 * 1024}
    monkeypatch.setattr("dicomnode.store.free_bytes", lambda _path: free["bytes"])
    with pytest.raises(OutOfResources, match="100 MB free, below storage.min_free_mb \\(500\\)"):
        store.put(meta(), b"x")
    free["bytes"] = 10 * 1024**3
    assert store.put(meta(), b"x") is PutResult.STORED


def test_file_and_directory_are_fsynced_before_the_row_is_committed(
    store: InstanceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[object] = []
    real_fsync, real_transaction = os.fsync, store.db.transaction

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(os.fstat(fd).st_ino)

    def recording_transaction(*args: object, **kwargs: object):
        events.append("commit")
        return real_transaction(*args, **kwargs)

    monkeypatch.setattr("dicomnode.store.os.fsync", recording_fsync)
    monkeypatch.setattr(store.db, "transaction", recording_transaction)
    assert store.put(meta(), b"DICOM bytes") is PutResult.STORED
    path = store.root / "instances" / STUDY / SERIES / "1.2.3.4.5.dcm"
    commit = events.index("commit")
    assert path.stat().st_ino in events[:commit]
    assert path.parent.stat().st_ino in events[:commit]


def test_a_leftover_file_without_a_row_is_replaced(store: InstanceStore) -> None:
    # What a power cut during a store can leave: the final name, partial bytes, no row.
    path = store.root / "instances" / STUDY / SERIES / "1.2.3.4.5.dcm"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"par")
    assert store.put(meta(), b"DICOM bytes") is PutResult.STORED
    assert path.read_bytes() == b"DICOM bytes"


def test_concurrent_stores_of_one_instance_store_it_once(store: InstanceStore, tmp_path: Path) -> None:
    sources = []
    for k in range(8):
        source = tmp_path / f"received{k}.dcm"
        source.write_bytes(b"same instance")
        sources.append(source)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda source: store.put(meta(), source), sources))
    assert results.count(PutResult.STORED) == 1
    assert results.count(PutResult.DUPLICATE) == 7
    assert (store.root / "instances" / STUDY / SERIES / "1.2.3.4.5.dcm").read_bytes() == b"same instance"


def test_concurrent_stores_of_many_instances_are_all_stored(store: InstanceStore) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda k: store.put(meta(f"1.2.3.4.{k}"), b"x"), range(1, 41)))
    assert results == [PutResult.STORED] * 40
    assert len(store.db.query("SELECT * FROM instances")) == 40


def test_the_fsyncs_are_under_way_before_the_caller_validates(
    store: InstanceStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The caller parses and validates in Python while holding the GIL; a helper that had not reached
    # its fsync by then would only begin once the validation is over.
    # As in a node that has been receiving: the series' directory exists (no fsync while it is created)
    # and the helpers are started and idle (starting a thread would itself let the new helper run first).
    assert store.put(meta("1.2.3.4.6"), b"x") is PutResult.STORED
    for done in [store._file_syncs.submit(time.sleep, 0.05) for _ in range(32)]:
        done.result()
    real_fsync, entered, release = os.fsync, [], threading.Event()

    def slow_fsync(fd: int) -> None:
        entered.append(fd)  # first, before anything that lets the caller run
        release.wait(5)
        real_fsync(fd)

    monkeypatch.setattr("dicomnode.store.os.fsync", slow_fsync)
    received = tmp_path / "received.dcm"
    received.write_bytes(b"DICOM file")
    synced = store.begin_sync(received)
    assert len(entered) == 1  # begin_sync returned with the file's fsync running
    with store.staging(STUDY, SERIES, "1.2.3.4.5", received, synced=synced) as staged:
        assert len(entered) == 2  # the name's fsync too, before the block validates
        assert stat.S_ISDIR(os.fstat(entered[1]).st_mode)
        release.set()
        assert staged.commit(meta()) is PutResult.STORED
    assert store.contains("1.2.3.4.5")


def test_a_received_file_renamed_before_its_fsync_runs_is_still_fsynced(
    store: InstanceStore, tmp_path: Path
) -> None:
    # Every fsync helper busy: the received file's fsync waits in the queue while put() renames it.
    release = threading.Event()
    blockers = [store._file_syncs.submit(release.wait, 5) for _ in range(32)]
    received = tmp_path / "received.dcm"
    received.write_bytes(b"DICOM file")
    synced = store.begin_sync(received)
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(store.put, meta(), received, synced=synced)
        time.sleep(0.2)
        assert not result.done()  # put() waits for the file's fsync before the row
        release.set()
        assert result.result(timeout=10) is PutResult.STORED
    assert all(blocker.result() for blocker in blockers)
    assert (store.root / "instances" / STUDY / SERIES / "1.2.3.4.5.dcm").read_bytes() == b"DICOM file"


def test_a_staged_instance_refused_during_validation_leaves_nothing(
    store: InstanceStore, tmp_path: Path
) -> None:
    received = tmp_path / "received.dcm"
    received.write_bytes(b"DICOM file")
    staging = store.staging(STUDY, SERIES, "1.2.3.4.5", received)
    with pytest.raises(RuntimeError, match="refused"), staging as staged:
        assert (store.root / staged.relative).read_bytes() == b"DICOM file"  # named while validated
        raise RuntimeError("refused")
    assert _files(store.root) == []
    assert store.db.query("SELECT * FROM instances") == []


def test_a_staged_instance_commits_only_its_own_metadata(store: InstanceStore) -> None:
    staging = store.staging(STUDY, SERIES, "1.2.3.4.5", b"x")
    with pytest.raises(ValueError, match="was staged"), staging as staged:
        staged.commit(meta("1.2.3.4.6"))
    assert _files(store.root) == []


def test_staging_an_indexed_instance_writes_nothing(store: InstanceStore) -> None:
    assert store.put(meta(), b"first") is PutResult.STORED
    with store.staging(STUDY, SERIES, "1.2.3.4.5", b"second") as staged:
        assert staged.duplicate
        assert staged.commit(meta()) is PutResult.DUPLICATE
    assert (store.root / "instances" / STUDY / SERIES / "1.2.3.4.5.dcm").read_bytes() == b"first"


def test_a_staged_file_renamed_to_other_uids_is_committed_under_them(
    store: InstanceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced_directories = []
    real_fsync_dir = store_module.fsync_dir
    monkeypatch.setattr(store_module, "fsync_dir", lambda path, ready=None: (
        synced_directories.append(path), real_fsync_dir(path, ready)))
    with store.staging("9.9", "9.9.9", "1.2.3.4.5", b"DICOM file") as staged:  # a wrong guess
        staged.rename(STUDY, SERIES)  # what the full read said
        assert staged.commit(meta()) is PutResult.STORED
    assert _files(store.root) == [store.root / "instances" / STUDY / SERIES / "1.2.3.4.5.dcm"]
    assert store.root / "instances" / STUDY / SERIES in synced_directories  # the new name is durable
    assert store.db.query("SELECT path FROM instances")[0][0] == f"instances/{STUDY}/{SERIES}/1.2.3.4.5.dcm"


def test_a_renamed_staged_file_refused_afterwards_leaves_no_file(store: InstanceStore) -> None:
    staging = store.staging("9.9", "9.9.9", "1.2.3.4.5", b"x")
    with pytest.raises(RuntimeError, match="refused"), staging as staged:
        staged.rename(STUDY, SERIES)
        raise RuntimeError("refused")
    assert _files(store.root) == []


def test_renaming_a_duplicate_writes_nothing(store: InstanceStore) -> None:
    assert store.put(meta(), b"first") is PutResult.STORED
    with store.staging("9.9", "9.9.9", "1.2.3.4.5", b"second") as staged:
        staged.rename(STUDY, SERIES)
        assert staged.commit(meta()) is PutResult.DUPLICATE
    assert _files(store.root) == [store.root / "instances" / STUDY / SERIES / "1.2.3.4.5.dcm"]


def test_other_changes_count_every_write_but_the_instance_rows(store: InstanceStore) -> None:
    before = store.other_changes()
    assert store.put(meta(), b"x") is PutResult.STORED
    assert store.put(meta(), b"x") is PutResult.DUPLICATE
    assert store.other_changes() == before
    with store.db.transaction() as conn:
        conn.execute("INSERT INTO series_state (series_uid, study_uid, state, updated_at) "
                     "VALUES ('9', '9', 'job', 0)")
    assert store.other_changes() == before + 1
