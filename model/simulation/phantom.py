"""Chest-abdomen PET/CT phantoms: anatomy, FDG uptake in Bq/ml, CT in HU, lesions with masks.

Deterministic by seed. Each phantom draws a patient (height, BMI → weight, subcutaneous fat, trunk
width and depth, injected activity, uptake time), an axial window of the trunk (liver always in it,
heart and lung bases mostly, bladder rarely), organ sizes, positions, rotations and boundary
roughness, per-organ FDG uptake (SUV) and HU, smooth heterogeneous uptake texture, and 0–8 lesions
of 4–30 mm with 2–10× contrast in liver, lung, bone, soft tissue (nodes), spleen or kidney.

Conventions: arrays ``(z, y, x)`` with z running inferior → superior, y anterior → posterior and x
patient right → left, as in a DICOM axial series with ascending slice position; activity is at the
scan start (decay-corrected as a scanner reports it), ``SUV = activity / bqml_per_suv``. A grid too
small for an adult trunk (a test's 64² say) holds a proportionally shrunken body; lesion sizes stay
physical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from model.simulation.fields import BodyGrid, smooth_field
from model.simulation.lesions import Lesion, add_lesions

__all__ = ["LABELS", "ORGANS", "Lesion", "Phantom", "generate_phantom"]

ORGANS: dict[int, str] = {
    0: "air",
    1: "fat",
    2: "muscle",
    3: "lung",
    4: "myocardium",
    5: "blood_pool",
    6: "liver",
    7: "spleen",
    8: "kidney",
    9: "bone",
    10: "bladder",
    11: "bowel",
    12: "spinal_cord",
}
LABELS: dict[str, int] = {name: k for k, name in ORGANS.items()}

# FDG at ~60 min p.i., SUVbw ranges per organ (drawn once per patient). Sources: EANM/SNMMI tumour
# imaging guideline reference values and the usual reading ranges (liver 2–3, blood pool 1.5–2.2,
# myocardium from fasting-suppressed to avid, bladder urine high).
SUV_RANGE: dict[str, tuple[float, float]] = {
    "air": (0.0, 0.0),
    "fat": (0.3, 0.5),
    "muscle": (0.6, 1.0),
    "lung": (0.35, 0.6),
    "myocardium": (2.0, 10.0),
    "blood_pool": (1.4, 2.2),
    "liver": (2.0, 3.0),
    "spleen": (1.6, 2.4),
    "kidney": (2.0, 4.0),
    "bone": (0.9, 1.6),
    "bladder": (6.0, 30.0),
    "bowel": (1.0, 2.2),
    "spinal_cord": (0.9, 1.4),
}
# Non-contrast CT, HU ranges per organ (bone is painted per structure: cortex vs marrow).
HU_RANGE: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -1000.0),
    "fat": (-110.0, -85.0),
    "muscle": (38.0, 55.0),
    "lung": (-860.0, -720.0),
    "myocardium": (35.0, 50.0),
    "blood_pool": (35.0, 48.0),
    "liver": (52.0, 68.0),
    "spleen": (42.0, 55.0),
    "kidney": (28.0, 40.0),
    "bone": (0.0, 0.0),
    "bladder": (2.0, 15.0),
    "bowel": (5.0, 40.0),
    "spinal_cord": (20.0, 32.0),
}
# Relative std of the smooth PET texture, and HU std of the CT texture, per organ.
PET_TEXTURE = {
    "fat": 0.12,
    "muscle": 0.1,
    "lung": 0.15,
    "myocardium": 0.18,
    "blood_pool": 0.05,
    "liver": 0.1,
    "spleen": 0.08,
    "kidney": 0.15,
    "bone": 0.15,
    "bladder": 0.03,
    "bowel": 0.35,
    "spinal_cord": 0.05,
}
CT_TEXTURE_HU = {
    "fat": 8.0,
    "muscle": 6.0,
    "lung": 45.0,
    "liver": 5.0,
    "spleen": 4.0,
    "kidney": 6.0,
    "bowel": 25.0,
    "blood_pool": 3.0,
    "myocardium": 4.0,
}

F18_HALF_LIFE_S = 6586.2


@dataclass
class Phantom:
    """A PET/CT phantom on one grid: ``activity_bqml`` and ``ct_hu`` float32, ``organ_labels`` uint8
    (keys of :data:`ORGANS`), ``lesion_labels`` uint16 (0 none, k = ``lesions[k-1]``), all ``(z, y, x)``."""

    activity_bqml: np.ndarray
    ct_hu: np.ndarray
    organ_labels: np.ndarray
    lesion_labels: np.ndarray
    lesions: list[Lesion]
    spacing_mm: tuple[float, float, float]
    patient_weight_kg: float
    patient_height_m: float
    injected_activity_bq: float
    uptake_time_s: float
    seed: int
    organ_suv: dict[str, float] = field(default_factory=dict)

    @property
    def bqml_per_suv(self) -> float:
        """Bq/ml at scan start of SUV 1: injected activity decayed over the uptake time per gram."""
        decay = math.exp(-math.log(2) * self.uptake_time_s / F18_HALF_LIFE_S)
        return self.injected_activity_bq * decay / (self.patient_weight_kg * 1000.0)

    @property
    def body_mask(self) -> np.ndarray:
        return self.organ_labels > 0


@dataclass(frozen=True)
class _Patient:
    height_m: float
    weight_kg: float
    fat_mm: float
    ka: float  # lateral scale of the lean trunk
    kb: float  # antero-posterior scale
    kz: float  # cranio-caudal scale (height)
    injected_bq: float
    uptake_s: float


def _sample_patient(rng: np.random.Generator) -> _Patient:
    height = float(np.clip(rng.normal(1.72, 0.09), 1.52, 1.95))
    bmi = float(rng.uniform(18.0, 36.0))
    weight = bmi * height**2
    fat = float(np.clip((4.0 + (bmi - 19.0) * 2.2) * rng.uniform(0.8, 1.2), 3.0, 50.0))
    kz = height / 1.75
    return _Patient(
        height_m=round(height, 3),
        weight_kg=round(weight, 1),
        fat_mm=fat,
        ka=math.sqrt(kz) * rng.uniform(0.9, 1.1),
        kb=math.sqrt(kz) * rng.uniform(0.9, 1.1),
        kz=kz,
        injected_bq=float(min(weight * rng.uniform(3.0, 4.5) * 1e6, 5.0e8)),
        uptake_s=float(rng.uniform(50.0, 75.0) * 60.0),
    )


# Lean trunk semi-axes (mm) along the reference height above the pubic symphysis (mm).
_PROFILE_Z = np.array([0.0, 100.0, 180.0, 260.0, 350.0, 430.0, 520.0, 760.0])
_PROFILE_A = np.array([168.0, 170.0, 158.0, 148.0, 150.0, 158.0, 164.0, 164.0])
_PROFILE_B = np.array([108.0, 108.0, 100.0, 97.0, 100.0, 108.0, 112.0, 112.0])


def _make_grid(
    rng: np.random.Generator, shape, spacing, patient: _Patient
) -> tuple[BodyGrid, np.ndarray, np.ndarray]:
    """The grid in body coordinates and the outer/lean trunk semi-axes per slice."""
    nz, ny, nx = shape
    sz, sy, sx = spacing
    max_a = _PROFILE_A.max() * patient.ka + patient.fat_mm
    max_b = _PROFILE_B.max() * patient.kb + 0.8 * patient.fat_mm
    scale = min(1.0, 0.46 * nx * sx / max_a, 0.46 * ny * sy / max_b)
    z_centre = rng.uniform(400.0, 470.0) * patient.kz
    z = z_centre + (np.arange(nz) - (nz - 1) / 2) * sz / scale
    y = (np.arange(ny) - (ny - 1) / 2) * sy / scale + rng.uniform(-8.0, 8.0)
    x = (np.arange(nx) - (nx - 1) / 2) * sx / scale + rng.uniform(-8.0, 8.0)
    lean_a = np.interp(z / patient.kz, _PROFILE_Z, _PROFILE_A) * patient.ka
    lean_b = np.interp(z / patient.kz, _PROFILE_Z, _PROFILE_B) * patient.kb
    return BodyGrid(z=z, y=y, x=x, scale=scale), lean_a, lean_b


class _Painter:
    """Paints labels (and bone HU) into the volume in anatomical order: later shapes win."""

    def __init__(self, grid: BodyGrid, patient: _Patient, rng: np.random.Generator, shape_field: np.ndarray):
        self.grid, self.p, self.rng, self.field = grid, patient, rng, shape_field
        self.labels = np.zeros(grid.shape, dtype=np.uint8)
        self.bone_hu = np.zeros(grid.shape, dtype=np.float32)

    def at(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        """Reference-anatomy position → this patient's body mm, as (z, y, x)."""
        return (z * self.p.kz, y * self.p.kb, x * self.p.ka)

    def size(self, rx: float, ry: float, rz: float, jitter: float = 0.12) -> tuple[float, float, float]:
        j = self.rng.uniform(1 - jitter, 1 + jitter, size=3)
        return (rz * self.p.kz * j[0], ry * self.p.kb * j[1], rx * self.p.ka * j[2])

    def paint(self, shape, name: str, *, where=None, hu=None) -> None:
        if shape is None:
            return
        box, mask, level = shape
        if where is not None:
            mask = mask & where(box, level)
        self.labels[box][mask] = LABELS[name]
        if hu is not None:
            self.bone_hu[box][mask] = hu(level)[mask] if callable(hu) else hu

    def ellipsoid(self, centre, semi, name, *, angle=0.0, roughness=0.0, where=None, hu=None) -> None:
        shape = self.grid.ellipsoid(centre, semi, angle_deg=angle, field=self.field, roughness=roughness)
        self.paint(shape, name, where=where, hu=hu)


def _paint_anatomy(painter: _Painter, lean_a: np.ndarray, lean_b: np.ndarray) -> None:
    g, p, rng = painter.grid, painter.p, painter.rng
    zz = g.z[:, None, None]
    yy, xx = g.y[None, :, None], g.x[None, None, :]
    la, lb = lean_a[:, None, None], lean_b[:, None, None]
    rough = 0.03 * painter.field
    outer = (xx / (la + p.fat_mm)) ** 2 + (yy / (lb + 0.8 * p.fat_mm)) ** 2 + rough < 1
    painter.labels[outer] = LABELS["fat"]
    lean = (xx / la) ** 2 + (yy / lb) ** 2 + rough < 1
    painter.labels[lean] = LABELS["muscle"]
    cavity = (xx / (0.82 * la)) ** 2 + ((yy + 10.0) / (0.72 * lb)) ** 2 < 1
    top = (380.0 + 25.0 * painter.field) * p.kz  # an irregular upper edge, not a cut plane
    bowel = cavity & (zz > 70 * p.kz) & (zz < top) & (yy < 30 * p.kb)
    painter.labels[bowel] = LABELS["bowel"]

    mediastinum = 20.0 * p.ka
    dome = rng.uniform(445.0, 470.0)

    def above_diaphragm(box, _level):
        # The dome is higher on the right (liver) and falls posteriorly into the costophrenic recesses.
        x, y, z = g.x[box[2]][None, None, :], g.y[box[1]][None, :, None], g.z[box[0]][:, None, None]
        surface = (dome + 12.0 * (x < 0) - 0.35 * y / p.kb) * p.kz
        return (np.abs(x) > mediastinum) & (z > surface)

    for side in (-1, 1):  # right lung (−x) is a little larger than the left
        painter.ellipsoid(
            painter.at(side * 80, 10, 545),
            painter.size(72 if side < 0 else 66, 88, 150, 0.08),
            "lung",
            roughness=0.08,
            where=above_diaphragm,
        )
    liver_edge = rng.uniform(25.0, 50.0) * p.ka
    painter.ellipsoid(
        painter.at(-55, -5, 400),
        painter.size(100, 80, 85),
        "liver",
        angle=rng.uniform(-10, 10),
        roughness=0.15,
        where=lambda box, _lvl: g.x[box[2]][None, None, :] < liver_edge + 20.0 * painter.field[box],
    )
    painter.ellipsoid(
        painter.at(92, 38, 410),
        painter.size(34, 45, 55, 0.2),
        "spleen",
        angle=rng.uniform(-30, 0),
        roughness=0.12,
    )
    for side, z in ((-1, 285.0), (1, 300.0)):
        painter.ellipsoid(
            painter.at(side * 68, 45, z),
            painter.size(26, 30, 55),
            "kidney",
            angle=side * rng.uniform(10, 30),
            roughness=0.05,
        )
    heart_c, heart_r = painter.at(25, -25, 530), painter.size(60, 50, 62, 0.1)
    heart_angle = rng.uniform(-45, -25)
    painter.ellipsoid(heart_c, heart_r, "myocardium", angle=heart_angle, roughness=0.03)
    wall = rng.uniform(8.0, 13.0)
    painter.ellipsoid(heart_c, tuple(r - wall for r in heart_r), "blood_pool", angle=heart_angle)
    aorta_r = rng.uniform(10.0, 14.0)
    painter.paint(
        g.elliptic_cylinder((25 * p.kb, 18 * p.ka), (aorta_r, aorta_r), (230 * p.kz, 760 * p.kz)),
        "blood_pool",
    )
    fill = rng.uniform(0.5, 1.2)
    painter.ellipsoid(painter.at(0, -25, 45), tuple(r * fill for r in painter.size(45, 35, 40)), "bladder")
    _paint_bones(painter)


def _paint_bones(painter: _Painter) -> None:
    g, p, rng = painter.grid, painter.p, painter.rng
    cortex, marrow = rng.uniform(700.0, 1100.0), rng.uniform(180.0, 320.0)

    def shell(threshold: float):
        return lambda level: np.where(level > threshold, cortex, marrow).astype(np.float32)

    spine_y = 55 * p.kb
    disc_period, disc_mm = 32.0 * p.kz, 6.0
    phase = rng.uniform(0, disc_period)
    body = g.elliptic_cylinder((spine_y, 0.0), (17.0, 20.0), (100 * p.kz, 760 * p.kz))
    painter.paint(body, "muscle")  # intervertebral discs: soft tissue between the bodies
    painter.paint(
        body,
        "bone",
        hu=shell(0.7),
        where=lambda box, _l: ((g.z[box[0]] + phase) % disc_period > disc_mm)[:, None, None],
    )
    painter.paint(
        g.elliptic_cylinder((spine_y + 31, 0.0), (14.0, 22.0), (100 * p.kz, 760 * p.kz)),
        "bone",
        hu=shell(0.5),
    )
    painter.paint(
        g.elliptic_cylinder((spine_y + 26, 0.0), (7.0, 7.0), (100 * p.kz, 760 * p.kz)), "spinal_cord"
    )
    # Ribs: slanted elliptic rings just inside the lean trunk outline of the thorax.
    box = g.box((560 * p.kz, 0.0, 0.0), (200 * p.kz, 1e4, 1e4))
    if box is not None:
        zz = g.z[box[0]][:, None, None]
        yy, xx = g.y[box[1]][None, :, None], g.x[box[2]][None, None, :]
        la = np.interp(zz / p.kz, _PROFILE_Z, _PROFILE_A) * p.ka
        lb = np.interp(zz / p.kz, _PROFILE_Z, _PROFILE_B) * p.kb
        ring = (xx / la) ** 2 + (yy / lb) ** 2
        period = rng.uniform(24.0, 28.0) * p.kz
        slant = (zz - 0.35 * yy + rng.uniform(0, period)) % period
        rib = (
            (ring > 0.78)
            & (ring < 0.88)
            & (slant < 9.0)
            & ~((np.abs(xx) < 25) & (yy < 0))
            & (zz > 380 * p.kz)
        )
        region = painter.labels[box]
        region[rib] = LABELS["bone"]
        painter.bone_hu[box][rib] = rng.uniform(450.0, 800.0)
    painter.paint(
        g.elliptic_cylinder((-0.88 * 110 * p.kb, 0.0), (7.0, 14.0), (450 * p.kz, 700 * p.kz)),
        "bone",
        hu=rng.uniform(300.0, 500.0),
    )
    for side in (-1, 1):  # iliac wings
        painter.ellipsoid(
            painter.at(side * 105, 30, 140), painter.size(14, 45, 45), "bone", angle=side * 20, hu=shell(0.6)
        )


def generate_phantom(
    seed: int,
    *,
    shape: tuple[int, int, int] = (160, 256, 256),
    spacing_mm: float | tuple[float, float, float] = 2.0,
) -> Phantom:
    """A chest-abdomen PET/CT phantom for ``seed`` on a ``shape`` ``(z, y, x)`` grid of ``spacing_mm``."""
    if len(shape) != 3 or shape[0] < 1 or min(shape[1:]) < 8:
        raise ValueError(f"shape must be (z, y, x) with ≥ 1 slice of ≥ 8×8 voxels, found {tuple(shape)}")
    spacing = (float(spacing_mm),) * 3 if np.isscalar(spacing_mm) else tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing_mm must be positive (one value or z, y, x), found {spacing_mm}")
    rng = np.random.default_rng(seed)
    patient = _sample_patient(rng)
    grid, lean_a, lean_b = _make_grid(rng, shape, spacing, patient)
    shape_field = smooth_field(rng, shape, spacing, 40.0 * grid.scale)
    texture = smooth_field(rng, shape, spacing, 12.0)
    fine = smooth_field(rng, shape, spacing, 5.0)

    painter = _Painter(grid, patient, rng, shape_field)
    _paint_anatomy(painter, lean_a, lean_b)
    labels = painter.labels

    organ_suv = {name: float(rng.uniform(*SUV_RANGE[name])) for name in ORGANS.values()}
    n = len(ORGANS)
    suv_of = np.array([organ_suv[ORGANS[k]] for k in range(n)], dtype=np.float32)
    tex_of = np.array([PET_TEXTURE.get(ORGANS[k], 0.0) for k in range(n)], dtype=np.float32)
    hu_of = np.array([rng.uniform(*HU_RANGE[ORGANS[k]]) for k in range(n)], dtype=np.float32)
    hutex_of = np.array([CT_TEXTURE_HU.get(ORGANS[k], 0.0) for k in range(n)], dtype=np.float32)

    activity_suv = suv_of[labels] * np.clip(1.0 + tex_of[labels] * texture, 0.2, None)
    ct = hu_of[labels] + hutex_of[labels] * fine
    bone = labels == LABELS["bone"]
    ct[bone] = painter.bone_hu[bone] + 40.0 * fine[bone]

    lesion_labels, lesions = add_lesions(rng, grid, labels, LABELS, spacing, activity_suv, ct, organ_suv)
    ct += rng.normal(0.0, rng.uniform(6.0, 14.0), size=ct.shape).astype(np.float32)  # quantum noise
    np.clip(ct, -1024.0, 3071.0, out=ct)

    phantom = Phantom(
        activity_bqml=np.empty(0, np.float32),
        ct_hu=ct.astype(np.float32),
        organ_labels=labels,
        lesion_labels=lesion_labels,
        lesions=lesions,
        spacing_mm=spacing,
        patient_weight_kg=patient.weight_kg,
        patient_height_m=patient.height_m,
        injected_activity_bq=round(patient.injected_bq, -3),
        uptake_time_s=round(patient.uptake_s, 1),
        seed=int(seed),
        organ_suv={k: round(v, 4) for k, v in organ_suv.items()},
    )
    phantom.activity_bqml = (activity_suv * phantom.bqml_per_suv).astype(np.float32)
    return phantom
