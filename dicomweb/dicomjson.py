"""The DICOM JSON model (PS3.18 Annex F): index rows for QIDO-RS, data sets for WADO-RS metadata."""

from __future__ import annotations

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

PIXEL_DATA = 0x7FE00010
# Binary VRs whose values go by reference (BulkDataURI) above BULK_THRESHOLD bytes.
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
BULK_THRESHOLD = 1024
_NUMBER_VRS = {"IS": int, "DS": float, "US": int, "UL": int, "SS": int, "SL": int, "FL": float, "FD": float}


def tag_hex(tag: int) -> str:
    return f"{tag:08X}"


def _person_name(value: str) -> dict[str, str]:
    groups = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), value.split("="), strict=False))
    return {name: group for name, group in groups.items() if group}


def _number(vr: str, value: object) -> object:
    try:
        return _NUMBER_VRS[vr](value)
    except (TypeError, ValueError):
        return str(value)


def attribute(keyword: str, value: object) -> dict:
    """One DICOM JSON attribute from an index value (a DICOM string, '\\'-separated when multi-valued, or a number)."""
    vr = dictionary_VR(keyword)
    if value is None or value == "":
        return {"vr": vr}
    if keyword == "ModalitiesInStudy":
        values: list = sorted(str(value).split(","))
    elif isinstance(value, (int, float)):
        values = [value]
    else:
        values = [part for part in str(value).split("\\") if part != ""] or [""]
    if vr == "PN":
        values = [_person_name(part) for part in values]
    elif vr in _NUMBER_VRS:
        values = [_number(vr, part) for part in values]
    return {"vr": vr, "Value": values}


def retrieve_url(base_url: str, row: dict, level: str) -> str:
    """PS3.18 10.6.3.3: the WADO-RS URL of the study, series or instance a row describes."""
    url = f"{base_url}/studies/{row['StudyInstanceUID']}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{row['SeriesInstanceUID']}"
    if level == "IMAGE":
        url += f"/instances/{row['SOPInstanceUID']}"
    return url


def row_json(row: dict, keywords: list[str], *, level: str, base_url: str) -> dict:
    """A QIDO-RS result: the returned keywords of one index row, plus the attributes the service adds."""
    result = {tag_hex(tag_for_keyword(keyword)): attribute(keyword, row.get(keyword)) for keyword in keywords}
    charset = row.get("SpecificCharacterSet") or ""
    if charset:
        result[tag_hex(0x00080005)] = attribute("SpecificCharacterSet", charset)
    if level in ("STUDY", "IMAGE"):
        result[tag_hex(0x00080056)] = {"vr": "CS", "Value": ["ONLINE"]}  # InstanceAvailability
    if "StudyInstanceUID" in row and (level == "STUDY" or "SeriesInstanceUID" in row):
        if level != "IMAGE" or "SOPInstanceUID" in row:
            result[tag_hex(0x00081190)] = {"vr": "UR", "Value": [retrieve_url(base_url, row, level)]}
    return dict(sorted(result.items()))


def _is_bulk(element: object, vr: str | None) -> bool:
    """True for a top-level binary element over the threshold; a RawDataElement is judged without reading it."""
    if vr not in BULK_VRS:
        return False
    if isinstance(element, RawDataElement):
        return element.length == 0xFFFFFFFF or element.length > BULK_THRESHOLD
    value = getattr(element, "value", None)
    return value is not None and len(value) > BULK_THRESHOLD


def _vr(dataset: Dataset, tag: BaseTag, element: object) -> str | None:
    vr = getattr(element, "VR", None)
    if vr:
        return vr
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def dataset_json(dataset: Dataset, instance_url: str, *, pixel_vr: str | None = None) -> dict:
    """WADO-RS metadata of one instance: top-level bulk values become BulkDataURIs under `instance_url`/bulkdata.

    Nested binary values stay inline. `pixel_vr` adds Pixel Data by reference when the read stopped before it.
    """
    result: dict[str, dict] = {}
    for tag in sorted(dataset.keys()):
        element = dataset.get_item(tag)
        vr = _vr(dataset, tag, element)
        if _is_bulk(element, vr):
            result[tag_hex(tag)] = {"vr": vr, "BulkDataURI": f"{instance_url}/bulkdata/{tag_hex(tag)}"}
            continue
        try:
            result[tag_hex(tag)] = dataset[tag].to_json_dict(None, BULK_THRESHOLD)
        except Exception:  # a malformed value: say what it is, not what it holds
            result[tag_hex(tag)] = {"vr": vr}
    if pixel_vr and tag_hex(PIXEL_DATA) not in result:
        result[tag_hex(PIXEL_DATA)] = {"vr": pixel_vr, "BulkDataURI": f"{instance_url}/bulkdata/{tag_hex(PIXEL_DATA)}"}
    return result
