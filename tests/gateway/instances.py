"""Test instances made from pydicom's bundled files, and ways to send and check them."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset

from gateway import store
from gateway.models import Instance
from tests.conftest import dcmtk, peer_env

PATIENT_NAME = "Doe^Jane^Secret"
PATIENT_ID = "PID-7731-SECRET"


def make_instance(
    template: str,
    folder: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    **attributes,
) -> Path:
    """A copy of pydicom's `template` file with fresh UIDs and our patient, written as Part 10; returns its path."""
    dataset = dcmread(get_testdata_file(template))
    dataset.StudyInstanceUID = study_uid or generate_uid()
    dataset.SeriesInstanceUID = series_uid or generate_uid()
    dataset.SOPInstanceUID = sop_uid or generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.PatientName, dataset.PatientID = PATIENT_NAME, PATIENT_ID
    # Encode as dcmtk's storescu re-encodes on sending, so what arrives can be compared byte for byte:
    # no Data Set Trailing Padding, sequences and items of explicit length.
    if 0xFFFCFFFC in dataset:
        del dataset[0xFFFCFFFC]
    _explicit_lengths(dataset)
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    if "SOPClassUID" in attributes:
        dataset.file_meta.MediaStorageSOPClassUID = attributes["SOPClassUID"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def _explicit_lengths(dataset: Dataset) -> None:
    for element in dataset:
        if element.VR == "SQ":
            element.is_undefined_length = False
            for item in element.value:
                item.is_undefined_length_sequence_item = False
                _explicit_lengths(item)


def multiframe_mr(folder: Path, frames: int = 4, **uids) -> Path:
    """An Enhanced MR-classed multi-frame instance built from MR_small (frames are copies)."""
    single = dcmread(get_testdata_file("MR_small.dcm"))
    return make_instance(
        "MR_small.dcm",
        folder,
        SOPClassUID="1.2.840.10008.5.1.4.1.1.4.1",
        NumberOfFrames=frames,
        PixelData=single.PixelData * frames,
        **uids,
    )


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set after the file meta information: what travelled over the wire."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sop_uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_stored_as_sent(sent: Path, calling_ae: str = "CT1") -> Instance:
    """The instance is indexed, its file is where the row says, and its data set is byte-for-byte what was sent."""
    instance = Instance.objects.select_related("series__study").get(sop_instance_uid=sop_uid_of(sent))
    stored = store.instance_path(instance)
    assert stored.is_file()
    assert dataset_bytes(stored) == dataset_bytes(sent)
    assert instance.sha256 == sha256(stored) and instance.size == stored.stat().st_size
    assert instance.transfer_syntax_uid == str(dcmread(sent, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    assert instance.calling_ae == calling_ae
    assert stored.relative_to(store.storage_root()).parts == (
        instance.series.study.study_instance_uid,
        instance.series.series_instance_uid,
        f"{instance.sop_instance_uid}.dcm",
    )
    return instance


def storescu(port: int, files: list[Path], *options: str, calling: str = "CT1") -> subprocess.CompletedProcess:
    """dcmtk storescu, the modality most sites have, with TCP_NODELAY=1."""
    return subprocess.run(
        [dcmtk("storescu"), "-v", "-aet", calling, "-aec", "ISTHMUS", "-to", "10", *options, "127.0.0.1", str(port)]
        + [str(path) for path in files],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def pynetdicom_store(port: int, path: Path, calling: str = "CT1") -> int:
    """C-STORE one file in its own transfer syntax, sending its bytes unchanged; returns the status."""
    meta, _offset = split_dataset(path)
    ae = AE(ae_title=calling)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="ISTHMUS")
    assert assoc.is_established, "association not accepted"
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        response = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    assert "Status" in response, "no C-STORE response"
    return int(response.Status)


def stored_files(root: Path) -> list[Path]:
    """Every file in the store proper, the temp area excluded."""
    return [path for path in root.rglob("*") if path.is_file() and ".tmp" not in path.relative_to(root).parts]


def temp_files(root: Path) -> list[Path]:
    """Files in the temp area other than the per-process lock files.

    A listener may be creating its process folder (made under a temporary name,
    then renamed) while this walks the tree: a folder that vanishes mid-walk
    means walking again.
    """
    base = root / ".tmp"
    for _attempt in range(10):
        try:
            return (
                [path for path in base.rglob("*") if path.is_file() and path.name != ".lock"] if base.exists() else []
            )
        except FileNotFoundError:
            continue
    raise AssertionError(f"{base} kept changing while it was listed")
