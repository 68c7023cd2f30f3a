"""The simulated PET/CT dataset: one phantom per case, SPET and LPET at several doses, on disk.

Per case (:func:`simulate_case`): a phantom (:mod:`model.simulation.phantom`) is blurred by the scanner's
intrinsic resolution (in-plane and axial), projected with attenuation from its CT, counted once at
standard dose (Poisson), and every lower dose is a binomial thinning of *that* acquisition — as the
paper made its LPET by sampling list-mode data, so SPET and LPET share counts. Each is reconstructed
with the case's :class:`~model.physics.ReconSettings`; the reconstruction of the noiseless data is the
``expectation`` (the ceiling reference).

Reconstructions vary across cases (:data:`RECON_PRESETS`, drawn by :func:`recon_for_case` from a
pool), so models see several noise textures; :data:`HOLDOUT_RECONS` are never in the default pool,
for test sets "reconstructed with settings absent from training".

On disk (:func:`save_case`/:func:`load_case`): ``DIR/case_NNNN/arrays.npz`` (compressed float32 /
uint8 / uint16) and ``meta.json``, written last and atomically: a folder with ``meta.json`` is a
complete case.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.physics import (
    ReconSettings,
    ScannerModel,
    attenuation_factors,
    expected_counts,
    get_projector,
    mu_map_from_ct,
    reconstruct,
    thin_counts,
)
from model.physics.filters import gaussian_filter_axial, gaussian_filter_inplane
from model.simulation.phantom import ORGANS, Phantom, generate_phantom

__all__ = [
    "DEFAULT_DOSES",
    "HOLDOUT_RECONS",
    "RECON_PRESETS",
    "STANDARD_RECONS",
    "SimCase",
    "list_cases",
    "load_case",
    "recon_for_case",
    "save_case",
    "simulate_case",
]

DEFAULT_DOSES = (1.0, 0.5, 0.25, 0.1, 0.05, 0.02)
FORMAT_VERSION = 1


def _osem(iterations: int, psf: float, post: float) -> ReconSettings:
    return ReconSettings(
        algorithm="osem", iterations=iterations, subsets=8, psf_fwhm_mm=psf, postfilter_fwhm_mm=post
    )


def _fbp(cutoff: float, post: float) -> ReconSettings:
    return ReconSettings(algorithm="fbp", fbp_cutoff=cutoff, postfilter_fwhm_mm=post)


# OSEM 2–6 iterations with and without resolution modelling, FBP with two Hann cut-offs (fractions of
# Nyquist: at 2 mm pixels 0.5 is the clinical 8 mm period); post-filters of 4–6 mm FWHM. Keys are
# ReconSettings.name.
_STANDARD = (
    _osem(2, 0.0, 4.0),
    _osem(3, 0.0, 5.0),
    _osem(4, 4.0, 4.0),
    _osem(6, 5.0, 5.0),
    _osem(3, 0.0, 6.0),
    _fbp(0.8, 4.0),
    _fbp(0.5, 5.0),
)
_HOLDOUT = (_osem(5, 6.0, 6.0), _fbp(0.6, 6.0))
RECON_PRESETS: dict[str, ReconSettings] = {r.name: r for r in (*_STANDARD, *_HOLDOUT)}
STANDARD_RECONS: tuple[str, ...] = tuple(r.name for r in _STANDARD)
HOLDOUT_RECONS: tuple[str, ...] = tuple(r.name for r in _HOLDOUT)


def recon_for_case(seed: int, pool: Sequence[str] = STANDARD_RECONS) -> ReconSettings:
    """The reconstruction of case ``seed``: drawn from ``pool`` (preset names), deterministic by seed."""
    if not pool:
        raise ValueError("the reconstruction pool is empty")
    unknown = [name for name in pool if name not in RECON_PRESETS]
    if unknown:
        raise ValueError(f"unknown reconstruction preset(s) {unknown}; known: {sorted(RECON_PRESETS)}")
    rng = np.random.default_rng([int(seed), 0x5EC0])
    return RECON_PRESETS[pool[int(rng.integers(len(pool)))]]


@dataclass
class SimCase:
    """One simulated case; every array ``(z, y, x)``: activity in Bq/ml (float32), CT in HU.

    ``truth_bqml``: the noiseless phantom; ``expectation_bqml``: the reconstruction of its noiseless
    data (the ceiling); ``spet_bqml``: standard dose; ``lpet_bqml``: dose fraction → reconstruction
    (1.0 included when asked for: then the SPET itself). ``meta``: seed, recon, scanner, patient
    (``patient_weight_kg``, ``injected_activity_bq``, ``uptake_time_s``, ``bqml_per_suv`` — SUV =
    Bq/ml ÷ bqml_per_suv, decay included), lesions, organs, doses, count levels.
    """

    ct_hu: np.ndarray
    truth_bqml: np.ndarray
    expectation_bqml: np.ndarray
    spet_bqml: np.ndarray
    lpet_bqml: dict[float, np.ndarray]
    organ_labels: np.ndarray
    lesion_labels: np.ndarray
    spacing_mm: tuple[float, float, float]
    meta: dict = field(default_factory=dict)

    @property
    def recon(self) -> ReconSettings:
        return ReconSettings.from_dict(self.meta["recon"])


def _check_doses(doses: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(d) for d in doses)
    bad = [d for d in out if not 0 < d <= 1]
    if bad:
        raise ValueError(f"dose fractions must lie in (0, 1], found {bad}")
    if len(set(out)) != len(out):
        raise ValueError(f"dose fractions repeat: {list(doses)}")
    return out


def _seen_by_scanner(truth: torch.Tensor, scanner: ScannerModel, spacing: tuple[float, ...]) -> torch.Tensor:
    """What the scanner sees: the object blurred by its intrinsic resolution, in-plane and axially."""
    seen = gaussian_filter_inplane(truth, scanner.resolution_fwhm_mm, spacing[1], mode="zeros")
    # Axially the body goes on beyond the volume: replicate, do not fade the end slices.
    seen = gaussian_filter_axial(seen, scanner.resolution_fwhm_mm, spacing[0], mode="replicate")
    return seen.clamp_min(0.0)


def _phantom_meta(phantom: Phantom) -> dict[str, Any]:
    """The patient, uptake, organs and lesions of a case, as its metadata records them."""
    return {
        "patient_weight_kg": phantom.patient_weight_kg,
        "patient_height_m": phantom.patient_height_m,
        "injected_activity_bq": phantom.injected_activity_bq,
        "uptake_time_s": phantom.uptake_time_s,
        "bqml_per_suv": phantom.bqml_per_suv,
        "organ_suv": phantom.organ_suv,
        "organs": {str(k): v for k, v in ORGANS.items()},
        "lesions": [
            {
                "label": les.label,
                "center_mm": list(les.center_mm),
                "diameter_mm": les.diameter_mm,
                "organ": les.organ,
                "contrast": les.contrast,
                "suv": les.suv,
            }
            for les in phantom.lesions
        ],
    }


def _trues_per_slice(mean: torch.Tensor, phantom: Phantom, scanner: ScannerModel) -> dict[str, float]:
    """Median and largest expected true counts per body slice at standard dose (the count level)."""
    trues = (mean.sum(dim=(-2, -1)) / (1 + scanner.background_fraction)).cpu().numpy()
    body_slices = trues[phantom.body_mask.any(axis=(1, 2))]
    return {
        "median": float(np.median(body_slices)) if body_slices.size else 0.0,
        "max": float(body_slices.max()) if body_slices.size else 0.0,
    }


def simulate_case(
    seed: int,
    *,
    shape: tuple[int, int, int] = (160, 256, 256),
    doses: Sequence[float] = DEFAULT_DOSES,
    recon: ReconSettings | None = None,
    scanner: ScannerModel = ScannerModel(),  # noqa: B008 - frozen dataclass, immutable default
    spacing_mm: float = 2.0,
    use_mumap: bool = True,
    device: torch.device | str | None = None,
) -> SimCase:
    """Simulate case ``seed``: phantom, standard-dose counts, thinned doses, reconstructions.

    ``recon`` None draws one with :func:`recon_for_case` from the standard pool. ``doses``: fractions
    in (0, 1] for ``lpet_bqml`` (may be empty: SPET and expectation only). Slices must be square
    (the projector's geometry). Deterministic by ``seed`` on a given device.
    """
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"shape must be (z, y, x) with square slices (y == x), found {tuple(shape)}")
    doses = _check_doses(doses)
    recon = recon if recon is not None else recon_for_case(seed)
    started = time.perf_counter()
    phantom = generate_phantom(seed, shape=shape, spacing_mm=spacing_mm)
    spacing = phantom.spacing_mm
    dev = torch.device(device) if device is not None else torch.device("cpu")
    projector = get_projector(shape[1], pixel_size_mm=spacing[1], device=dev)
    generator = torch.Generator(device=dev).manual_seed(int(seed) * 7919 + 17)

    seen = _seen_by_scanner(torch.from_numpy(phantom.activity_bqml).to(dev), scanner, spacing)
    attenuation = None
    if use_mumap:
        mu = mu_map_from_ct(torch.from_numpy(phantom.ct_hu).to(dev))
        attenuation = attenuation_factors(projector, mu)
    physics = {
        "projector": projector,
        "scanner": scanner,
        "attenuation": attenuation,
        "slice_thickness_mm": spacing[0],
    }
    mean = expected_counts(seen, **physics)
    counts = torch.poisson(mean, generator=generator)

    def recon_volume(sino: torch.Tensor, dose: float) -> np.ndarray:
        image = reconstruct(sino, recon=recon, dose_fraction=dose, stack_is_volume=True, **physics)
        return image.cpu().numpy().astype(np.float32)

    expectation = recon_volume(mean, 1.0)
    spet = recon_volume(counts, 1.0)
    lpet = {
        d: (spet if d == 1.0 else recon_volume(thin_counts(counts, d, generator=generator), d)) for d in doses
    }

    meta = {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "shape": list(shape),
        "spacing_mm": list(spacing),
        "doses": list(doses),
        "recon": recon.to_dict(),
        "recon_name": recon.name,
        "scanner": scanner.to_dict(),
        "use_mumap": bool(use_mumap),
        **_phantom_meta(phantom),
        "standard_dose_trues_per_slice": _trues_per_slice(mean, phantom, scanner),
        "simulation_seconds": round(time.perf_counter() - started, 2),
    }
    return SimCase(
        ct_hu=phantom.ct_hu,
        truth_bqml=phantom.activity_bqml,
        expectation_bqml=expectation,
        spet_bqml=spet,
        lpet_bqml=lpet,
        organ_labels=phantom.organ_labels,
        lesion_labels=phantom.lesion_labels,
        spacing_mm=spacing,
        meta=meta,
    )


# -- on disk ----------------------------------------------------------------------------------------
def _dose_key(dose: float) -> str:
    return f"lpet_bqml_d{float(dose)!r}"  # repr round-trips the float exactly


_DOSE_KEY = re.compile(r"^lpet_bqml_d([0-9.e+-]+)$")


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_case(case: SimCase, folder: str | os.PathLike[str]) -> Path:
    """Write ``case`` to ``folder`` (created): ``arrays.npz`` then ``meta.json``, each atomically.

    The SPET is stored once; an LPET at dose 1.0 is the SPET and is not stored twice.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "ct_hu": case.ct_hu.astype(np.float32),
        "truth_bqml": case.truth_bqml.astype(np.float32),
        "expectation_bqml": case.expectation_bqml.astype(np.float32),
        "spet_bqml": case.spet_bqml.astype(np.float32),
        "organ_labels": case.organ_labels.astype(np.uint8),
        "lesion_labels": case.lesion_labels.astype(np.uint16),
    }
    for dose, volume in case.lpet_bqml.items():
        if float(dose) != 1.0:
            arrays[_dose_key(float(dose))] = volume.astype(np.float32)
    (folder / "meta.json").unlink(missing_ok=True)  # incomplete until the new meta lands
    _atomic_write(folder / "arrays.npz", lambda handle: np.savez_compressed(handle, **arrays))
    meta = dict(case.meta, spacing_mm=list(case.spacing_mm), doses=sorted(float(d) for d in case.lpet_bqml))
    text = json.dumps(meta, indent=2, sort_keys=True).encode()
    _atomic_write(folder / "meta.json", lambda handle: handle.write(text))
    return folder


def load_case(folder: str | os.PathLike[str]) -> SimCase:
    """Read a case written by :func:`save_case`."""
    folder = Path(folder)
    meta_path, arrays_path = folder / "meta.json", folder / "arrays.npz"
    if not meta_path.is_file() or not arrays_path.is_file():
        raise FileNotFoundError(f"{folder} is not a complete simulated case (arrays.npz + meta.json)")
    meta = json.loads(meta_path.read_text())
    with np.load(arrays_path) as data:
        arrays = {key: data[key] for key in data.files}
    lpet = {}
    for key, volume in arrays.items():
        match = _DOSE_KEY.match(key)
        if match:
            lpet[float(match.group(1))] = volume
    if 1.0 in [float(d) for d in meta.get("doses", [])]:
        lpet[1.0] = arrays["spet_bqml"]
    return SimCase(
        ct_hu=arrays["ct_hu"],
        truth_bqml=arrays["truth_bqml"],
        expectation_bqml=arrays["expectation_bqml"],
        spet_bqml=arrays["spet_bqml"],
        lpet_bqml=dict(sorted(lpet.items(), reverse=True)),
        organ_labels=arrays["organ_labels"],
        lesion_labels=arrays["lesion_labels"],
        spacing_mm=tuple(float(s) for s in meta["spacing_mm"]),
        meta=meta,
    )


def list_cases(root: str | os.PathLike[str]) -> list[Path]:
    """Complete case folders directly under ``root`` (``meta.json`` and ``arrays.npz``), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and (p / "meta.json").is_file() and (p / "arrays.npz").is_file()
    )
