"""indexing.text() and number(): values read from raw bytes are what pydicom's conversion gives."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from gateway import indexing

DATA = Path(get_testdata_file("CT_small.dcm")).parent
FILES = sorted(
    [path.name for path in DATA.glob("*.dcm") if "truncated" not in path.name and "no_meta" not in path.name]
    + [f"../charset_files/{path.name}" for path in (DATA.parent / "charset_files").glob("*.dcm")]
)
NUMBERS = {"SeriesNumber", "InstanceNumber", "NumberOfFrames", "Rows", "Columns", "BitsAllocated"}


def _value(dataset, keyword: str) -> str | int | None:
    return indexing.number(dataset, keyword) if keyword in NUMBERS else indexing.text(dataset, keyword, 400)


@pytest.mark.parametrize("name", FILES)
def test_raw_values_match_pydicom(name):
    raw = dcmread(DATA / name, stop_before_pixels=True, force=True)
    converted = dcmread(DATA / name, stop_before_pixels=True, force=True)
    for _element in converted:  # iterating converts every raw element: text() then takes pydicom's values
        pass
    for keyword in indexing.KEYWORDS:
        assert _value(raw, keyword) == _value(converted, keyword), keyword


def test_ascii_values_are_read_without_conversion():
    dataset = dcmread(DATA / "CT_small.dcm", stop_before_pixels=True)
    values = {keyword: _value(dataset, keyword) for keyword in indexing.KEYWORDS}
    assert values["PatientName"] == "CompressedSamples^CT1" and values["Rows"] == 128
    for keyword in ("PatientName", "SOPInstanceUID", "StudyDate", "Rows", "InstanceNumber"):
        assert isinstance(dataset.get_item(keyword), RawDataElement), keyword  # pydicom never converted it


def test_raw_values_of_a_made_up_header():
    """Padding, multi-values and an escape sequence, as a raw data set holds them."""

    def raw(tag, vr, value):
        return RawDataElement(tag, vr, len(value), value, 0, False, True)

    dataset = Dataset(
        {
            0x00080008: raw(0x00080008, "CS", b"ORIGINAL\\PRIMARY "),
            0x00080050: raw(0x00080050, "SH", b" A12 "),
            0x00100010: raw(0x00100010, "PN", b"\x1b$BVZ^\x1b(B"),
            0x00200013: raw(0x00200013, "IS", b" 7\\8"),
            0x00280010: raw(0x00280010, "US", b"\x00\x02"),
        }
    )
    assert indexing.text(dataset, "ImageType", 64) == "ORIGINAL\\PRIMARY"
    assert indexing.text(dataset, "AccessionNumber", 16) == "A12"
    assert indexing.number(dataset, "InstanceNumber") == 7
    assert indexing.number(dataset, "Rows") == 512
    assert indexing.text(dataset, "PatientName", 64) == indexing.text(dataset.copy(), "PatientName", 64)
