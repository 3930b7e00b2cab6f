"""Decoding limits over HTTP: a deflate bomb sent by STOW-RS, a 60000 x 60000 image asked for by WADO-RS.

The memory tests run gunicorn (the production server) and measure its worker's peak resident set.
Before, STOW-RS of a 1 MB deflate bomb grew the worker by 1.7 GiB and reading it back cost 4.1 GiB.
"""

from __future__ import annotations

import hashlib
import io
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from pydicom import dcmread
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import RLELossless

from dicomweb import rendering
from gateway import store
from gateway.models import Instance
from tests.conftest import ROOT, free_port, peer_env, stop_process, wait_for_port
from tests.dicomweb.access import MULTIPART, bearer, leftover_temp_files, multipart, stored_files
from tests.gateway.bombs import deflated_bomb, huge_image
from tests.gateway.instances import PATIENT_ID, PATIENT_NAME, dataset_bytes, make_instance, multiframe_mr
from tests.memory import MB, PeakGrowth, child_pid

pytestmark = pytest.mark.django_db(transaction=True)

# The worker's growth while it refuses: a bomb is spooled to a file and inflated 1 MiB at a time, a refused
# image is never decoded, a deflated instance is sent 1 MiB at a time. 50 MB is room for the allocator and
# Django's per-request objects; the unprotected worker grew by 1.7 GiB (STOW-RS) and 4.1 GiB (WADO-RS).
RSS_BOUND = 50 * MB
DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
INSTANCE = 'multipart/related; type="application/dicom"'


@dataclass
class Web:
    url: str
    worker: int
    log: Path


@pytest.fixture
def storage(settings, tmp_path) -> Path:
    settings.STORAGE_DIR = tmp_path / "storage"
    return settings.STORAGE_DIR


@pytest.fixture
def gunicorn(storage, tmp_path) -> Iterator[callable]:
    """Start gunicorn (one worker) on this test's storage, with settings overridden; yields a Web."""
    processes = []

    def start(**env: str) -> Web:
        port, log = free_port(), tmp_path / f"web-{len(processes)}.log"
        command = [sys.executable, "-m", "gunicorn", "gateway.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "1"]
        with log.open("wb") as output:
            process = subprocess.Popen(
                command,
                env=peer_env(ISTHMUS_STORAGE_DIR=str(storage), **env),
                cwd=ROOT,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        processes.append(process)
        wait_for_port(port, process=process)
        return Web(f"http://127.0.0.1:{port}", child_pid(process.pid), log)

    yield start
    for process in processes:
        stop_process(process)


def stow(url: str, *parts: bytes, headers: dict) -> requests.Response:
    return requests.post(
        f"{url}/dicomweb/studies", data=multipart(*parts), headers={"Content-Type": MULTIPART, **headers}, timeout=60
    )


def wado(url: str, path: str, accept: str, headers: dict, **options) -> requests.Response:
    return requests.get(f"{url}/dicomweb/{path}", headers={"Accept": accept, **headers}, timeout=60, **options)


def instance_path(dataset) -> str:
    return f"studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}/instances/{dataset.SOPInstanceUID}"


def one_part(response: requests.Response) -> tuple[str, bytes]:
    """The content type and bytes of a one-part multipart/related answer."""
    boundary = response.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"').encode()
    head, _, rest = response.content.split(b"--" + boundary, 2)[1].partition(b"\r\n\r\n")
    return head.decode().split("Content-Type: ")[1].split("\r\n")[0], rest[:-2]


def test_deflate_bomb_over_stow_rs_is_400_and_stores_nothing(gunicorn, storage, tmp_path):
    web, headers = gunicorn(), bearer(name="uploader")
    warm = make_instance("image_dfl.dcm", tmp_path / "sent")  # a real deflated file: it must still go in
    assert stow(web.url, warm.read_bytes(), headers=headers).status_code == 200
    bomb = deflated_bomb(tmp_path / "sent")
    bomb_uid = str(dcmread(bomb, stop_before_pixels=True).SOPInstanceUID)
    other = make_instance("CT_small.dcm", tmp_path / "sent")
    growth = PeakGrowth(web.worker)

    response = stow(web.url, other.read_bytes(), bomb.read_bytes(), headers=headers)

    assert response.status_code == 400, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    assert bomb_uid in response.json()["detail"] and "ISTHMUS_MAX_INFLATE_RATIO" in response.json()["detail"]
    assert growth.bytes() < RSS_BOUND, f"the worker grew by {growth.bytes() / MB:.0f} MB"
    # The whole request is refused: the good instance beside the bomb is not stored either.
    assert list(Instance.objects.values_list("sop_instance_uid", flat=True)) == [warm.stem]
    assert len(stored_files(storage)) == 1 and leftover_temp_files() == []
    log = web.log.read_text()
    assert len([line for line in log.splitlines() if bomb_uid in line]) == 1, log
    assert PATIENT_NAME not in log and PATIENT_ID not in log


def test_legitimate_deflated_instance_round_trip(live_server, storage, tmp_path):
    """Stored as received (deflated, byte for byte); retrieved as stored or as the same data set inflated."""
    headers = bearer()
    sent = make_instance("image_dfl.dcm", tmp_path / "sent")
    assert stow(live_server.url, sent.read_bytes(), headers=headers).status_code == 200
    row = Instance.objects.get()
    assert row.transfer_syntax_uid == DEFLATED and store.instance_path(row).read_bytes() == sent.read_bytes()
    dataset = dcmread(sent, stop_before_pixels=True)

    as_stored = wado(live_server.url, instance_path(dataset), f"{INSTANCE}; transfer-syntax=*", headers)
    default = wado(live_server.url, instance_path(dataset), INSTANCE, headers)

    assert one_part(as_stored) == (f"application/dicom; transfer-syntax={DEFLATED}", sent.read_bytes())
    content_type, explicit = one_part(default)
    assert content_type == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    assert dcmread(io.BytesIO(explicit)).file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert explicit.endswith(zlib.decompress(dataset_bytes(sent), -zlib.MAX_WBITS))
    rendered = wado(live_server.url, f"{instance_path(dataset)}/rendered", "image/png", headers)
    assert rendered.status_code == 200 and rendered.headers["Content-Type"] == "image/png"
    assert leftover_temp_files() == []


def test_a_60000_by_60000_image_is_refused_before_decoding(gunicorn, storage, tmp_path):
    web, headers = gunicorn(), bearer()
    huge = huge_image(tmp_path / "sent")
    assert stow(web.url, huge.read_bytes(), headers=headers).status_code == 200  # its header is all the store reads
    dataset = dcmread(huge, stop_before_pixels=True)
    base = instance_path(dataset)
    wado(web.url, f"{base}/metadata", "application/dicom+json", headers)  # warm the worker up
    growth = PeakGrowth(web.worker)

    refusals = {
        "rendered": wado(web.url, f"{base}/rendered", "image/jpeg", headers),
        "thumbnail": wado(web.url, f"{base}/thumbnail", "image/jpeg", headers),
        "frame": wado(web.url, f"{base}/frames/1", 'multipart/related; type="application/octet-stream"', headers),
        "transcoded": wado(web.url, base, INSTANCE, headers),
    }

    for name, response in refusals.items():
        assert response.status_code == 406, (name, response.text)
        assert response.headers["Content-Type"] == "application/problem+json"
        assert "60000 x 60000" in response.json()["detail"] and "ISTHMUS_MAX_DECODE_MB" in response.json()["detail"]
    assert growth.bytes() < RSS_BOUND, f"the worker grew by {growth.bytes() / MB:.0f} MB"
    # What is stored is still there for a client that takes it as it is.
    stored_frame = wado(web.url, f"{base}/frames/1", "multipart/related; type=*/*", headers)
    assert stored_frame.status_code == 200 and one_part(stored_frame)[0].startswith("image/dicom-rle")
    as_stored = wado(web.url, base, f"{INSTANCE}; transfer-syntax=*", headers)
    assert one_part(as_stored)[1] == huge.read_bytes()


def streamed_data_set(response: requests.Response) -> tuple[str, int, str]:
    """Read a one-part answer as it streams: (its transfer syntax, its data set's size and sha256 after the meta).

    PS3.10 7.1: the meta's first element is its group length, a UL whose value is at byte 140.
    """
    boundary = response.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"').encode()
    trailer = len(b"\r\n--" + boundary + b"--\r\n")
    chunks = response.iter_content(1 << 20)
    buffer = b""
    while b"\r\n\r\n" not in buffer or len(buffer.partition(b"\r\n\r\n")[2]) < 4096:
        buffer += next(chunks)
    head, _, content = buffer.partition(b"\r\n\r\n")
    syntax = head.decode().rsplit("transfer-syntax=", 1)[1].strip()
    held = content[144 + struct.unpack_from("<I", content, 140)[0] :]
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        held += chunk
        digest.update(held[:-trailer])
        size += len(held[:-trailer])
        held = held[-trailer:]
    return syntax, size, digest.hexdigest()


def test_a_deflated_instance_is_sent_inflated_as_a_stream(gunicorn, storage, tmp_path):
    """256 MiB of pixels, 256 KB deflated: stored (the ratio floor raised), then read back as Explicit VR LE."""
    web, headers = gunicorn(ISTHMUS_INFLATE_RATIO_FLOOR_MB="512"), bearer()
    sent = deflated_bomb(tmp_path / "sent", inflated=256 * MB)
    assert stow(web.url, sent.read_bytes(), headers=headers).status_code == 200
    dataset = dcmread(sent, stop_before_pixels=True)
    inflated = zlib.decompress(dataset_bytes(sent), -zlib.MAX_WBITS)
    growth = PeakGrowth(web.worker)

    with wado(web.url, instance_path(dataset), INSTANCE, headers, stream=True) as response:
        assert response.status_code == 200
        syntax, size, digest = streamed_data_set(response)

    assert growth.bytes() < RSS_BOUND, f"the worker grew by {growth.bytes() / MB:.0f} MB"
    assert (syntax, size, digest) == (EXPLICIT_LE, len(inflated), hashlib.sha256(inflated).hexdigest())
    rendered = wado(web.url, f"{instance_path(dataset)}/rendered", "image/png", headers)
    assert rendered.status_code == 406 and "ISTHMUS_MAX_DECODE_MB" in rendered.json()["detail"]


def _many_frames(folder: Path, frames: int, compressed: bool) -> Path:
    """MR_small's 64 x 64 frame repeated; as RLE Lossless, its one compressed frame repeated."""
    path = multiframe_mr(folder, frames=frames)
    if compressed:
        dataset = dcmread(make_instance("MR_small.dcm", folder / "one"))
        dataset.compress(RLELossless)
        multi = dcmread(path)
        multi.PixelData = encapsulate([get_frame(dataset.PixelData, 0, number_of_frames=1)] * frames)
        multi["PixelData"].VR, multi["PixelData"].is_undefined_length = "OB", True
        multi.file_meta.TransferSyntaxUID = RLELossless
        multi.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("compressed", [False, True], ids=["native", "rle"])
def test_a_rendering_decodes_one_frame_of_a_multiframe_instance(tmp_path, compressed):
    """600 frames of 8 KB: rendering frame 300 holds a fraction of the whole (thumbnails render frame 1 this way)."""
    path = _many_frames(tmp_path, 600, compressed)
    whole = 600 * 64 * 64 * 2
    tracemalloc.start()
    try:
        with path.open("rb") as source:
            image = rendering.render(source, 300, "image/png")
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.startswith(b"\x89PNG")
    assert peak < whole / 4, f"rendering one frame held {peak / MB:.1f} MB; the whole pixel data is {whole / MB:.1f} MB"
