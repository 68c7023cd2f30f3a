"""Solid primitives of the transfer phantoms, in patient millimetres (x, y, z).

x runs across the patient, y front to back (posterior positive, as in DICOM LPS), z along the body
(head positive). Each primitive answers ``inside(x, y, z)`` on broadcastable coordinate arrays and
gives its bounding box, so a rasteriser only evaluates it where it can be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

__all__ = ["Ellipsoid", "Prism", "Shape"]

Box = tuple[tuple[float, float], tuple[float, float], tuple[float, float]]


@dataclass(frozen=True)
class Ellipsoid:
    """A superellipsoid: |u/a|^p + |v/b|^p in-plane (rotated by ``angle_deg``), squared along z.

    ``exponent`` 2 is an ellipsoid; larger values square the cross-section off (a liver, a bladder).
    """

    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    angle_deg: float = 0.0
    exponent: float = 2.0

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        a, b, c = self.semi_axes
        cos, sin = math.cos(math.radians(self.angle_deg)), math.sin(math.radians(self.angle_deg))
        dx, dy = x - self.center[0], y - self.center[1]
        u = np.abs((dx * cos + dy * sin) / a)
        v = np.abs((-dx * sin + dy * cos) / b)
        radial = (u**self.exponent + v**self.exponent) ** (2.0 / self.exponent)
        return radial + ((z - self.center[2]) / c) ** 2 <= 1.0

    def bounds(self) -> Box:
        r = max(self.semi_axes[:2]) * math.sqrt(2)  # a rotated superellipse fits in this square
        cx, cy, cz = self.center
        return (cx - r, cx + r), (cy - r, cy + r), (cz - self.semi_axes[2], cz + self.semi_axes[2])

    def scaled(self, f: float) -> Ellipsoid:
        a, b, c = self.semi_axes
        return replace(self, center=(self.center[0] * f, self.center[1] * f, self.center[2]),
                       semi_axes=(a * f, b * f, c))

    @property
    def equivalent_diameter_mm(self) -> float:
        return 2.0 * float(np.prod(self.semi_axes)) ** (1.0 / 3.0)


@dataclass(frozen=True)
class Prism:
    """A superelliptic cross-section extruded from ``z_range[0]`` to ``z_range[1]``.

    The semi-axes change linearly from ``semi_axes_low`` at the low end to ``semi_axes_high``; a
    ``period_mm`` > 0 cuts out a ``gap_mm`` slab every period (intervertebral discs).
    """

    center_xy: tuple[float, float]
    semi_axes_low: tuple[float, float]
    semi_axes_high: tuple[float, float]
    z_range: tuple[float, float]
    exponent: float = 2.0
    period_mm: float = 0.0
    gap_mm: float = 0.0

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        z0, z1 = self.z_range
        t = np.clip((z - z0) / (z1 - z0), 0.0, 1.0)
        a = self.semi_axes_low[0] + t * (self.semi_axes_high[0] - self.semi_axes_low[0])
        b = self.semi_axes_low[1] + t * (self.semi_axes_high[1] - self.semi_axes_low[1])
        p = self.exponent
        cross = np.abs((x - self.center_xy[0]) / a) ** p + np.abs((y - self.center_xy[1]) / b) ** p <= 1.0
        inside = cross & (z >= z0) & (z <= z1)
        if self.period_mm > 0:
            inside &= np.mod(z - z0, self.period_mm) >= self.gap_mm
        return inside

    def bounds(self) -> Box:
        a = max(self.semi_axes_low[0], self.semi_axes_high[0])
        b = max(self.semi_axes_low[1], self.semi_axes_high[1])
        cx, cy = self.center_xy
        return (cx - a, cx + a), (cy - b, cy + b), self.z_range

    def scaled(self, f: float) -> Prism:
        return replace(self, center_xy=(self.center_xy[0] * f, self.center_xy[1] * f),
                       semi_axes_low=(self.semi_axes_low[0] * f, self.semi_axes_low[1] * f),
                       semi_axes_high=(self.semi_axes_high[0] * f, self.semi_axes_high[1] * f))


Shape = Ellipsoid | Prism
