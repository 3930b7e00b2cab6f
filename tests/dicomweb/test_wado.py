"""WADO-RS over real sockets: what goes in by C-STORE or store.save() comes out the same through dicomweb-client."""

from __future__ import annotations

import io
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import get_frame

from gateway import store
from gateway.models import Instance
from tests.dicomweb.archive import client, reader_token, save, short_db_connections, store_study  # noqa: F401
from tests.gateway.instances import dataset_bytes, make_instance, multiframe_mr, storescu

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("short_db_connections")]
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _parts(answer: requests.Response) -> list[tuple[dict, bytes]]:
    """The parts of a multipart/related answer: (headers, content)."""
    media_type, *params = [item.strip() for item in answer.headers["Content-Type"].split(";")]
    assert media_type == "multipart/related"
    boundary = next(value for name, _, value in (p.partition("=") for p in params) if name == "boundary")
    parts = []
    for chunk in answer.content.split(b"--" + boundary.strip('"').encode())[1:-1]:
        head, _, content = chunk.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n"))
        parts.append((headers, content[:-2]))  # the CRLF before the next delimiter
    return parts


def _get(live_server, path: str, accept: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {reader_token()}", "Accept": accept}
    return requests.get(f"{live_server.url}/dicomweb/{path}", headers=headers, timeout=30)


def test_study_as_stored_is_byte_identical_and_streamed(live_server, tmp_path):
    study = store_study(tmp_path, "CT_small.dcm", series=2, per_series=2)
    answer = _get(live_server, f"studies/{study.uid}", 'multipart/related; type="application/dicom"; transfer-syntax=*')
    assert answer.status_code == 200
    # Streamed from the files, with the length known up front: no chunked encoding.
    assert int(answer.headers["Content-Length"]) == len(answer.content)
    assert "Transfer-Encoding" not in answer.headers
    parts = _parts(answer)
    assert len(parts) == 4
    for headers, content in parts:
        assert headers["Content-Type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
        sop = str(dcmread(io.BytesIO(content), stop_before_pixels=True).SOPInstanceUID)
        stored = store.instance_path(Instance.objects.get(sop_instance_uid=sop))
        assert content == stored.read_bytes()
        sent = study.files[sop]
        assert content.endswith(dataset_bytes(sent))


def test_dicomweb_client_retrieves_series_and_instance(live_server, tmp_path):
    study = store_study(tmp_path, "MR_small.dcm", series=2, per_series=2)
    dicomweb = client(live_server, reader_token())
    series = dicomweb.retrieve_series(study.uid, study.series[1])
    assert len(series) == 2 and {str(item.SeriesInstanceUID) for item in series} == {study.series[1]}
    sop = str(series[0].SOPInstanceUID)
    instance = dicomweb.retrieve_instance(study.uid, study.series[1], sop)
    original = dcmread(study.files[sop])
    assert instance.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert instance.PixelData == original.PixelData and instance.PatientName == original.PatientName
    assert requests.get(f"{live_server.url}/dicomweb/studies/{study.uid}", timeout=10).status_code == 401
    missing = _get(live_server, f"studies/{study.uid}/series/1.2.3", 'multipart/related; type="application/dicom"')
    assert missing.status_code == 404 and missing.headers["Content-Type"] == "application/problem+json"


def test_compressed_instance_is_decoded_unless_its_syntax_is_accepted(live_server, tmp_path):
    study = store_study(tmp_path, "SC_rgb_jpeg_gdcm.dcm")  # JPEG lossless, process 14 SV1
    sop = next(iter(study.files))
    path = f"studies/{study.uid}/series/{study.series[0]}/instances/{sop}"
    original = dcmread(study.files[sop])
    transcoded = _get(live_server, path, 'multipart/related; type="application/dicom"')
    assert "Content-Length" not in transcoded.headers  # re-encoded on the fly: its size is not known up front
    default = _parts(transcoded)
    decoded = dcmread(io.BytesIO(default[0][1]))
    assert decoded.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(decoded.pixel_array, original.pixel_array)
    stored_syntax = "1.2.840.10008.1.2.4.70"
    kept = _parts(
        _get(live_server, path, f'multipart/related; type="application/dicom"; transfer-syntax={stored_syntax}')
    )
    assert kept[0][0]["Content-Type"].endswith(stored_syntax)
    assert kept[0][1].endswith(dataset_bytes(study.files[sop]))
    plain = store_study(tmp_path / "plain", "CT_small.dcm")
    refused = _get(
        live_server,
        f"studies/{plain.uid}",
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
    )
    assert refused.status_code == 406


@pytest.mark.parametrize(
    "template",
    [
        "MR_small_implicit.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "JPGExtended.dcm",
    ],
)
def test_default_transfer_syntax_is_explicit_vr_little_endian(live_server, tmp_path, template):
    """PS3.18 8.7.3.5.2: no transfer-syntax parameter means Explicit VR Little Endian, decoded where needed."""
    study = store_study(tmp_path, template)
    sop = next(iter(study.files))
    dicomweb = client(live_server, reader_token())
    # dicomweb-client asks for transfer-syntax=* unless told otherwise; a bare media type has no parameter.
    retrieved = dicomweb.retrieve_instance(study.uid, study.series[0], sop, media_types=("application/dicom",))
    original = dcmread(study.files[sop])
    assert retrieved.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert retrieved.SOPInstanceUID == sop and retrieved.StudyDate == original.StudyDate
    assert np.array_equal(retrieved.pixel_array, original.pixel_array)


def test_metadata_and_bulkdata(live_server, tmp_path):
    study = store_study(tmp_path, "MR_small.dcm", per_series=2)
    dicomweb = client(live_server, reader_token())
    sop = next(iter(study.files))
    metadata = dicomweb.retrieve_instance_metadata(study.uid, study.series[0], sop)
    assert metadata["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane^Secret"}]
    assert metadata["00080018"]["Value"] == [sop]
    assert "00020010" not in metadata  # no file meta
    uri = metadata["7FE00010"]["BulkDataURI"]
    assert metadata["7FE00010"]["vr"] == "OW" and uri.endswith(f"/instances/{sop}/bulkdata/7FE00010")
    assert len(dicomweb.retrieve_series_metadata(study.uid, study.series[0])) == 2
    assert len(dicomweb.retrieve_study_metadata(study.uid)) == 2
    # dicomweb-client sends Host without the port, so the URI names port 80: fetch its path from the live server.
    bulk = dicomweb.retrieve_bulkdata(live_server.url + urlsplit(uri).path)
    assert bulk == [dcmread(study.files[sop]).PixelData]


def test_large_binary_values_go_by_reference(live_server, tmp_path):
    """Implicit VR file: a 2000-byte ICC profile becomes a BulkDataURI; a small binary value stays inline."""
    profile = bytes(range(256)) * 8 + bytes(range(208))
    study = store_study(tmp_path, "MR_small_implicit.dcm", ICCProfile=profile, FileSetID="X")
    sop = next(iter(study.files))
    dicomweb = client(live_server, reader_token())
    metadata = dicomweb.retrieve_instance_metadata(study.uid, study.series[0], sop)
    assert metadata["00282000"]["vr"] == "OB" and "InlineBinary" not in metadata["00282000"]
    path = urlsplit(metadata["00282000"]["BulkDataURI"]).path
    assert dicomweb.retrieve_bulkdata(live_server.url + path) == [profile]
    assert metadata["00280010"] == {"vr": "US", "Value": [64]}


def test_frames_native_and_compressed(live_server, tmp_path):
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    multi = multiframe_mr(tmp_path, frames=4, study_uid=study_uid)
    save(multi)
    dataset = dcmread(multi)
    dicomweb = client(live_server, reader_token())
    size = dataset.Rows * dataset.Columns * 2
    frames = dicomweb.retrieve_instance_frames(
        study_uid, str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID), [2, 4]
    )
    assert frames == [dataset.PixelData[size : 2 * size], dataset.PixelData[3 * size : 4 * size]]
    jpeg = store_study(tmp_path / "jpeg", "SC_rgb_jpeg_gdcm.dcm")
    sop = next(iter(jpeg.files))
    original = dcmread(jpeg.files[sop])
    compressed = dicomweb.retrieve_instance_frames(jpeg.uid, jpeg.series[0], sop, [1], media_types=("image/jpeg",))
    assert compressed == [get_frame(original.PixelData, 0, number_of_frames=1)]
    assert dicomweb.retrieve_instance_frames(jpeg.uid, jpeg.series[0], sop, [1]) == compressed  # */*: as stored
    raw = dicomweb.retrieve_instance_frames(
        jpeg.uid, jpeg.series[0], sop, [1], media_types=("application/octet-stream",)
    )
    assert raw == [original.pixel_array.tobytes()]
    big_endian = store_study(tmp_path / "be", "MR_small_bigendian.dcm")
    be_sop = next(iter(big_endian.files))
    swapped = dicomweb.retrieve_instance_frames(
        big_endian.uid, big_endian.series[0], be_sop, [1], media_types=("application/octet-stream",)
    )
    assert swapped == [dcmread(big_endian.files[be_sop]).pixel_array.astype("<i2").tobytes()]  # PS3.18: little endian
    out_of_range = _get(
        live_server,
        f"studies/{jpeg.uid}/series/{jpeg.series[0]}/instances/{sop}/frames/2",
        'multipart/related; type="application/octet-stream"',
    )
    assert out_of_range.status_code == 404


@pytest.mark.parametrize(("media_type", "pil_format"), [("image/jpeg", "JPEG"), ("image/png", "PNG")])
def test_rendered(live_server, tmp_path, media_type, pil_format):
    study = store_study(tmp_path, "MR_small.dcm")
    sop = next(iter(study.files))
    dicomweb = client(live_server, reader_token())
    image = dicomweb.retrieve_instance_rendered(study.uid, study.series[0], sop, media_types=(media_type,))
    picture = Image.open(io.BytesIO(image))
    assert picture.format == pil_format and picture.size == (64, 64)
    assert np.asarray(picture).std() > 10  # windowed, not a flat grey


def test_rendered_window_quality_and_bad_parameters(live_server, tmp_path):
    study = store_study(tmp_path, "MR_small.dcm")
    sop = next(iter(study.files))
    url = f"studies/{study.uid}/series/{study.series[0]}/instances/{sop}/rendered"
    narrow = _get(live_server, f"{url}?window=0,1,linear", "image/png")  # everything above 0 is white
    assert narrow.status_code == 200
    assert set(np.unique(np.asarray(Image.open(io.BytesIO(narrow.content))))) <= {0, 255}
    small = _get(live_server, f"{url}?quality=5&viewport=32,32&annotation=patient", "image/jpeg")
    assert small.status_code == 200 and "annotation" in small.headers["Warning"]
    assert Image.open(io.BytesIO(small.content)).size == (32, 32)
    assert len(small.content) < len(_get(live_server, f"{url}?quality=100", "image/jpeg").content)
    for query in ("window=1", "window=40,0", "window=40,400,sigmoid", "quality=0", "viewport=0,10"):
        assert _get(live_server, f"{url}?{query}", "image/jpeg").status_code == 400, query
    assert _get(live_server, url, "image/gif").status_code == 406


def test_thumbnails(live_server, tmp_path):
    study = store_study(tmp_path, "CT_small.dcm", series=2, per_series=3)
    report = store_study(tmp_path / "sr", "reportsi.dcm")
    for path in (f"studies/{study.uid}", f"studies/{study.uid}/series/{study.series[1]}"):
        answer = _get(live_server, f"{path}/thumbnail", "image/jpeg")
        assert answer.status_code == 200 and answer.headers["Content-Type"] == "image/jpeg"
        assert Image.open(io.BytesIO(answer.content)).size == (128, 128)
    sop = next(iter(study.files))
    big = _get(
        live_server,
        f"studies/{study.uid}/series/{study.series[0]}/instances/{sop}/thumbnail?viewport=256,256",
        "image/png",
    )
    assert Image.open(io.BytesIO(big.content)).size == (128, 128)  # CT_small is 128 x 128: never enlarged
    assert _get(live_server, f"studies/{report.uid}/thumbnail", "image/jpeg").status_code == 404


def test_rendered_frame_of_a_multiframe_instance(live_server, tmp_path):
    multi = multiframe_mr(tmp_path, frames=3)
    save(multi)
    header = dcmread(multi, stop_before_pixels=True)
    uids = (str(header.StudyInstanceUID), str(header.SeriesInstanceUID), str(header.SOPInstanceUID))
    dicomweb = client(live_server, reader_token())
    image = dicomweb.retrieve_instance_frames_rendered(*uids, [3], media_types=("image/png",))
    assert Image.open(io.BytesIO(image)).size == (64, 64)
    beyond = _get(live_server, "studies/{}/series/{}/instances/{}/frames/4/rendered".format(*uids), "image/jpeg")
    assert beyond.status_code == 404


def test_c_store_in_wado_out(live_server, listener, modality, tmp_path):
    sent = make_instance("CT_small.dcm", tmp_path)
    result = storescu(listener.port, [sent])
    assert result.returncode == 0, result.stderr
    header = dcmread(sent, stop_before_pixels=True)
    answer = _get(
        live_server,
        f"studies/{header.StudyInstanceUID}/series/{header.SeriesInstanceUID}/instances/{header.SOPInstanceUID}",
        'multipart/related; type="application/dicom"; transfer-syntax=*',
    )
    assert answer.status_code == 200
    assert _parts(answer)[0][1].endswith(dataset_bytes(sent))


def test_implicit_vr_on_request_and_instances_without_pixels(live_server, tmp_path):
    study = store_study(tmp_path, "MR_small_RLE.dcm")
    sop = next(iter(study.files))
    base = f"studies/{study.uid}/series/{study.series[0]}/instances/{sop}"
    implicit = "1.2.840.10008.1.2"
    answer = _get(live_server, base, f'multipart/related; type="application/dicom"; transfer-syntax={implicit}')
    (headers, content), *_ = _parts(answer)
    assert headers["Content-Type"].endswith(implicit)
    assert dcmread(io.BytesIO(content)).file_meta.TransferSyntaxUID == implicit
    assert _get(live_server, f"{base}/frames/one", "multipart/related").status_code == 400
    report = store_study(tmp_path / "sr", "reportsi.dcm")  # a structured report: no Pixel Data
    report_sop = next(iter(report.files))
    report_base = f"studies/{report.uid}/series/{report.series[0]}/instances/{report_sop}"
    assert _get(live_server, f"{report_base}/frames/1", "multipart/related").status_code == 404
    assert _get(live_server, f"{report_base}/rendered", "image/jpeg").status_code == 406
    metadata = _get(live_server, f"{report_base}/metadata", "application/dicom+json").json()
    assert metadata[0]["0040A730"]["vr"] == "SQ" and "7FE00010" not in metadata[0]  # ContentSequence, no pixels
