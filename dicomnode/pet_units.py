"""PET pixel values as the node works with them: Bq/ml, decay corrected to the series reference time.

The enhancer and the derived series use one convention, the one SUV tools read (PS3.3 C.8.9.1.1.3 and
QIBA's vendor-neutral SUV rules): Units BQML, DecayCorrection START, and SeriesDate/SeriesTime as the
time the values are decay corrected to. Scanners write other conventions, which
:func:`normalise_activity` converts — values and headers together, so SUVbw computed from the headers
stays what it was:

* Units CNTS (Philips): counts times the private Activity Concentration Scale Factor (7053,1009) of
  the "Philips PET Private Group" are Bq/ml. Without that factor the Units stay CNTS and the series is
  refused later (:func:`dicomnode.pipeline.check_pet_series`).
* DecayCorrection ADMIN: values decay corrected to the injection; decayed to the reference time.
* DecayCorrection NONE: each slice measured over its own frame (AcquisitionTime, ActualFrameDuration);
  corrected to the reference time, DecayFactor and CorrectedImage (DECY) say so.
* A SeriesTime after the acquisition (a reconstruction made later) is not the decay reference: GE
  keeps the scan start in its private Scan DateTime (0009,100D) of "GEMS_PETD_01", otherwise the
  earliest AcquisitionDate/Time is used (QIBA). SeriesDate/SeriesTime are set to the reference.

What cannot be converted raises :class:`ActivityError` naming the attribute (a
:class:`~dicomnode.volume.VolumeError` from :func:`~dicomnode.volume.load_series`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from datetime import datetime, timedelta

import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import format_number_as_ds

__all__ = ["PHILIPS_PET_CREATOR", "GE_PET_CREATOR", "ActivityError", "normalise_activity",
           "philips_scale_factors", "stored_suv_per_bqml"]

log = logging.getLogger("upete.pet_units")

#: Private creator of Philips' PET group 7053: (7053,1000) SUV Scale Factor, (7053,1009) Activity
#: Concentration Scale Factor (Bq/ml per count), both DS.
PHILIPS_PET_CREATOR = "Philips PET Private Group"
_PHILIPS_GROUP, _PHILIPS_SUV, _PHILIPS_ACTIVITY = 0x7053, 0x00, 0x09
#: Private creator of GE's PET group 0009: (0009,100D) Scan DateTime, the time values are decay
#: corrected to when the series was reconstructed later.
GE_PET_CREATOR = "GEMS_PETD_01"
_GE_GROUP, _GE_SCAN_DATETIME = 0x0009, 0x0D


class ActivityError(ValueError):
    """The values cannot be brought to Bq/ml decay corrected to START; the message names the attribute."""


def _private_text(ds: Dataset, group: int, offset: int, creator: str) -> str | None:
    try:
        value = ds.get_private_item(group, offset, creator).value
    except (KeyError, ValueError):
        return None
    if isinstance(value, bytes):  # VR UN after an implicit-VR hop through a PACS
        value = value.decode("ascii", "replace").strip("\0 ")
    text = str(value).strip()
    return text or None


def _private_number(ds: Dataset, offset: int) -> float | None:
    text = _private_text(ds, _PHILIPS_GROUP, offset, PHILIPS_PET_CREATOR)
    try:
        number = float(text) if text is not None else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) and number > 0 else None


def philips_scale_factors(ds: Dataset) -> tuple[float | None, float | None]:
    """(SUV Scale Factor, Activity Concentration Scale Factor) of a Philips header; None where absent."""
    return _private_number(ds, _PHILIPS_SUV), _private_number(ds, _PHILIPS_ACTIVITY)


def _parse_datetime(text: str) -> datetime | None:
    """A DT value, or DA + TM run together: YYYYMMDDHHMMSS[.ffffff][&ZZXX] (time zone ignored)."""
    text = text.split("&")[0].split("+")[0].split("-")[0].strip()
    digits, _, fraction = text.partition(".")
    if len(digits) < 12 or not digits.isdigit():
        return None
    try:
        moment = datetime.strptime(digits[:14].ljust(14, "0"), "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return moment + timedelta(seconds=float(f"0.{fraction}") if fraction.isdigit() else 0.0)


def _date_time(ds: Dataset, date_keyword: str, time_keyword: str) -> datetime | None:
    date, time = str(ds.get(date_keyword, "") or "").strip(), str(ds.get(time_keyword, "") or "").strip()
    if len(date) != 8 or not time:
        return None
    return _parse_datetime(date + time.replace(":", ""))


def _required(value: datetime | None, attribute: str) -> datetime:
    if value is None:
        raise ActivityError(f"{attribute} is missing or not a date/time")
    return value


def _reference_time(datasets: Sequence[Dataset]) -> datetime | None:
    """The time the values refer to for SUV: SeriesDate/Time unless a later reconstruction moved it;
    None when the headers hold neither series nor acquisition times."""
    first = datasets[0]
    series = _date_time(first, "SeriesDate", "SeriesTime")
    acquisitions = [t for t in (_date_time(ds, "AcquisitionDate", "AcquisitionTime") for ds in datasets) if t]
    if not acquisitions or (series is not None and series <= min(acquisitions)):
        return series
    scan = _private_text(first, _GE_GROUP, _GE_SCAN_DATETIME, GE_PET_CREATOR)
    scan_time = _parse_datetime(scan) if scan else None
    return scan_time if scan_time is not None else min(acquisitions)


def _half_life_s(ds: Dataset) -> float:
    try:
        half_life = float(ds.RadiopharmaceuticalInformationSequence[0].RadionuclideHalfLife)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        half_life = 0.0
    if not (math.isfinite(half_life) and half_life > 0):
        raise ActivityError("RadionuclideHalfLife is missing or not positive: the decay correction "
                            "cannot be converted")
    return half_life


def _injection_time(ds: Dataset) -> datetime:
    try:
        radio = ds.RadiopharmaceuticalInformationSequence[0]
    except (AttributeError, IndexError):
        radio = Dataset()
    start = str(radio.get("RadiopharmaceuticalStartDateTime", "") or "")
    injected = _parse_datetime(start) if start else None
    if injected is None and radio.get("RadiopharmaceuticalStartTime"):
        injected = _parse_datetime(str(ds.get("SeriesDate", "")) + str(radio.RadiopharmaceuticalStartTime))
    return _required(injected, "RadiopharmaceuticalStartDateTime")


def _frame_decay(lam: float, duration_s: float) -> float:
    """Mean over a frame of length T → its start: λT / (1 − e^(−λT)) (PS3.3 C.8.9.4.1.5)."""
    return 1.0 if duration_s <= 0 else lam * duration_s / -math.expm1(-lam * duration_s)


def _decay_factors(datasets: Sequence[Dataset], correction: str, reference: datetime) -> list[float]:
    """Per slice, the factor that turns ADMIN or NONE values into values decay corrected to ``reference``."""
    lam = math.log(2) / _half_life_s(datasets[0])
    if correction == "ADMIN":
        elapsed = (reference - _injection_time(datasets[0])).total_seconds()
        return [math.exp(-lam * elapsed)] * len(datasets)
    factors = []
    for ds in datasets:  # NONE: each slice's own frame
        start = _required(_date_time(ds, "AcquisitionDate", "AcquisitionTime"), "AcquisitionDate/Time")
        try:
            duration_s = float(ds.ActualFrameDuration) / 1000.0
        except (AttributeError, TypeError, ValueError):
            raise ActivityError("ActualFrameDuration is missing: the decay correction NONE cannot be "
                                "converted") from None
        factors.append(math.exp(lam * (start - reference).total_seconds()) * _frame_decay(lam, duration_s))
    return factors


def _cnts_to_bqml(datasets: Sequence[Dataset], volume: np.ndarray) -> np.ndarray:
    factors = [philips_scale_factors(ds)[1] for ds in datasets]
    if any(f is None for f in factors):
        return volume  # still CNTS: refused with its reason by check_pet_series
    for ds in datasets:
        ds.Units = "BQML"
    return volume * np.asarray(factors, dtype=np.float32)[:, None, None]


def normalise_activity(datasets: Sequence[Dataset], volume: np.ndarray) -> np.ndarray:
    """``volume`` (z, y, x; slice k of ``datasets[k]``) in Bq/ml decay corrected to the reference time.

    Rewrites the headers in place to say so (module doc); returns the converted volume (float32).
    Units other than BQML/CNTS are left for the caller to refuse. Raises :class:`ActivityError`.
    """
    if str(datasets[0].get("Units", "") or "").upper() == "CNTS":
        volume = _cnts_to_bqml(datasets, volume)
    if str(datasets[0].get("Units", "") or "") != "BQML":
        return volume
    correction = str(datasets[0].get("DecayCorrection", "") or "").strip().upper()
    if correction not in ("START", "ADMIN", "NONE"):
        raise ActivityError(f"DecayCorrection is {correction or 'missing'}, not START, ADMIN or NONE")
    reference = _reference_time(datasets)
    if reference is None:
        if correction == "START":
            return volume  # nothing to move: the values already refer to the scan start
        raise ActivityError("SeriesDate/SeriesTime and AcquisitionDate/Time are missing: the decay "
                            f"correction {correction} cannot be converted")
    date, time = reference.strftime("%Y%m%d"), reference.strftime("%H%M%S.%f")
    for ds in datasets:
        if _date_time(ds, "SeriesDate", "SeriesTime") != reference:
            ds.SeriesDate, ds.SeriesTime = date, time
    if correction == "START":
        return volume
    factors = _decay_factors(datasets, correction, reference)
    for ds, factor in zip(datasets, factors, strict=True):
        applied = _decay_factor(ds) * factor if correction == "ADMIN" else factor
        ds.DecayFactor = format_number_as_ds(applied)
        ds.DecayCorrection = "START"
        corrected = [str(v) for v in (ds.get("CorrectedImage") or [])]
        if "DECY" not in corrected:
            ds.CorrectedImage = [*corrected, "DECY"]
    log.info("decay correction converted to START", extra={"fields": {"from": correction}})
    return volume * np.asarray(factors, dtype=np.float32)[:, None, None]


def _decay_factor(ds: Dataset) -> float:
    """The source's DecayFactor (1 when absent or unreadable: the ADMIN conversion then states only its
    own factor)."""
    try:
        factor = float(ds.get("DecayFactor") or 1.0)
    except (TypeError, ValueError):
        return 1.0
    return factor if math.isfinite(factor) and factor > 0 else 1.0


def stored_suv_per_bqml(ds: Dataset) -> float | None:
    """SUVbw per Bq/ml as the vendor stored it (Philips' SUV Scale Factor), or None when it stores none.

    Philips' factor multiplies the stored unit: counts when the Activity Concentration Scale Factor is
    there too (Units CNTS), Bq/ml otherwise.
    """
    suv, activity = philips_scale_factors(ds)
    if suv is None:
        return None
    return suv / activity if activity is not None else suv
