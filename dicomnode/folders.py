"""Find the one series of a modality in a folder tree (for offline use: ``upete enhance``)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

__all__ = ["FolderError", "find_series"]

_TAGS = ["SOPClassUID", "Modality", "SeriesInstanceUID", "SeriesDescription", "SeriesNumber"]
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR


class FolderError(Exception):
    """The folder does not hold exactly one series of the wanted modality; the message says what it holds."""


def find_series(folder: str | os.PathLike[str], modality: str) -> list[Path]:
    """The files of the single ``modality`` series under ``folder`` (searched recursively).

    Files that are not DICOM (or are DICOMDIRs) and DICOM files of other modalities are ignored.
    Raises :class:`FolderError` when there is no such series or more than one.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FolderError(f"{root}: not a folder")
    series: dict[str, list[Path]] = defaultdict(list)
    labels: dict[str, str] = {}
    other = skipped = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
            except (InvalidDicomError, OSError, ValueError, EOFError, TypeError):
                skipped += 1
                continue
            if "SeriesInstanceUID" not in ds or ds.get("SOPClassUID") == _MEDIA_STORAGE_DIRECTORY:
                skipped += 1
                continue
            if str(ds.get("Modality", "")) != modality:
                other += 1
                continue
            uid = str(ds.SeriesInstanceUID)
            series[uid].append(path)
            labels[uid] = f"series {ds.get('SeriesNumber', '?')} \"{ds.get('SeriesDescription', '')}\""
    ignored = f"({other} DICOM file(s) of other modalities and {skipped} other file(s) ignored)"
    if not series:
        raise FolderError(f"{root}: no {modality} series found {ignored}")
    if len(series) > 1:
        listing = "; ".join(f"{labels[uid]}: {len(files)} file(s), UID {uid}"
                            for uid, files in series.items())
        raise FolderError(f"{root}: holds {len(series)} {modality} series, expected one ({listing}); "
                          "point the option at a folder with a single series")
    return next(iter(series.values()))
