"""Job previews: one PNG per finished job, LPET (input) / enhanced PET / CT in axial, coronal and
coronal-MIP views, PET on an SUVbw scale — what a radiologist or an administrator looks at to see,
in seconds, that a job made sense. Optionally the same picture as a Secondary Capture series of the
study, sent with the derived series (``output.preview_secondary_capture``).

matplotlib (Agg, through ``Figure`` and its canvas, no pyplot state: the worker is a thread) rather
than a hand-made numpy→PNG path: colour bars, a length bar, legible text and SUV tick labels are what
makes the picture readable, and those are what a plain pixel path does not give. It is imported only
here, when a preview is made.

Never fails a job: :func:`write_job_preview` logs and carries on, whatever goes wrong.
"""

from __future__ import annotations

import logging
import math
import os
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicomnode import metrics
from dicomnode.config import OutputSettings
from dicomnode.volume import SeriesVolume, load_series, resample_onto

__all__ = ["PREVIEW_PNG", "PREVIEW_SC", "SuvScale", "suv_scale", "render_preview", "write_job_preview"]

log = logging.getLogger("upete.preview")

PREVIEW_PNG = "preview.png"
PREVIEW_SC = "preview-sc.dcm"


@dataclass(frozen=True)
class SuvScale:
    """Bq/ml × ``factor`` = the displayed value in ``unit``; ``note`` says what the scale rests on."""

    factor: float
    unit: str  # "SUVbw" or "Bq/ml"
    note: str


def _seconds_of_day(value: object) -> float | None:
    text = str(value or "").strip()
    if len(text) < 4:
        return None
    try:
        hours, minutes = int(text[0:2]), int(text[2:4])
        seconds = float(text[4:]) if len(text) > 4 else 0.0
    except ValueError:
        return None
    return hours * 3600 + minutes * 60 + seconds


def _datetime(date: object, time_of_day: object) -> datetime | None:
    seconds = _seconds_of_day(time_of_day)
    text = str(date or "").strip()
    if seconds is None or len(text) < 8:
        return None
    try:
        day = datetime.strptime(text[:8], "%Y%m%d")
    except ValueError:
        return None
    return datetime.fromtimestamp(day.timestamp() + seconds)


def suv_scale(ds: Dataset) -> SuvScale:
    """SUVbw from the PET header: PatientWeight, RadionuclideTotalDose, half-life, and the decay of the
    dose from injection to the series time when the image is decay corrected to its START (QIBA's
    convention); no decay for ADMIN. Falls back to Bq/ml, saying why, when something is missing."""
    weight = ds.get("PatientWeight")
    try:
        weight_kg = float(weight) if weight not in (None, "") else 0.0
    except (TypeError, ValueError):
        weight_kg = 0.0
    if weight_kg <= 0:
        return SuvScale(1.0, "Bq/ml", "PatientWeight missing: activity in Bq/ml, not SUV")
    try:
        radio = ds.RadiopharmaceuticalInformationSequence[0]
        dose = float(radio.RadionuclideTotalDose)
        half_life = float(radio.RadionuclideHalfLife)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return SuvScale(1.0, "Bq/ml", "injected dose or half-life missing: activity in Bq/ml, not SUV")
    if dose <= 0 or half_life <= 0:
        return SuvScale(1.0, "Bq/ml", "injected dose or half-life is 0: activity in Bq/ml, not SUV")
    correction = str(ds.get("DecayCorrection", "") or "").upper()
    decay, note = 1.0, "SUVbw"
    if correction != "ADMIN":
        start = radio.get("RadiopharmaceuticalStartDateTime")
        injected = (_datetime(str(start)[:8], str(start)[8:]) if start
                    else _datetime(ds.get("SeriesDate"), radio.get("RadiopharmaceuticalStartTime")))
        scanned = _datetime(ds.get("SeriesDate"), ds.get("SeriesTime"))
        if injected is None or scanned is None:
            return SuvScale(1.0, "Bq/ml", "injection or series time missing: activity in Bq/ml, not SUV")
        elapsed = (scanned - injected).total_seconds()
        decay = 2.0 ** (-elapsed / half_life)
        note = f"SUVbw, dose decayed {elapsed / 60:.0f} min to the series time"
        if correction == "NONE":
            note += " (image not decay corrected)"
    return SuvScale(weight_kg * 1000.0 / (dose * decay), "SUVbw", note)


def _nice_ceiling(value: float) -> float:
    """A round display maximum ≥ ``value`` (1, 2, 2.5, 5 × 10^n)."""
    if not math.isfinite(value) or value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * 10**exponent >= value:
            return step * 10**exponent
    return 10 ** (exponent + 1)


def _arrays(image: sitk.Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(z, y, x) array and (dz, dy, dx) spacing in mm."""
    dx, dy, dz = image.GetSpacing()
    return sitk.GetArrayFromImage(image).astype(np.float32), (dz, dy, dx)


def render_preview(
    lpet: SeriesVolume,
    enhanced: SeriesVolume,
    ct_on_pet: sitk.Image | None,
    path: Path,
    *,
    title: str,
) -> Path:
    """Draw the 3×3 preview of one job into ``path`` (PNG) and return it."""
    from matplotlib.figure import Figure  # heavy; only when a preview is made

    scale = suv_scale(lpet.datasets[0])
    low, spacing = _arrays(lpet.image)
    high, _ = _arrays(enhanced.image)
    low, high = low * scale.factor, high * scale.factor
    dz, dy, dx = spacing
    nz, ny, nx = high.shape
    # Axial plane through the hottest voxel of the enhanced image (outside the top and bottom 10 %,
    # where brain or bladder would win); coronal plane through the activity's centre of mass.
    margin = max(nz // 10, 0)
    core = high[margin: nz - margin] if nz - 2 * margin > 0 else high
    z = int(np.unravel_index(np.argmax(core), core.shape)[0]) + (margin if core is not high else 0)
    weights = np.clip(high, 0, None).sum(axis=(0, 2))
    y = int(round(float((weights * np.arange(ny)).sum() / weights.sum()))) if weights.sum() > 0 else ny // 2
    vmax = _nice_ceiling(float(np.percentile(high, 99.9)) if high.size else 1.0)
    z_mm = float(enhanced.image.TransformIndexToPhysicalPoint((0, 0, z))[2])

    # Extents in mm keep anatomy in proportion whatever the voxel size. Radiological convention:
    # patient right on the viewer's left (column 0 of an LPS axial slice), head at the top.
    axial_extent = (0, nx * dx, ny * dy, 0)
    coronal_extent = (0, nx * dx, 0, nz * dz)
    views = [
        ("axial", lambda v: v[z], axial_extent, "upper"),
        ("coronal", lambda v: v[:, y, :], coronal_extent, "lower"),
        ("coronal MIP", lambda v: v.max(axis=1), coronal_extent, "lower"),
    ]
    rows: list[tuple[str, np.ndarray | None, dict]] = [
        (f"LPET (input), {scale.unit}", low, {"cmap": "gray_r", "vmin": 0, "vmax": vmax}),
        (f"enhanced (uPETe), {scale.unit}", high, {"cmap": "gray_r", "vmin": 0, "vmax": vmax}),
    ]
    ct = _arrays(ct_on_pet)[0] if ct_on_pet is not None else None
    rows.append(("CT on the PET grid, HU (W 400 / L 40)", ct, {"cmap": "gray", "vmin": -160, "vmax": 240}))

    figure = Figure(figsize=(12, 12.8), dpi=100, facecolor="white")
    grid = figure.add_gridspec(3, 4, width_ratios=[1, 1, 1, 0.05], left=0.04, right=0.93, top=0.9,
                               bottom=0.04, wspace=0.08, hspace=0.22)
    # Long series descriptions would run off the page: wrap onto a second line instead.
    figure.suptitle(textwrap.fill(title, 105), fontsize=13, fontweight="bold", x=0.04, ha="left")
    scale_color = "black" if scale.unit == "SUVbw" else "red"
    figure.text(0.04, 0.925, f"{scale.note}; PET window {scale.unit} 0–{vmax:g} (same for both rows). "
                "Research image, not for diagnosis.", fontsize=10.5, color=scale_color, ha="left")
    for r, (label, volume, style) in enumerate(rows):
        shown = None
        for c, (view, cut, extent, origin) in enumerate(views):
            ax = figure.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if volume is None:
                ax.text(0.5, 0.5, "no CT used for this job", ha="center", va="center", fontsize=12,
                        transform=ax.transAxes)
                ax.set_facecolor("#eeeeee")
            else:
                shown = ax.imshow(cut(volume), extent=extent, origin=origin, interpolation="nearest", **style)
                _length_bar(ax, extent, dark=style["cmap"] == "gray_r")
            where = f" (z {z_mm:.0f} mm)" if view == "axial" else ""
            ax.set_title(f"{view}{where}", fontsize=11)
            if c == 0:
                ax.set_ylabel(label, fontsize=11.5, fontweight="bold")
            if volume is not None:
                ax.text(0.02, 0.02, "R", transform=ax.transAxes, fontsize=11, fontweight="bold",
                        color="tab:orange", va="bottom")
        colorbar_ax = figure.add_subplot(grid[r, 3])
        if shown is not None:
            bar = figure.colorbar(shown, cax=colorbar_ax)
            bar.set_label(scale.unit if r < 2 else "HU", fontsize=11)
        else:
            colorbar_ax.axis("off")
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).print_png(str(temporary))
    os.replace(temporary, path)
    return path


def _length_bar(ax: object, extent: tuple[float, float, float, float], *, dark: bool) -> None:
    """A 5 cm (or 1 cm for small fields of view) bar in the lower right corner, labelled."""
    width = abs(extent[1] - extent[0])
    height = abs(extent[3] - extent[2])
    length = 50.0 if width >= 150 else 10.0
    x1 = max(extent[0], extent[1]) - 0.05 * width
    y = min(extent[2], extent[3]) + 0.06 * height
    if extent[3] < extent[2]:  # axial: y axis points down in data units
        y = max(extent[2], extent[3]) - 0.06 * height
    color = "tab:blue" if dark else "yellow"
    ax.plot([x1 - length, x1], [y, y], color=color, linewidth=3, solid_capstyle="butt")
    ax.text(x1 - length / 2, y, f"{length / 10:g} cm\n", ha="center", va="center", fontsize=9, color=color)


def _title(lpet: SeriesVolume, enhanced: SeriesVolume, job_id: int | None) -> str:
    """Study date and time and the series descriptions: no patient name, ID or birth date."""
    first = lpet.datasets[0]
    date, clock = str(first.get("StudyDate", "") or ""), str(first.get("StudyTime", "") or "")
    when = f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) >= 8 else "date unknown"
    if len(clock) >= 4:
        when += f" {clock[:2]}:{clock[2:4]}"
    source = str(first.get("SeriesDescription", "") or "PET")
    derived = str(enhanced.datasets[0].get("SeriesDescription", "") or "")
    job = f"job {job_id} · " if job_id is not None else ""
    return f"uPETe {job}study {when} · “{source}” → “{derived}”"


def _secondary_capture(
    png: Path, reference: Dataset, derived_series_uid: str, series_number: int, source_description: str
) -> Dataset:
    """The preview as an RGB Secondary Capture image of the study (highdicom), with deterministic UIDs
    (a rerun replaces it in the PACS) and this node's Manufacturer (the loop guard knows it)."""
    import highdicom as hd
    from matplotlib.image import imread
    from pydicom.uid import generate_uid

    from dicomnode.derived import MANUFACTURER

    rgb = (imread(str(png))[..., :3] * 255).round().astype(np.uint8)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(entropy_srcs=[derived_series_uid, "preview series"]),
        series_number=series_number,
        sop_instance_uid=generate_uid(entropy_srcs=[derived_series_uid, "preview image"]),
        instance_number=1,
        manufacturer=MANUFACTURER,
        # highdicom wants an orientation for a PATIENT image; it is emptied below (Type 2: unknown),
        # since a picture of several views has no single row/column direction.
        patient_orientation=("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    image.PatientOrientation = None
    # dciodvfy wants BodyPartExamined or Laterality (General Series, 2C): the source's body part.
    if reference.get("BodyPartExamined"):
        image.BodyPartExamined = reference.BodyPartExamined
    else:
        image.Laterality = None
    image.SeriesDescription = (source_description[:48] + " uPETe preview")[:64]
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.DerivationDescription = "uPETe node job preview (LPET, enhanced PET, CT)"
    image.BurnedInAnnotation = "YES"  # the picture carries text (study date, series names)
    return image


def write_job_preview(
    out_dir: Path,
    pet_paths: Sequence[Path],
    ct_paths: Sequence[Path] | None,
    derived_paths: Sequence[Path],
    *,
    output: OutputSettings,
    job_id: int | None = None,
) -> list[Path]:
    """Make ``out_dir/preview.png`` (and ``preview-sc.dcm`` when configured). Returns the DICOM files
    to send with the derived series (empty, or the Secondary Capture). Never raises."""
    if not output.preview:
        return []
    started = time.perf_counter()
    try:
        lpet = load_series(pet_paths)
        enhanced = load_series(derived_paths)
        ct_on_pet = None
        if ct_paths:
            try:
                ct = load_series(ct_paths)
                ct_on_pet = resample_onto(ct.image, lpet.image, default_value=-1000.0)
            except Exception as exc:  # noqa: BLE001 - the PET rows are still worth drawing
                log.info("preview without CT", extra={"fields": {"job_id": job_id, "reason": str(exc)}})
        png = render_preview(lpet, enhanced, ct_on_pet, Path(out_dir) / PREVIEW_PNG,
                             title=_title(lpet, enhanced, job_id))
        extra: list[Path] = []
        if output.preview_secondary_capture:
            first = enhanced.datasets[0]
            source = str(lpet.datasets[0].get("SeriesDescription", "") or "PET").strip()
            sc = _secondary_capture(png, first, str(first.SeriesInstanceUID),
                                    int(first.get("SeriesNumber") or 0) + 1, source)
            path = Path(out_dir) / PREVIEW_SC
            temporary = path.with_name(f".{path.name}.tmp")
            sc.save_as(temporary, enforce_file_format=True)
            os.replace(temporary, path)
            extra.append(path)
    except Exception as exc:  # noqa: BLE001 - a preview must never fail a job
        log.warning("preview not made", exc_info=True,
                    extra={"fields": {"job_id": job_id, "error": f"{type(exc).__name__}: {exc}"}})
        metrics.preview_made(False)
        return []
    seconds = time.perf_counter() - started
    metrics.preview_made(True, seconds)
    fields = {"job_id": job_id, "path": str(png), "seconds": f"{seconds:.2f}"}
    log.info("preview written", extra={"fields": fields})
    return extra
