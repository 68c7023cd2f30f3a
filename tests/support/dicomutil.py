"""Reusable helpers for tests that need DICOM files: a small PET/CT study on disk, dciodvfy.

``make_study(tmp_path)`` writes a PET/CT study of a simple torso phantom (body ellipse, lungs, hot
lesion) defined in patient coordinates, so PET and CT on different grids show the same anatomy:

    PET 24×32×32 (z, y, x), 3 × 4 × 4 mm, centred on the origin — folder ``pet/``
    CT  30×48×48, 3 × 3 × 3 mm, larger than the PET and offset — folder ``ct/``
    NAC PET on the PET grid (optional) — folder ``nac/``
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicomnode.testing.scanner import StudyInfo, write_ct_series, write_pet_series
from tests.conftest import VENV_BIN, require_tool

PET_SHAPE = (24, 32, 32)
PET_SPACING = (3.0, 4.0, 4.0)  # (z, y, x) mm
CT_SHAPE = (30, 48, 48)
CT_SPACING = (3.0, 3.0, 3.0)


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of ``dciodvfy FILE`` that start with ``Error`` (empty list = valid)."""
    exe = require_tool(str(VENV_BIN / "dciodvfy"))
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dcentvfy_errors(paths: list[Path]) -> list[str]:
    """The ``Error`` lines of ``dcentvfy`` (consistency of patient/study/series attributes across files)."""
    exe = require_tool(str(VENV_BIN / "dcentvfy"))
    proc = subprocess.run([exe, *map(str, paths)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def origin_for(shape: tuple[int, int, int], spacing: tuple[float, float, float],
               centre: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> tuple[float, float, float]:
    """(x, y, z) position of voxel [0, 0, 0] of an axial grid centred on ``centre`` (x, y, z)."""
    nz, ny, nx = shape
    dz, dy, dx = spacing
    return (centre[0] - (nx - 1) * dx / 2, centre[1] - (ny - 1) * dy / 2, centre[2] - (nz - 1) * dz / 2)


def patient_points(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                   origin: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient coordinates (x, y, z) in mm of every voxel of an axial grid, each shaped ``shape``."""
    nz, ny, nx = shape
    dz, dy, dx = spacing
    z, y, x = np.meshgrid(np.arange(nz) * dz + origin[2], np.arange(ny) * dy + origin[1],
                          np.arange(nx) * dx + origin[0], indexing="ij")
    return x, y, z


LESION_CENTRE = (14.0, 6.0, 3.0)  # (x, y, z) mm
LESION_RADIUS = 9.0


def phantom_activity(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Activity in Bq/ml: body 5 kBq/ml, lungs 1 kBq/ml, one 40 kBq/ml lesion, air 0."""
    body = (x / 55.0) ** 2 + (y / 40.0) ** 2 <= 1.0
    lungs = ((np.abs(x) - 25.0) / 15.0) ** 2 + (y / 20.0) ** 2 <= 1.0
    cx, cy, cz = LESION_CENTRE
    lesion = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= LESION_RADIUS**2
    activity = np.where(body, 5000.0, 0.0)
    activity = np.where(body & lungs, 1000.0, activity)
    activity = np.where(lesion, 40000.0, activity)
    return activity.astype(np.float32)


def phantom_hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """CT in HU: soft tissue 40, lungs −800, air −1000 (same anatomy as :func:`phantom_activity`)."""
    body = (x / 55.0) ** 2 + (y / 40.0) ** 2 <= 1.0
    lungs = ((np.abs(x) - 25.0) / 15.0) ** 2 + (y / 20.0) ** 2 <= 1.0
    hu = np.where(body, 40.0, -1000.0)
    return np.where(body & lungs, -800.0, hu).astype(np.float32)


@dataclass
class SyntheticStudy:
    study: StudyInfo
    pet_dir: Path
    ct_dir: Path
    pet_paths: list[Path]
    ct_paths: list[Path]
    nac_paths: list[Path]
    pet_bqml: np.ndarray  # (z, y, x) what was written (before 16-bit quantisation)
    ct_hu: np.ndarray
    pet_origin: tuple[float, float, float]
    ct_origin: tuple[float, float, float]


def make_study(tmp: Path, *, noise_seed: int | None = 0, shuffle_seed: int | None = 1, with_nac: bool = False,
               transfer_syntax: str | None = None, scanner_sins: bool = False,
               study: StudyInfo | None = None, pet_shape: tuple[int, int, int] = PET_SHAPE,
               pet_spacing: tuple[float, float, float] = PET_SPACING,
               ct_shape: tuple[int, int, int] = CT_SHAPE, ct_spacing: tuple[float, float, float] = CT_SPACING,
               ct_centre: tuple[float, float, float] = (1.5, -2.0, 4.0), body_scale: float = 1.0,
               ) -> SyntheticStudy:
    """Write a small PET/CT study (and optionally an NAC PET series) under ``tmp``; see the module doc.

    The grids (``pet_shape``/``pet_spacing``, ``ct_shape``/``ct_spacing`` with the CT centred on
    ``ct_centre`` (x, y, z) mm) and the phantom's size (``body_scale`` × the 110 × 80 mm body, lungs
    and lesion with it) can be changed, e.g. to give a wide PET field of view a 50 cm CT.
    """
    study = study or StudyInfo()
    kwargs = {"transfer_syntax": transfer_syntax} if transfer_syntax else {}

    def scaled(points: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
        return tuple(axis / body_scale for axis in points)

    pet_origin = origin_for(pet_shape, pet_spacing)
    pet = phantom_activity(*scaled(patient_points(pet_shape, pet_spacing, pet_origin)))
    if noise_seed is not None:
        # Multiplicative gamma noise keeps activity non-negative, like reconstructed low-dose PET.
        rng = np.random.default_rng(noise_seed)
        pet = (pet * rng.gamma(8.0, 1 / 8.0, pet.shape)).astype(np.float32)
    ct_origin = origin_for(ct_shape, ct_spacing, centre=ct_centre)
    ct = phantom_hu(*scaled(patient_points(ct_shape, ct_spacing, ct_origin)))
    pet_paths = write_pet_series(tmp / "pet", pet, spacing_mm=pet_spacing, origin_mm=pet_origin,
                                 study=study, series_number=3, shuffle_seed=shuffle_seed,
                                 scanner_sins=scanner_sins, **kwargs)
    ct_paths = write_ct_series(tmp / "ct", ct, spacing_mm=ct_spacing, origin_mm=ct_origin, study=study,
                               series_number=2, shuffle_seed=shuffle_seed, **kwargs)
    nac_paths: list[Path] = []
    if with_nac:
        nac_paths = write_pet_series(tmp / "nac", pet * 0.3, spacing_mm=pet_spacing, origin_mm=pet_origin,
                                     study=study, series_number=4, series_description="PET NAC",
                                     attenuation_corrected=False, shuffle_seed=shuffle_seed, **kwargs)
    return SyntheticStudy(study, tmp / "pet", tmp / "ct", pet_paths, ct_paths, nac_paths, pet, ct,
                          pet_origin, ct_origin)
