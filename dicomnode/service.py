"""The node process: builds the SCP and its workers, runs until SIGTERM/SIGINT, stops gracefully."""

from __future__ import annotations

import logging
import signal
import threading

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicomnode.config import Settings

log = logging.getLogger("upete.service")


def _handle_echo(event: evt.Event) -> int:
    return 0x0000


def run_node(settings: Settings) -> int:
    """Serve until a stop signal; returns the process exit status."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        # Only set a flag: the main loop does the stopping.
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    ae = AE(ae_title=settings.node.ae_title)
    ae.add_supported_context(Verification)
    ae.maximum_associations = settings.node.max_associations
    server = ae.start_server(
        (settings.node.host, settings.node.port),
        block=False,
        evt_handlers=[(evt.EVT_C_ECHO, _handle_echo)],
    )
    log.info("listening", extra={"fields": {"ae": settings.node.ae_title, "host": settings.node.host,
                                            "port": settings.node.port}})
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        log.info("stopped")
    return 0
