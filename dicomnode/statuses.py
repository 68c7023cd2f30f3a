"""C-STORE statuses (PS3.4 Annex B.2.3, Table B.2-1) and :class:`Refusal`, which carries one.

Shared by the receive-time checks (:mod:`dicomnode.validate`, :mod:`dicomnode.elements`) and the SCP.
"""

from __future__ import annotations

__all__ = [
    "Refusal",
    "SUCCESS",
    "OUT_OF_RESOURCES",
    "DATASET_MISMATCH",
    "CANNOT_UNDERSTAND",
    "CANNOT_DECODE",
    "PROCESSING_FAILURE",
]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (A7xx)
DATASET_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class (A9xx)
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand (Cxxx)
# Two codes of the same Cxxx family, chosen to match pynetdicom's own: the dataset bytes do not
# decode at all (0xC210), and an unexpected exception in our handler (0xC211).
CANNOT_DECODE = 0xC210
PROCESSING_FAILURE = 0xC211


class Refusal(Exception):
    """The instance is refused: ``status`` to answer, ``attribute`` at fault, ``reason`` for the log."""

    def __init__(self, status: int, attribute: str, reason: str) -> None:
        super().__init__(f"{attribute}: {reason}")
        self.status = status
        self.attribute = attribute
        self.reason = reason
