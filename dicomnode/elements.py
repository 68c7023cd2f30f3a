"""Every element of a received data set parses: the receive-time walk of :mod:`dicomnode.validate`.

Every element is read once at receive time (:func:`check_elements`), not only those the node needs:
pydicom parses lazily, so a value that does not parse (``InstanceNumber = "abc"``, a US element of
three bytes) or a sequence nested thousands deep would otherwise be acknowledged and only fail, or
exhaust the stack, later in a job the sender never hears of. Numeric strings (DS, IS) must be finite
numbers; nesting and the number of elements are bounded.

Each value is read as ``ds[tag]`` reads it (pydicom's own conversion). A value already read without a
refusal (:class:`ParsedValues`) passes again without being converted: pydicom's conversion of an
element depends only on its tag, its VR as encoded, its bytes, their byte order, the character set
and pydicom's settings, and all of these make up the memo's key (the settings by forgetting
everything when they change). VRs whose conversion also looks at other elements (SQ, UN, the
ambiguous ones) are never memoised. So the outcome, refused or not and for which element, is the same
as converting every element; most of a series' header repeats from instance to instance, and the
conversions were most of a C-STORE's CPU time.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import MutableSequence
from functools import lru_cache

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.hooks import hooks as pydicom_hooks
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import AMBIGUOUS_VR

from dicomnode.statuses import CANNOT_UNDERSTAND, DATASET_MISMATCH, Refusal

__all__ = [
    "MAX_ELEMENTS", "MAX_SEQUENCE_DEPTH", "ParsedValues", "check_elements", "check_settings", "value_of",
]

# Bounds of what a PET or CT image header may hold. Real headers nest sequences 2-5 deep (Siemens,
# GE and Philips private ones included) and hold a few hundred elements; these bounds are far above
# that and far below what makes parsing slow or recursive readers overflow.
MAX_SEQUENCE_DEPTH = 16
MAX_ELEMENTS = 100_000
# Sets, not ``tag == Tag(...)``: BaseTag's __eq__ is Python code, a set lookup compares hashes.
_PIXEL_DATA_TAGS = frozenset([Tag(0x7FE0, 0x0010)])
_CHARSET_TAGS = frozenset([Tag(0x0008, 0x0005)])
# VRs whose conversion depends on more than the element (other elements of the data set: the pixel
# representation for ambiguous VRs, the private creator for UN), so a value of them is never memoised.
_UNMEMOISED_VRS = frozenset({"SQ", "UN", *AMBIGUOUS_VR})
# Values memoised as parsed (_PARSED): at most this long, at most this many (then forgotten at once).
_MEMO_MAX_BYTES = 512
_MEMO_MAX_SEQUENCE_BYTES = 8192
# VRs whose conversion reads other elements than the element itself, possibly outside its item: a
# sequence holding one is never memoised as a whole.
_LOOKS_OUTSIDE_VRS = frozenset({"UN", *AMBIGUOUS_VR})
_MEMO_MAX_VALUES = 16384
# Binary VRs: opaque bytes, nothing to parse (and reading them would load deferred pixels). Not UN:
# pydicom converts a UN element of a known tag to the tag's own VR, which can fail like any other.
_BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "OB or OW", "US or OW"}


def _attribute(tag: Tag) -> str:
    """The keyword of a tag, or its (gggg,eeee) form for private and unknown ones (log-safe: no value)."""
    return keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})"


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str:
    # Cached: every instance of a series asks for the same few hundred tags.
    try:
        return dictionary_VR(tag)
    except KeyError:  # private or unknown: pydicom reads it as UN
        return "UN"


def _conversion_settings() -> tuple:
    """Everything besides the element itself that decides whether pydicom converts it or raises."""
    return (
        pydicom_config.settings.reading_validation_mode,
        pydicom_config.convert_wrong_length_to_UN,
        pydicom_config.replace_un_with_known_vr,
        pydicom_config.use_DS_decimal,
        pydicom_config.use_DS_numpy,
        pydicom_config.use_IS_numpy,
        pydicom_config.datetime_conversion,
        pydicom_config.use_none_as_empty_text_VR_value,
        pydicom_config.data_element_callback,
        id(pydicom_config.data_element_callback_kwargs),
        pydicom_hooks.raw_element_vr,
        pydicom_hooks.raw_element_value,
        id(pydicom_hooks.raw_element_kwargs),
        # A warning is an exception under an "error" filter: other filters forget every value.
        tuple(warnings.filters),
    )


class ParsedValues:
    """Element values that converted without a refusal, under the pydicom settings they were read with.

    Keys are (tag, VR as encoded, byte order, implicit VR, character set, bytes): all that pydicom's
    conversion of an element reads, besides its settings, for the VRs memoised (not SQ, UN and the
    ambiguous ones, which look at other elements). Each maps to the value pydicom made of it when that
    value cannot change (a string, a number: :func:`value_of` hands it to every data set with the same
    bytes), else to :data:`MISSING`. Thread-safe through the GIL: a dict's get and set are atomic, and
    a lost entry only costs a conversion.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._values: dict[tuple, object] = {}
        self._settings: tuple | None = None

    def check_settings(self) -> None:
        """Forget every value when pydicom's settings (or the warning filters) changed since."""
        settings = _conversion_settings()
        if settings != self._settings:
            self._values = {}
            self._settings = settings

    def __contains__(self, key: tuple) -> bool:
        return key in self._values

    def get(self, key: tuple) -> object:
        """The value remembered for ``key``, or :data:`MISSING`."""
        return self._values.get(key, MISSING)

    def add_sequence(self, key: tuple, elements: int, depth: int) -> None:
        """A sequence that passed: its items held ``elements`` elements, nested ``depth`` deep."""
        self.add(key)
        self._values[key] = (elements, depth)  # a tuple of ints cannot change

    def add(self, key: tuple, value: object = None) -> None:
        if len(self._values) >= self._limit:
            self._values = {}  # simpler than an LRU; the next instances of a series refill it
        # A list (MultiValue) or an object could be changed by a reader: only its verdict is kept.
        self._values[key] = value if value is None or isinstance(value, _IMMUTABLE) else MISSING


MISSING = object()  # ParsedValues.get: nothing remembered
_IMMUTABLE = (str, int, float, bytes)  # and their subclasses: pydicom's UID, DSfloat, IS
_PARSED = ParsedValues(_MEMO_MAX_VALUES)


def _memo_key(tag: BaseTag, raw: RawDataElement, vr: str, charset: object) -> tuple | None:
    """The memo's key for a raw element of VR ``vr`` (the dictionary's, for implicit VR), or None."""
    if vr in _UNMEMOISED_VRS or tag in _CHARSET_TAGS or not charset:
        return None
    value = raw.value
    if value is None or len(value) > _MEMO_MAX_BYTES:  # None: left on disk
        return None
    return (tag, raw.VR, raw.is_little_endian, raw.is_implicit_VR, charset, value)


def _sequence_key(tag: BaseTag, raw: RawDataElement, vr: str, charset: object) -> tuple | None:
    """The memo's key for a sequence not yet parsed (its items' bytes), or None."""
    value = raw.value
    if not charset or not isinstance(value, bytes) or len(value) > _MEMO_MAX_SEQUENCE_BYTES:
        return None
    return ("SQ", tag, raw.VR, raw.is_little_endian, raw.is_implicit_VR, charset, value)


def _charset(ds: Dataset) -> object:
    # What ds[tag] decodes text with; empty for a data set not read from bytes (then nothing is memoised).
    encoding = ds.original_character_set
    return tuple(encoding) if isinstance(encoding, MutableSequence) else encoding


def value_of(ds: Dataset, tag: BaseTag) -> object:
    """``ds[tag].value`` (None when absent), remembered when the very same value was converted before.

    For reading only: a remembered value is shared by the data sets that hold the same bytes. Call
    after :func:`check_elements` (or :meth:`ParsedValues.check_settings`) of this data set.
    """
    raw = ds.get_item(tag, keep_deferred=True)
    if raw is None:
        return None
    if isinstance(raw, RawDataElement):
        key = _memo_key(tag, raw, raw.VR or _dictionary_vr(tag), _charset(ds))
        if key is not None:
            value = _PARSED.get(key)
            if value is not MISSING:
                return value
    return ds[tag].value


def check_settings() -> None:
    """What :func:`value_of` remembers is forgotten if pydicom's settings changed (see ParsedValues)."""
    _PARSED.check_settings()


def check_elements(ds: Dataset) -> None:
    """Parse every element of ``ds`` (recursively) once; refuse what does not parse or is absurdly big.

    Binary values (pixel data, private blobs) are not opened: there is nothing to parse in them. Every
    other value is read as ``ds[tag]`` reads it (pydicom's own conversion, the result kept in ``ds``),
    unless the very same value has been read before without a refusal (:data:`_PARSED`): the same
    tag, VR, bytes, byte order and character set under the same pydicom settings convert the same
    way, so such an element passes as it passed then and is left for pydicom to convert when read.
    The same holds for a whole sequence whose items hold no element that looks outside them (an
    ambiguous or UN VR): it passes with the element count and nesting depth its items had, if the
    bounds allow them here. Most of a series' header repeats from instance to instance, and this walk
    was most of a C-STORE's CPU time.
    """
    _PARSED.check_settings()
    _walk(ds, 0, [0])


def _walk(ds: Dataset, depth: int, seen: list[int]) -> tuple[int, bool]:
    """Check ``ds`` at nesting ``depth``; (the deepest item depth below it, no element looked outside)."""
    seen[0] += len(ds)
    if seen[0] > MAX_ELEMENTS:
        raise Refusal(CANNOT_UNDERSTAND, "(dataset)", f"holds more than {MAX_ELEMENTS} elements")
    charset = _charset(ds)
    deepest, clean = depth, True
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        converted = not isinstance(raw, RawDataElement)
        vr = raw.VR if converted else (raw.VR or _dictionary_vr(tag))  # implicit VR: the dictionary's
        if tag in _PIXEL_DATA_TAGS:
            if vr not in ("OB", "OW", "OB or OW"):
                raise Refusal(DATASET_MISMATCH, "PixelData", f"has VR {vr}, not OB or OW")
            continue
        if vr in _BINARY_VRS:
            continue
        clean = clean and vr not in _LOOKS_OUTSIDE_VRS
        key = None if converted else (_sequence_key if vr == "SQ" else _memo_key)(tag, raw, vr, charset)
        if key is not None and vr != "SQ" and key in _PARSED:
            continue
        if key is not None and vr == "SQ":
            known = _PARSED.get(key)
            if known is not MISSING:  # (the elements of its items, the depth of its deepest items)
                count, below = known
                if seen[0] + count <= MAX_ELEMENTS and depth + below <= MAX_SEQUENCE_DEPTH:
                    seen[0] += count
                    deepest = max(deepest, depth + below)
                    continue  # else walked, to refuse it as the walk does
        try:
            element = raw if converted else ds[tag]
            value = element.value
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for values it cannot read
            raise Refusal(
                CANNOT_UNDERSTAND, _attribute(tag), f"value does not parse ({type(exc).__name__})"
            ) from None
        if element.VR == "SQ":
            if depth + 1 > MAX_SEQUENCE_DEPTH:
                raise Refusal(
                    CANNOT_UNDERSTAND, _attribute(tag), f"sequences nested deeper than {MAX_SEQUENCE_DEPTH}"
                )
            before, below, inside_clean = seen[0], 1, True
            for item in value:
                item_deepest, item_clean = _walk(item, depth + 1, seen)
                below, inside_clean = max(below, item_deepest - depth), inside_clean and item_clean
            deepest, clean = max(deepest, depth + below), clean and inside_clean
            if key is not None and inside_clean:
                _PARSED.add_sequence(key, seen[0] - before, below)
            continue
        if element.VR in ("DS", "IS") and value not in (None, ""):
            items = (
                value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
            )
            for item in items:
                _check_number(item, tag)
        if key is not None:
            _PARSED.add(key, value)  # only now: this value converted and, if a number, is finite
    return deepest, clean


def _check_number(item: object, tag: Tag) -> None:
    """A DS or IS value must be a finite decimal number (PS3.5 6.2)."""
    if isinstance(item, int):  # an IS that parsed: finite
        return
    if isinstance(item, float):  # a DS that parsed; "nan"/"inf" parse as floats but are not decimal strings
        number = item
    else:
        # pydicom keeps an invalid DS/IS as its text (with a warning).
        try:
            number = float(str(item).strip())
        except ValueError:
            raise Refusal(CANNOT_UNDERSTAND, _attribute(tag), "value is not a number") from None
    if not math.isfinite(number):
        raise Refusal(CANNOT_UNDERSTAND, _attribute(tag), "value is not a finite number")
