"""Scanner styles of the transfer set: pixel size, matrix, slices, count level and reconstruction.

Each style imitates what one kind of clinical PET reconstruction hands the node. The names say
"-like": they copy published pixel sizes, matrices and reconstruction settings, not any vendor's
code. Count levels are the mean number of true coincidences per 2D slice at the standard dose; the
scatter and randoms fractions are fractions of the prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["STYLES", "Reconstruction", "ScannerStyle", "get_style"]


@dataclass(frozen=True)
class Reconstruction:
    """How a style reconstructs its sinograms.

    ``algorithm``: ``"fbp"`` (ramp × ``window``, cut off at ``cutoff`` × Nyquist) or ``"osem"`` (MLEM when
    ``subsets`` = 1). ``psf_fwhm_mm`` > 0 models the scanner's resolution inside OSEM; ``basis_fwhm_mm`` > 0
    represents the image on smooth blob-like basis functions (a Gaussian kernel of that FWHM) instead of
    voxels. ``postfilter_fwhm_mm``: a 3D Gaussian applied to the result.
    """

    algorithm: str
    iterations: int = 0
    subsets: int = 1
    psf_fwhm_mm: float = 0.0
    basis_fwhm_mm: float = 0.0
    postfilter_fwhm_mm: float = 0.0
    window: str = "hann"
    cutoff: float = 1.0
    butterworth_order: int = 5

    def __post_init__(self) -> None:
        if self.algorithm not in ("fbp", "osem"):
            raise ValueError(f"algorithm must be 'fbp' or 'osem', found {self.algorithm!r}")
        if self.algorithm == "osem" and (self.iterations < 1 or self.subsets < 1):
            raise ValueError(f"OSEM needs iterations >= 1 and subsets >= 1, found {self.iterations} and "
                             f"{self.subsets}")
        if self.window not in ("ramp", "hann", "butterworth"):
            raise ValueError(f"window must be 'ramp', 'hann' or 'butterworth', found {self.window!r}")
        if not 0 < self.cutoff <= 1:
            raise ValueError(f"cutoff is a fraction of Nyquist in (0, 1], found {self.cutoff}")

    def describe(self) -> str:
        if self.algorithm == "fbp":
            text = f"FBP ramp×{self.window} {self.cutoff:g} Nyquist"
        elif self.subsets == 1:
            text = f"MLEM {self.iterations}i"
        else:
            text = f"OSEM {self.iterations}i{self.subsets}s"
        if self.psf_fwhm_mm:
            text += " PSF"
        if self.basis_fwhm_mm:
            text += f" blob basis {self.basis_fwhm_mm:g} mm"
        if self.postfilter_fwhm_mm:
            text += f", {self.postfilter_fwhm_mm:g} mm Gaussian"
        return text


@dataclass(frozen=True)
class ScannerStyle:
    """One scanner style: PET grid, acquisition and reconstruction (all lengths in mm)."""

    name: str
    pixel_mm: float
    matrix: int
    slice_mm: float
    n_slices: int
    n_angles: int
    system_fwhm_mm: float
    trues_per_slice: float
    recon: Reconstruction
    scatter_fraction: float = 0.35
    randoms_fraction: float = 0.25
    ct_pixel_mm: float = 500.0 / 256
    ct_matrix: int = 256
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.pixel_mm <= 0 or self.slice_mm <= 0 or self.matrix < 8 or self.n_slices < 1:
            raise ValueError(f"style {self.name!r}: bad grid {self.matrix}² × {self.n_slices} at "
                             f"{self.pixel_mm} × {self.slice_mm} mm")
        if self.recon.algorithm == "osem" and self.n_angles % self.recon.subsets:
            raise ValueError(f"style {self.name!r}: {self.n_angles} angles do not split into "
                             f"{self.recon.subsets} subsets")
        if not (0 <= self.scatter_fraction < 1 and 0 <= self.randoms_fraction < 1):
            raise ValueError(f"style {self.name!r}: scatter and randoms fractions must be in [0, 1)")

    @property
    def fov_mm(self) -> float:
        return self.pixel_mm * self.matrix

    def describe(self) -> str:
        return (f"{self.pixel_mm:g} mm, {self.matrix}², {self.n_slices} × {self.slice_mm:g} mm slices, "
                f"{self.fov_mm / 10:.0f} cm FOV, {self.recon.describe()}")


# Trues per slice at the standard dose: about 1.2e5 per mm of slice thickness (a 3-minute bed of a
# 2D-equivalent acquisition), so thin slices are noisier, as on a scanner.
_TRUES_PER_MM = 1.2e5

STYLES: dict[str, ScannerStyle] = {
    s.name: s
    for s in (
        ScannerStyle("siemens-like", 4.0728, 168, 3.0, 48, 100, 4.3, 3.0 * _TRUES_PER_MM,
                     Reconstruction("osem", 4, 5, psf_fwhm_mm=4.3, postfilter_fwhm_mm=5.0)),
        ScannerStyle("ge-like", 5.46875, 128, 3.27, 47, 96, 5.0, 3.27 * _TRUES_PER_MM,
                     Reconstruction("fbp", window="hann", cutoff=0.8, postfilter_fwhm_mm=6.4)),
        ScannerStyle("philips-like", 4.0, 144, 4.0, 40, 96, 4.8, 4.0 * _TRUES_PER_MM,
                     Reconstruction("osem", 3, 8, basis_fwhm_mm=6.0)),
        ScannerStyle("fbp-4mm", 4.0, 150, 4.0, 40, 120, 4.8, 4.0 * _TRUES_PER_MM,
                     Reconstruction("fbp", window="butterworth", cutoff=0.5, butterworth_order=5)),
        ScannerStyle("mlem-4mm", 4.0, 150, 4.0, 40, 96, 4.8, 4.0 * _TRUES_PER_MM,
                     Reconstruction("osem", 20, 1)),
        ScannerStyle("2mm-native", 2.0, 256, 2.0, 64, 128, 4.3, 2.0 * _TRUES_PER_MM,
                     Reconstruction("osem", 3, 8, postfilter_fwhm_mm=4.0)),
    )
}


def get_style(style: str | ScannerStyle) -> ScannerStyle:
    """The style named ``style`` (or ``style`` itself); a clear error lists the names known."""
    if isinstance(style, ScannerStyle):
        return style
    try:
        return STYLES[style]
    except KeyError:
        raise ValueError(f"unknown scanner style {style!r}; known: {', '.join(STYLES)}") from None
