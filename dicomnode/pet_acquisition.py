"""What a PET series' headers say about how it was acquired and reconstructed.

Training makes a site's lower-dose inputs the way its scanner made the study (``model.training``):
with its reconstruction (``model.physics.ReconSettings``) and its count level (the per-bed frame
duration of ``model.physics.ScannerModel``). :func:`acquisition_from_headers` reads both from one PET
header as plain data (the model never sees pydicom):

* ``recon`` from ReconstructionMethod (0054,1103): FBP or OSEM — MLEM, RAMLA, BLOB-OS, GE's VUE Point
  and Q.Clear are modelled as OSEM, the nearest iterative method the physics has; iterations and
  subsets from ``3i21s``-style text (or GE's private (0009,10B2)/(0009,10B3)), else 3 × 8; a 4 mm
  PSF when the method says PSF, TrueX, HD (Siemens HD·PET), SharpIR (GE's ``VPFXS``/``VPHDS``, the
  trailing S) or Q.Clear (whose penalised likelihood has PSF modelling built in). The post-filter
  FWHM comes from ConvolutionKernel (0018,1210) (``XYZGAUSSIAN5.00``, ``Gaussian 6.4 mm``,
  ``ALL-PASS``), or GE's private post-filter (0009,10BA)/(0009,10BB), else 4 mm.
* ``scanner``: ``frame_duration_s`` from ActualFrameDuration (0018,1242, ms, per bed position).

A method that is absent or not recognised gives no ``recon`` (training uses its default, OSEM 3 × 8
with a 4 mm post-filter); an absent duration gives no ``scanner`` (180 s). ``notes`` says, in words,
what was defaulted. Nothing about the patient is read or returned.
"""

from __future__ import annotations

import math
import re
import struct

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomnode.pet_units import GE_PET_CREATOR

__all__ = ["acquisition_from_headers", "parse_convolution_kernel", "parse_reconstruction_method"]

#: The PSF kernel modelled when a method says it recovers resolution (ReconSettings' own choice for
#: scanner styles); vendors do not write theirs.
PSF_FWHM_MM = 4.0
#: A post-filter wider than this is not a clinical reconstruction but a misread kernel name.
_MAX_FILTER_MM = 30.0
_GE_GROUP = 0x0009
_GE_ITERATIONS, _GE_SUBSETS, _GE_POST_FILTER, _GE_POST_FILTER_MM = 0xB2, 0xB3, 0xBA, 0xBB

# "3i21s", "OSEM3i21s", "2 i 24 s", "3 iterations 21 subsets", "3i x 21s".
_ITERATIONS_SUBSETS = re.compile(r"(\d+)\s*I(?:TER(?:ATION)?S?)?[\s,/X×]*(\d+)\s*S(?:UBSETS?)?(?![A-Z])")
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
# Checked on the upper-cased text with everything but letters and digits removed.
_FBP = ("FBP", "FILTEREDBACK", "3DRP", "REPROJECTION")
_ITERATIVE = ("OSEM", "MLEM", "RAMLA", "BLOB", "QCLEAR", "VPFX", "VPHD", "VUEPOINT", "BSREM", "TRUEX")
_NO_FILTER = ("ALLPASS", "NONE", "NOFILTER", "RAMP")
_TOF = ("TOF", "VPFX", "QCFX", "OSTF")  # Philips "BLOB-OS-TF": TF is its time of flight
_DEFAULT_USED = "the default reconstruction (OSEM 3x8, 4 mm post-filter) is used"


def acquisition_from_headers(ds: Dataset) -> dict:
    """``{"recon": {...}, "scanner": {...}, "notes": [...]}`` from one PET header (module doc).

    ``recon`` (``ReconSettings.to_dict()`` keys) and ``scanner`` (``ScannerModel`` keyword arguments)
    are absent when the headers do not say; ``notes`` lists what was defaulted or approximated.
    """
    notes: list[str] = []
    out: dict = {"notes": notes}
    method = _text(ds, "ReconstructionMethod")
    if method is None:
        notes.append(f"no ReconstructionMethod: {_DEFAULT_USED}")
    else:
        recon = parse_reconstruction_method(method, notes)
        if recon is not None:
            if recon["algorithm"] == "osem" and not _ITERATIONS_SUBSETS.search(method.upper()):
                _fill_from_ge(ds, recon, notes)
            _set_post_filter(ds, recon, notes)
            out["recon"] = recon
    duration = _frame_duration_s(ds)
    if duration is None:
        notes.append("no positive ActualFrameDuration: the default frame duration (180 s per bed) is used")
    else:
        out["scanner"] = {"frame_duration_s": duration}
    return out


def parse_reconstruction_method(method: str, notes: list[str] | None = None) -> dict | None:
    """A ``ReconSettings`` dict for a ReconstructionMethod text, or None when it is not recognised.

    The post-filter is left at its default (it comes from the kernel); ``notes`` gets what was assumed.
    """
    notes = notes if notes is not None else []
    upper = method.upper()
    compact = re.sub(r"[^A-Z0-9]", "", upper)
    q_clear = "QCLEAR" in compact or compact.startswith("QC")  # GE codes: QCFX, QCHD
    # Siemens names PSF/TOF variants without "OSEM" ("PSF+TOF 3i21s"): iterations say iterative.
    counted = _ITERATIONS_SUBSETS.search(upper)
    iterative = q_clear or counted is not None or any(word in compact for word in (*_ITERATIVE, "PSF"))
    if not iterative and not any(word in compact for word in _FBP):
        notes.append(f"ReconstructionMethod {method!r} not recognised: {_DEFAULT_USED}")
        return None
    # Only what the headers say: ReconSettings.from_dict takes its own defaults for the rest (the
    # node keeps no copy of them).
    recon: dict = {"algorithm": "osem" if iterative else "fbp"}
    if not iterative:
        return recon
    if "OSEM" not in compact and counted is None:
        notes.append(f"ReconstructionMethod {method!r} is modelled as OSEM, the nearest iterative method")
    if counted is not None:
        iterations, subsets = int(counted.group(1)), int(counted.group(2))
        if iterations >= 1 and subsets >= 1:
            recon["iterations"], recon["subsets"] = iterations, subsets
    tokens = set(re.split(r"[^A-Z0-9]+", upper))
    sharp_ir = re.search(r"VP(FX|HD)S", compact) is not None or "SHARPIR" in compact
    if q_clear or sharp_ir or "HD" in tokens or any(w in compact for w in ("PSF", "TRUEX", "HDPET")):
        recon["psf_fwhm_mm"] = PSF_FWHM_MM
    if any(word in compact for word in _TOF):
        notes.append("time of flight is not modelled (its lower noise is not reproduced)")
    return recon


def parse_convolution_kernel(kernel: str) -> tuple[float | None, float | None]:
    """``(post-filter FWHM mm, FBP Hann cut-off)`` from a ConvolutionKernel text; None where it says not.

    ``XYZGAUSSIAN5.00`` and ``Gaussian 6.4 mm`` give 5.0 and 6.4; ``ALL-PASS`` (or none, ramp) 0;
    ``Hann 0.5`` a cut-off of 0.5 of Nyquist (and no post-filter).
    """
    compact = re.sub(r"[^A-Z0-9.]", "", kernel.upper())
    numbers = [float(n) for n in _NUMBER.findall(compact)]
    # The number after the filter's name ("3D Gaussian 5mm" is 5), else the only one there is.
    if "GAUSS" in compact:
        after = re.search(r"GAUSS[A-Z]*(\d+(?:\.\d+)?)", compact)
        fwhm = float(after.group(1)) if after else numbers[0] if len(numbers) == 1 else None
        return (fwhm, None) if fwhm is not None and fwhm <= _MAX_FILTER_MM else (None, None)
    if "HANN" in compact:
        after = re.search(r"HANN[A-Z]*(\d*\.?\d+)", compact)
        cutoff = float(after.group(1)) if after else None
        return 0.0, cutoff if cutoff is not None and 0 < cutoff <= 1 else None
    if any(word in compact for word in _NO_FILTER):
        return 0.0, None
    return None, None


def _set_post_filter(ds: Dataset, recon: dict, notes: list[str]) -> None:
    kernel = _text(ds, "ConvolutionKernel")
    fwhm = cutoff = None
    if kernel is not None:
        fwhm, cutoff = parse_convolution_kernel(kernel)
    if fwhm is None:
        fwhm = _ge_post_filter_mm(ds)
    if cutoff is not None and recon["algorithm"] == "fbp":
        recon["fbp_cutoff"] = cutoff
    if fwhm is not None:
        recon["postfilter_fwhm_mm"] = fwhm
    elif kernel is None:
        notes.append("no ConvolutionKernel: the default post-filter (4 mm) is used")
    else:
        notes.append(f"ConvolutionKernel {kernel!r} not understood: the default post-filter (4 mm) is used")


def _fill_from_ge(ds: Dataset, recon: dict, notes: list[str]) -> None:
    """GE writes iterations and subsets in private tags, not in ReconstructionMethod (``VPFXS``)."""
    iterations = _ge_number(ds, _GE_ITERATIONS, "<i")
    subsets = _ge_number(ds, _GE_SUBSETS, "<i")
    if iterations is not None and subsets is not None and iterations >= 1 and subsets >= 1:
        recon["iterations"], recon["subsets"] = int(iterations), int(subsets)
    else:
        notes.append("iterations and subsets not given: the default (3 x 8) is used")


def _ge_post_filter_mm(ds: Dataset) -> float | None:
    """GE's post-filter FWHM (0009,10BB) when its switch (0009,10BA) says a filter was applied."""
    switch = _ge_number(ds, _GE_POST_FILTER, "<i")
    fwhm = _ge_number(ds, _GE_POST_FILTER_MM, "<f")
    if switch and fwhm is not None and 0 < fwhm <= _MAX_FILTER_MM:
        return float(fwhm)
    return None


def _ge_number(ds: Dataset, offset: int, binary: str) -> float | None:
    try:
        value = ds.get_private_item(_GE_GROUP, offset, GE_PET_CREATOR).value
    except (KeyError, ValueError):
        return None
    if isinstance(value, bytes):  # VR UN after an implicit-VR hop: the little-endian SL/FL bytes
        if len(value) != struct.calcsize(binary):
            return None
        value = struct.unpack(binary, value)[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _frame_duration_s(ds: Dataset) -> float | None:
    try:
        ms = float(ds.get("ActualFrameDuration"))
    except (TypeError, ValueError):
        return None
    return ms / 1000.0 if math.isfinite(ms) and ms > 0 else None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    # Multi-valued (ConvolutionKernel is SH 1-n): the parts read as one text.
    text = " ".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)
    text = text.strip("\0 ")
    return text or None
