"""The transfer set's phantom family: torsos drawn from a seed, as labelled solids in millimetres.

A torso is a superelliptic body (half-width 140–210 mm, exponent 2–3.2, a fat rim 8–30 mm) tapering
between pelvis and chest, arms beside it in half the cases, a vertebral column with discs, lungs,
heart (myocardium around a blood pool), liver, kidneys and bladder; 3–6 lesions (6–30 mm, spherical
or ellipsoidal, SUV 3–15) in liver, lung, bone or lymph-node stations. Tissue SUVs and HU are drawn
per case. The trunk spans z = −330…330 mm (pelvic floor to shoulders); a case images a window of it.
Everything is made with this module's own primitives; nothing is shared with the training simulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.evaluation.transfer.shapes import Box, Ellipsoid, Prism, Shape

__all__ = ["LESION_LABEL_BASE", "TISSUES", "Lesion", "Phantom", "draw_phantom"]

LESION_LABEL_BASE = 100

# label: (name, SUV range drawn per case, HU)
TISSUES: dict[int, tuple[str, tuple[float, float], float]] = {
    1: ("fat", (0.2, 0.4), -100.0),
    2: ("soft tissue", (0.6, 1.0), 45.0),
    3: ("lung", (0.3, 0.5), -820.0),
    4: ("liver", (1.8, 2.6), 60.0),
    5: ("myocardium", (1.5, 8.0), 45.0),
    6: ("blood pool", (1.4, 1.9), 40.0),
    7: ("kidney", (2.5, 5.0), 35.0),
    8: ("bladder", (8.0, 40.0), 5.0),
    9: ("cortical bone", (0.5, 1.0), 900.0),
    10: ("marrow", (1.5, 2.5), 250.0),
}
_HOST_LABEL = {"liver": 4, "lung": 3, "bone": 10, "node": 2}
_DIAMETER_MM = {"liver": (8.0, 30.0), "lung": (6.0, 30.0), "bone": (6.0, 20.0), "node": (6.0, 25.0)}
_LESION_HU_SHIFT = {"liver": -20.0, "lung": 850.0, "bone": 200.0, "node": -10.0}  # vs the host's HU
_TRUNK_Z = (-330.0, 330.0)


@dataclass(frozen=True)
class Lesion:
    """One lesion: its host, its solid, its SUV; ``index`` k is label ``LESION_LABEL_BASE + k``."""

    index: int
    host: str
    shape: Ellipsoid
    suv: float

    @property
    def diameter_mm(self) -> float:
        return self.shape.equivalent_diameter_mm


@dataclass(frozen=True)
class Phantom:
    """Labelled solids painted in order (later ones win), per-label SUV and HU, and the lesions."""

    solids: tuple[tuple[int, Shape], ...]
    suv: dict[int, float]
    hu: dict[int, float]
    lesions: tuple[Lesion, ...]
    weight_kg: float

    def label_at(self, x: float, y: float, z: float) -> int:
        """The label the painting gives the point (x, y, z)."""
        label = 0
        for lab, shape in self.solids:
            if bool(shape.inside(np.float64(x), np.float64(y), np.float64(z))):
                label = lab
        return label

    def lookup(self, values: dict[int, float], default: float) -> np.ndarray:
        """A label → value table (index = label) for fancy-indexing a label volume."""
        size = max(self.suv) + 1
        table = np.full(size, default, dtype=np.float32)
        for label, value in values.items():
            table[label] = value
        return table


def _anatomy(rng: np.random.Generator) -> tuple[list[tuple[int, Shape]], float]:
    a_low, a_high = rng.uniform(150, 210), rng.uniform(140, 200)
    b_low, b_high = rng.uniform(100, 140), rng.uniform(95, 135)
    p = rng.uniform(2.0, 3.2)
    fat = rng.uniform(8, 30)
    solids: list[tuple[int, Shape]] = [
        (1, Prism((0, 0), (a_low, b_low), (a_high, b_high), _TRUNK_Z, p)),
        (2, Prism((0, 0), (a_low - fat, b_low - fat), (a_high - fat, b_high - fat), _TRUNK_Z, p)),
    ]
    a, b = (a_low + a_high) / 2, (b_low + b_high) / 2
    if rng.random() < 0.5:  # arms down beside the body
        ra, rb = rng.uniform(38, 50), rng.uniform(45, 55)
        for side in (-1, 1):
            cx = side * (max(a_low, a_high) + rng.uniform(10, 25) + ra)
            solids.append((2, Prism((cx, 0.1 * b), (ra, rb), (ra, rb), _TRUNK_Z)))
            solids.append((9, Prism((cx, 0.1 * b), (12, 12), (12, 12), _TRUNK_Z)))
    spine_y = 0.55 * b
    solids.append((9, Prism((0, spine_y), (22, 20), (22, 20), _TRUNK_Z, period_mm=30, gap_mm=6)))
    solids.append((10, Prism((0, spine_y), (17, 15), (17, 15), _TRUNK_Z, period_mm=30, gap_mm=6)))
    lung_z = rng.uniform(150, 185)
    for side in (-1, 1):
        solids.append((3, Ellipsoid((side * 0.45 * a, -0.02 * b, lung_z),
                                    (0.33 * a, 0.62 * b, rng.uniform(110, 140)), side * rng.uniform(0, 10))))
    heart = Ellipsoid((0.15 * a, -0.3 * b, lung_z - 60), (58, 48, 60), rng.uniform(20, 40))
    solids.append((5, heart))
    solids.append((6, Ellipsoid(heart.center, (44, 34, 46), heart.angle_deg)))
    solids.append((4, Ellipsoid((-0.35 * a, -0.05 * b, lung_z - 140),
                                (0.45 * a, 0.62 * b, rng.uniform(70, 95)), rng.uniform(-10, 10), 2.6)))
    kidney_z = rng.uniform(-100, -50)
    for side in (-1, 1):
        solids.append((7, Ellipsoid((side * rng.uniform(60, 80), 0.35 * b, kidney_z + side * 10),
                                    (30, 24, 55), side * 20)))
    fill = rng.uniform(0.7, 1.2)
    solids.append((8, Ellipsoid((0, -0.15 * b, -250), (45 * fill, 38 * fill, 32 * fill), 0, 2.4)))
    # Body weight from the cross-section (a 170 × 120 mm half-width torso ≈ 75 kg).
    weight = float(np.clip(75.0 * (a * b) / (170.0 * 120.0), 45.0, 130.0))
    return solids, weight


def _in_plane_radius(solids: list[tuple[int, Shape]]) -> float:
    radius = 0.0
    for _, shape in solids:
        (x0, x1), (y0, y1), _ = shape.bounds()
        if isinstance(shape, Prism):  # a superellipse reaches its box's corners only in the limit
            radius = max(radius, max(abs(x0), abs(x1)), max(abs(y0), abs(y1)))
        else:
            radius = max(radius, float(np.hypot(max(abs(x0), abs(x1)), max(abs(y0), abs(y1)))))
    return radius


def _node_boxes(a: float, b: float) -> list[Box]:
    """Lymph-node stations: mediastinal, para-aortic, iliac (x, y, z ranges in mm)."""
    return [((-30, 30), (-0.25 * b, 0.1 * b), (90, 200)),
            ((-45, 45), (0.05 * b, 0.35 * b), (-150, 0)),
            ((-0.5 * a, 0.5 * a), (-0.1 * b, 0.3 * b), (-270, -170))]


def _place_lesions(rng: np.random.Generator, anatomy: Phantom, z_window: tuple[float, float],
                   extent: tuple[float, float]) -> list[Lesion]:
    a, b = extent
    lo, hi = z_window
    boxes: dict[str, list] = {"node": _node_boxes(a, b)}
    for host in ("liver", "lung", "bone"):
        boxes[host] = [s.bounds() for lab, s in anatomy.solids if lab == _HOST_LABEL[host]]
    lesions: list[Lesion] = []
    for _ in range(int(rng.integers(3, 7))):
        hosts = [h for h, bs in boxes.items() if any(z0 < hi and z1 > lo for _, _, (z0, z1) in bs)]
        if not hosts:
            break
        host = hosts[int(rng.integers(len(hosts)))]
        box = boxes[host][int(rng.integers(len(boxes[host])))]
        for _attempt in range(200):
            x, y = rng.uniform(*box[0]), rng.uniform(*box[1])
            z = rng.uniform(max(box[2][0], lo + 4), min(box[2][1], hi - 4)) if box[2][0] < hi - 4 else None
            if z is not None and anatomy.label_at(x, y, z) == _HOST_LABEL[host]:
                break
        else:
            continue
        radius = rng.uniform(*_DIAMETER_MM[host]) / 2
        ratios = rng.uniform(0.75, 1.3, 3) if rng.random() < 0.5 else np.ones(3)
        ratios /= np.prod(ratios) ** (1 / 3)  # same volume as the sphere of that diameter
        shape = Ellipsoid((x, y, z), tuple(float(r) for r in radius * ratios), rng.uniform(0, 180))
        lesions.append(Lesion(len(lesions) + 1, host, shape, float(rng.uniform(3.0, 15.0))))
    return lesions


def draw_phantom(rng: np.random.Generator, *, fov_radius_mm: float, z_window: tuple[float, float]) -> Phantom:
    """A torso drawn from ``rng``, shrunk in-plane to fit 92 % of ``fov_radius_mm``; lesions in ``z_window``.

    ``z_window`` (low, high) in mm is the part of the trunk a case images; lesions are centred in it.
    """
    if fov_radius_mm <= 0 or z_window[1] <= z_window[0]:
        raise ValueError(f"need a positive FOV radius and a window low < high, found {fov_radius_mm}, "
                         f"{z_window}")
    solids, weight = _anatomy(rng)
    scale = min(1.0, 0.92 * fov_radius_mm / _in_plane_radius(solids))
    solids = [(lab, s.scaled(scale)) for lab, s in solids]
    suv = {lab: float(rng.uniform(*rng_range)) for lab, (_, rng_range, _) in TISSUES.items()}
    hu = {lab: value for lab, (_, _, value) in TISSUES.items()}
    (x0, x1), (y0, y1), _ = solids[0][1].bounds()  # the body
    extent = ((x1 - x0) / 2, (y1 - y0) / 2)
    anatomy = Phantom(tuple(solids), suv, hu, (), weight * scale**2)
    lesions = _place_lesions(rng, anatomy, z_window, extent)
    for lesion in lesions:
        label = LESION_LABEL_BASE + lesion.index
        solids.append((label, lesion.shape))
        suv[label] = lesion.suv
        hu[label] = hu[_HOST_LABEL[lesion.host]] + _LESION_HU_SHIFT[lesion.host]
    return Phantom(tuple(solids), suv, hu, tuple(lesions), anatomy.weight_kg)
