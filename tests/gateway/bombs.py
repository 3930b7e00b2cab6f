"""Hostile instances for the decoding-limit tests: a deflate bomb and an image that claims more pixels than it carries."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

from tests.gateway.instances import PATIENT_ID, PATIENT_NAME

GIB = 1 << 30
BLOCK = 1 << 24  # zeros deflated at a time


def _image(rows: int, columns: int, bits: int, **uids: str) -> Dataset:
    dataset = Dataset()
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = uids.get("sop_uid") or generate_uid()
    dataset.StudyInstanceUID = uids.get("study_uid") or generate_uid()
    dataset.SeriesInstanceUID = uids.get("series_uid") or generate_uid()
    dataset.Modality, dataset.PatientName, dataset.PatientID = "OT", PATIENT_NAME, PATIENT_ID
    dataset.Rows, dataset.Columns, dataset.SamplesPerPixel = rows, columns, 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = bits, bits, bits - 1, 0
    return dataset


def part10_head(transfer_syntax: str, sop_class: str = SecondaryCaptureImageStorage, sop_instance: str = "") -> bytes:
    """Preamble, DICM and a file meta information (PS3.10 7.1) for a data set in `transfer_syntax`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_instance or generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    head = io.BytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    return head.getvalue()


def _part10_head(dataset: Dataset, transfer_syntax: str) -> bytes:
    return part10_head(transfer_syntax, dataset.SOPClassUID, dataset.SOPInstanceUID)


def explicit_le(dataset: Dataset) -> bytes:
    """A data set encoded as Explicit VR Little Endian, without file meta."""
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, dataset)
    return encoded.getvalue()


def deflated_bomb(folder: Path, inflated: int = GIB, **uids: str) -> Path:
    """A valid Deflated Explicit VR Little Endian instance whose Pixel Data are `inflated` bytes of zeros: ~1 MB per GiB.

    The zeros are deflated 16 MiB at a time after a full flush, so every block is the same bytes (made once).
    """
    columns = 32768
    dataset = _image(inflated // (2 * columns), columns, 16, **uids)
    pixels = dataset.Rows * columns * 2
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    # PS3.5 7.1.2: Pixel Data as OW, 2 reserved bytes and a 4-byte length.
    head = explicit_le(dataset) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixels)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    with path.open("wb") as out:
        out.write(_part10_head(dataset, DeflatedExplicitVRLittleEndian))
        out.write(compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH))
        block = compressor.compress(bytes(BLOCK)) + compressor.flush(zlib.Z_FULL_FLUSH)
        for _ in range(pixels // BLOCK):
            out.write(block)
        out.write(compressor.compress(bytes(pixels % BLOCK)) + compressor.flush())
    return path


def huge_image(folder: Path, rows: int = 60000, columns: int = 60000, **uids: str) -> Path:
    """An RLE Lossless instance whose header claims rows x columns 8-bit pixels over a 70-byte frame.

    RLE because pydicom always has its decoder: without a check first, it would allocate the whole image.
    """
    dataset = _image(rows, columns, 8, **uids)
    segment = b"\x81\x00"  # PS3.5 G.3.1: one run of 128 zeros
    frame = struct.pack("<16L", 1, 64, *([0] * 14)) + segment
    dataset.PixelData = encapsulate([frame])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    path.write_bytes(_part10_head(dataset, RLELossless) + explicit_le(dataset))
    return path
