"""part10.read_header against pydicom's own reader, on every test file, whole and cut short."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from gateway import indexing, part10

DATA = Path(get_testdata_file("CT_small.dcm")).parent
WHOLE = sorted(
    path.name
    for path in DATA.glob("*.dcm")
    if not any(mark in path.name for mark in ("truncated", "no_meta", "NoMeta", "meta_missing", "badVR"))
)


def _readable_by_pydicom(path: Path) -> bool:
    try:
        dcmread(path)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("name", WHOLE)
def test_header_matches_pydicom(name):
    path = DATA / name
    if not _readable_by_pydicom(path) or name == "SC_rgb_jpeg.dcm":  # its data set contradicts its transfer syntax
        with pytest.raises(part10.Unreadable):
            part10.read_header(path, indexing.HEADER_TAGS)
        return
    header = part10.read_header(path, indexing.HEADER_TAGS)
    reference = dcmread(path, stop_before_pixels=True)
    assert header.transfer_syntax_uid == reference.file_meta.TransferSyntaxUID
    assert header.sop_instance_uid == reference.file_meta.get("MediaStorageSOPInstanceUID", "")
    assert header.sop_class_uid == reference.file_meta.get("MediaStorageSOPClassUID", "")
    for tag in indexing.HEADER_TAGS:
        if tag in reference:
            assert header.dataset[tag].value == reference[tag].value, hex(tag)
        else:
            assert tag not in header.dataset


def _element_starts(path: Path) -> set[int]:
    """Where each file meta and top-level element begins: a cut there looks like a shorter whole file."""
    dataset = dcmread(path, stop_before_pixels=False)
    implicit = dataset.file_meta.TransferSyntaxUID.is_implicit_VR
    starts = set()
    for element in [*dataset.file_meta, *dataset]:
        long_header = (not implicit or element.tag >> 16 == 2) and element.VR.encode() in part10.LONG_VRS
        starts.add(element.file_tell - (12 if long_header else 8))
    return starts


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "rtplan.dcm"]
)
def test_a_file_cut_inside_an_element_is_unreadable(name, tmp_path):
    """Cut anywhere in the preamble, the meta, an element header or a value (sequences, pixel data): refused."""
    source = DATA / name
    data = source.read_bytes()
    boundaries = _element_starts(source)
    cut = tmp_path / name
    accepted = []
    for size in [*range(0, min(len(data), 3000)), *range(len(data) - 300, len(data))]:
        cut.write_bytes(data[:size])
        try:
            part10.read_header(cut, indexing.HEADER_TAGS)
        except part10.Unreadable:
            continue
        accepted.append(size)
    assert set(accepted) <= boundaries
    assert part10.read_header(source, indexing.HEADER_TAGS).dataset_offset in boundaries
