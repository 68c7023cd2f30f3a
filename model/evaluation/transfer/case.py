"""One transfer case: a phantom imaged by one scanner style at the standard and lower doses.

Seeds of the transfer set start at :data:`SEED_BASE` (900000); no other part of the project uses seeds
from 900000 up, so no case here was ever trained on, tuned on or chosen by. A case's phantom, counts,
CT noise and each dose's thinning draw from their own streams of the seed, so asking for other doses
does not change the ones already made.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model.evaluation.transfer.acquisition import acquire, attenuation_from_hu, poisson_counts, thin
from model.evaluation.transfer.filters import gaussian_fwhm
from model.evaluation.transfer.phantom import LESION_LABEL_BASE, Phantom, draw_phantom
from model.evaluation.transfer.projector import RotateSumProjector
from model.evaluation.transfer.raster import Grid, block_mean, rasterise
from model.evaluation.transfer.reconstruction import reconstruct
from model.evaluation.transfer.styles import ScannerStyle, get_style

__all__ = [
    "DEFAULT_DOSES", "SEED_BASE", "CaseLesion", "TransferCase", "generate_case", "load_case", "save_case",
]

SEED_BASE = 900000
DEFAULT_DOSES = (0.02, 0.05, 0.1, 0.25, 0.5)
HALF_LIFE_S = 6586.2  # 18F
UPTAKE_S = 3600.0  # injection to the start of the PET acquisition
INJECTED_BQ_PER_KG = 3.5e6
_SUPERSAMPLE = (2, 2, 2)
_CT_SUPERSAMPLE = (1, 2, 2)
_CT_NOISE_HU = 8.0
_AIR_HU = -1000.0


@dataclass(frozen=True)
class CaseLesion:
    """A lesion of a case: label ``index`` in ``lesion_labels``, host, size (mm), centre (x, y, z mm)."""

    index: int
    host: str
    diameter_mm: float
    semi_axes_mm: tuple[float, float, float]
    center_mm: tuple[float, float, float]
    suv: float
    n_voxels: int


@dataclass
class TransferCase:
    """Everything one transfer case holds; PET volumes (z, y, x) in Bq/ml on the PET grid.

    ``expectation`` is the style's reconstruction of the noiseless sinogram: the image the noisy ones
    scatter around, the same for every dose (the reconstructions are scale-equivariant). ``spet`` is
    the standard-dose reconstruction, ``lpet[d]`` the dose-``d`` one (counts thinned from the SPET's).
    ``ct_hu`` is on its own grid (``ct_spacing_mm``, ``ct_origin_mm``: a 50 cm CT field of view) and
    covers the PET's slices. Origins are the (x, y, z) patient position of voxel [0, 0, 0].
    """

    style: str
    seed: int
    truth: np.ndarray
    expectation: np.ndarray
    spet: np.ndarray
    lpet: dict[float, np.ndarray]
    ct_hu: np.ndarray
    body: np.ndarray
    lesion_labels: np.ndarray
    lesions: tuple[CaseLesion, ...]
    pet_spacing_mm: tuple[float, float, float]
    pet_origin_mm: tuple[float, float, float]
    ct_spacing_mm: tuple[float, float, float]
    ct_origin_mm: tuple[float, float, float]
    weight_kg: float
    injected_bq: float
    bqml_per_suv: float
    trues_per_slice: float
    description: str


def _window(rng: np.random.Generator, length_mm: float) -> tuple[float, float]:
    centre = float(np.clip(rng.uniform(-200.0, 190.0), -330.0 + length_mm / 2, 330.0 - length_mm / 2))
    return centre - length_mm / 2, centre + length_mm / 2


def _lesion_masks(phantom: Phantom, labels_fine: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Lesion k where at least half a voxel is lesion k (else its fullest voxel); voxel counts per lesion."""
    out = np.zeros(tuple(n // s for n, s in zip(labels_fine.shape, _SUPERSAMPLE, strict=True)), np.int16)
    counts = []
    for lesion in phantom.lesions:
        frac = block_mean(labels_fine == LESION_LABEL_BASE + lesion.index, _SUPERSAMPLE)
        mask = frac >= 0.5
        if not mask.any() and frac.max() > 0:
            mask = frac == frac.max()
        out[mask] = lesion.index
        counts.append(int(mask.sum()))
    return out, counts


def generate_case(style: str | ScannerStyle, seed: int,
                  doses: tuple[float, ...] = DEFAULT_DOSES) -> TransferCase:
    """Make case ``seed`` of ``style`` (a name in :data:`STYLES` or a :class:`ScannerStyle`) at ``doses``."""
    st = get_style(style)
    if any(not 0 < d <= 1 for d in doses):
        raise ValueError(f"doses must be in (0, 1], found {doses}")
    rng = np.random.default_rng([seed, 0])
    z_low, z_high = _window(rng, st.n_slices * st.slice_mm)
    grid = Grid.centred(st.matrix, st.pixel_mm, st.n_slices, st.slice_mm, z_low + st.slice_mm / 2)
    phantom = draw_phantom(rng, fov_radius_mm=st.fov_mm / 2, z_window=(z_low, z_high))
    injected = INJECTED_BQ_PER_KG * phantom.weight_kg
    bqml_per_suv = injected * 2.0 ** (-UPTAKE_S / HALF_LIFE_S) / (phantom.weight_kg * 1000.0)

    labels = rasterise(phantom, grid, _SUPERSAMPLE)
    activity = phantom.lookup(phantom.suv, 0.0)[labels] * np.float32(bqml_per_suv)
    fine_spacing = tuple(d / s for d, s in zip(grid.spacing_mm, _SUPERSAMPLE, strict=True))
    truth = block_mean(activity, _SUPERSAMPLE)
    blurred = block_mean(gaussian_fwhm(activity, st.system_fwhm_mm, fine_spacing), _SUPERSAMPLE)
    del activity
    mu = attenuation_from_hu(block_mean(phantom.lookup(phantom.hu, _AIR_HU)[labels], _SUPERSAMPLE))
    body = block_mean(labels > 0, _SUPERSAMPLE) >= 0.5
    lesion_labels, lesion_voxels = _lesion_masks(phantom, labels)
    del labels

    projector = RotateSumProjector(st.matrix, st.pixel_mm, st.n_angles)
    acq = acquire(blurred, mu, projector, spacing_mm=grid.spacing_mm, trues_per_slice=st.trues_per_slice,
                  scatter_fraction=st.scatter_fraction, randoms_fraction=st.randoms_fraction)
    expectation = reconstruct(acq.mean, acq.model, st.recon)
    standard = poisson_counts(acq.mean, np.random.default_rng([seed, 1]))
    spet = reconstruct(standard, acq.model, st.recon)
    lpet = {}
    for d in doses:
        counts = thin(standard, d, np.random.default_rng([seed, 3, round(d * 1e6)]))
        lpet[float(d)] = spet.copy() if d == 1 else reconstruct(counts, acq.at_dose(d), st.recon)

    ct_grid = Grid.centred(st.ct_matrix, st.ct_pixel_mm, st.n_slices, st.slice_mm, grid.origin_mm[2])
    ct_labels = rasterise(phantom, ct_grid, _CT_SUPERSAMPLE)
    ct = block_mean(phantom.lookup(phantom.hu, _AIR_HU)[ct_labels], _CT_SUPERSAMPLE)
    ct += np.random.default_rng([seed, 2]).normal(0.0, _CT_NOISE_HU, ct.shape).astype(np.float32)

    lesions = tuple(
        CaseLesion(les.index, les.host, round(les.diameter_mm, 2),
                   tuple(round(a, 2) for a in les.shape.semi_axes),
                   tuple(round(c, 2) for c in les.shape.center), round(les.suv, 3), n)
        for les, n in zip(phantom.lesions, lesion_voxels, strict=True))
    return TransferCase(
        style=st.name, seed=seed, truth=truth, expectation=expectation, spet=spet, lpet=lpet,
        ct_hu=np.clip(ct, -1024, 3071).astype(np.float32), body=body, lesion_labels=lesion_labels,
        lesions=lesions, pet_spacing_mm=grid.spacing_mm, pet_origin_mm=grid.origin_mm,
        ct_spacing_mm=ct_grid.spacing_mm, ct_origin_mm=ct_grid.origin_mm,
        weight_kg=round(phantom.weight_kg, 2),
        injected_bq=injected, bqml_per_suv=bqml_per_suv, trues_per_slice=st.trues_per_slice,
        description=st.describe())


_ARRAYS = ("truth", "expectation", "spet", "ct_hu", "body", "lesion_labels")


def save_case(case: TransferCase, folder: str | Path) -> Path:
    """Write ``case`` into ``folder``: ``arrays.npz`` (compressed) and ``case.json`` (everything else)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(case, name) for name in _ARRAYS}
    arrays.update({f"lpet_{d!r}": v for d, v in case.lpet.items()})
    np.savez_compressed(out / "arrays.npz", **arrays)
    meta = {k: v for k, v in asdict(case).items() if k not in _ARRAYS and k != "lpet"}
    meta["doses"] = list(case.lpet)
    (out / "case.json").write_text(json.dumps(meta, indent=1))
    return out


def load_case(folder: str | Path) -> TransferCase:
    """Read a case :func:`save_case` wrote."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "case.json").read_text())
        data = np.load(folder / "arrays.npz")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{folder} holds no saved transfer case: {exc}") from None
    doses = meta.pop("doses")
    meta["lesions"] = tuple(CaseLesion(**{k: tuple(v) if isinstance(v, list) else v for k, v in les.items()})
                            for les in meta["lesions"])
    for key in ("pet_spacing_mm", "pet_origin_mm", "ct_spacing_mm", "ct_origin_mm"):
        meta[key] = tuple(meta[key])
    lpet = {float(d): data[f"lpet_{float(d)!r}"] for d in doses}
    return TransferCase(lpet=lpet, **{name: data[name] for name in _ARRAYS}, **meta)

