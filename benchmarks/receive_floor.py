"""The floor of a durable Python receiver: pynetdicom, raw bytes, fsync, rename — nothing else.

    .venv/bin/python benchmarks/receive_floor.py --port PORT --out DIR [--ae PACS] [--no-directory-fsync]

A Storage SCP for PET and CT (uncompressed transfer syntaxes) on 127.0.0.1 that answers each C-STORE
Success only after the data set's bytes, exactly as received (preamble and file meta prepended by
pynetdicom, nothing parsed), are written to a temporary file, fsynced and renamed to
``DIR/<SOP Instance UID>.dcm``, and the directory is fsynced so that the new name survives a power cut
too. No validation, no database: whatever a durable receiver written in Python on pynetdicom must do
at least, so ``benchmarks/receive.py`` can report the node's rate as a fraction of it.
``--no-directory-fsync`` leaves the rename to the file system's next journal commit (the bytes are
durable at Success, their name not yet): one wait for the disk per instance instead of two. Same
network settings as the node (TCP_NODELAY, 128 kB PDUs), so the difference between the two is what
the node does per instance. Runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    PositronEmissionTomographyImageStorage,
    Verification,
)

MAX_PDU_BYTES = 131072  # as dicomnode.scp.MAX_PDU_BYTES
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700


def _nodelay(event: evt.Event) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _store(event: evt.Event, out: Path, directory_fsync: bool) -> int:
    name = str(event.request.AffectedSOPInstanceUID)
    tmp, final = out / f".{name}.part", out / f"{name}.dcm"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(event.encoded_dataset(include_meta=True))
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        if directory_fsync:
            fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError:
        return OUT_OF_RESOURCES
    return SUCCESS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="directory for the received files")
    parser.add_argument("--ae", default="PACS", help="our AE title")
    parser.add_argument("--no-directory-fsync", action="store_true", help="do not fsync the directory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title=args.ae)
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.add_supported_context(Verification)
    for sop_class in (PositronEmissionTomographyImageStorage, CTImageStorage):
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    store = (evt.EVT_C_STORE, _store, [args.out, not args.no_directory_fsync])
    handlers = [(evt.EVT_CONN_OPEN, _nodelay), store]
    server = ae.start_server(("127.0.0.1", args.port), block=False, evt_handlers=handlers)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
