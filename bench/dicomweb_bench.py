"""DICOMweb: QIDO-RS latency, WADO-RS retrieve rate and STOW-RS ingest rate, Isthmus against Orthanc's plugin.

    .venv/bin/python bench/dicomweb_bench.py [--studies 1000] [--per-study 100] [--orthanc-studies 100]
        [--slices 300] [--queries 50] [--repeat 3] [--quick] [--keep]
        [--only qido|stow|wado ...] [--stow-clients 1,4]

Isthmus runs as in production on one host: gunicorn (2 workers, 4 threads) over the
embedded SQLite database in its own data dir, a bearer token on every request.
Its index gets --studies x --per-study instances (two series per study),
inserted in bulk through the ORM (no files: QIDO-RS reads only the index).
Orthanc 1.10 (Debian) with its DICOMweb plugin and default SQLite index gets
the same studies (or the first --orthanc-studies of them) as real
pixel-less files sent with dcmtk storescu; the table says how many each held.

QIDO-RS: the viewer's queries (a month of studies, limit 25; a patient name
wildcard, limit 25; an accession number; a patient ID), --queries times each
after 3 warm-ups, one keep-alive connection; median and 95th percentile.
STOW-RS: a new study of --slices CT slices of 0.5 MB, 10 instances per
request, from 1 client, then from 4 clients at once (threads streaming body
files from disk), --repeat times each (the server going first alternates),
median rate, and each server's CPU time per instance. WADO-RS: a --slices
study stored in both (real files), retrieved whole as multipart/related
application/dicom, --repeat times, median rate.
The temp dir is made in $BENCH_TMPDIR if set.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests
from ports import cpu_seconds, free_port, isthmus_env, start_orthanc, wait_for_port  # bench/ is sys.path[0]
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = ["--workers", "2", "--threads", "4"]  # as `manage.py run` starts the web process
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
STORESCU = "/usr/bin/storescu"
UID_ROOT = "1.2.826.0.1.3680043.8.498.4242"
SURNAMES = ["SMITH", "JONES", "TAYLOR", "BROWN", "WILSON", "EVANS", "THOMAS", "JOHNSON", "ROBERTS", "WALKER"]
MB = 1 << 20
PER_REQUEST = 10
RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"'


# -- the data both servers hold ---------------------------------------------------


def study_values(number: int) -> dict:
    """Deterministic attributes of study `number`: the same in Isthmus's index and Orthanc's files."""
    day = number % 365
    month, mday = divmod(day, 28)
    return {
        "StudyInstanceUID": f"{UID_ROOT}.1.{number}",
        "PatientID": f"PID{number:06d}",
        "PatientName": f"{SURNAMES[number % len(SURNAMES)]}^PAT{number}",
        "PatientBirthDate": "19700101",
        "PatientSex": "O",
        "StudyDate": f"2024{month % 12 + 1:02d}{mday + 1:02d}",
        "StudyTime": "101500",
        "AccessionNumber": f"ACC{number:07d}",
        "StudyDescription": "CT CHEST",
        "StudyID": str(number),
    }


def series_uid(study: int, series: int) -> str:
    return f"{UID_ROOT}.2.{study}.{series}"


def instance_uid(study: int, series: int, number: int) -> str:
    return f"{UID_ROOT}.3.{study}.{series}.{number}"


def load_index(studies: int, per_study: int) -> None:
    """Runs inside an Isthmus process (Django set up): bulk rows for studies x per_study instances."""
    from django.db import transaction
    from django.utils import timezone

    from gateway.models import Instance, Patient, Series, Study

    now = timezone.now()
    for first in range(0, studies, 100):
        with transaction.atomic():
            numbers = range(first, min(first + 100, studies))
            values = {number: study_values(number) for number in numbers}
            patients = Patient.objects.bulk_create(
                Patient(
                    patient_id=values[n]["PatientID"],
                    patient_name=values[n]["PatientName"],
                    patient_birth_date=values[n]["PatientBirthDate"],
                    patient_sex=values[n]["PatientSex"],
                )
                for n in numbers
            )
            study_rows = Study.objects.bulk_create(
                Study(
                    study_instance_uid=values[n]["StudyInstanceUID"],
                    patient=patient,
                    study_date=values[n]["StudyDate"],
                    study_time=values[n]["StudyTime"],
                    accession_number=values[n]["AccessionNumber"],
                    study_id=values[n]["StudyID"],
                    study_description=values[n]["StudyDescription"],
                    calling_ae="BENCH",
                    received_at=now,
                )
                for n, patient in zip(numbers, patients, strict=True)
            )
            series_rows = Series.objects.bulk_create(
                Series(
                    series_instance_uid=series_uid(n, s),
                    study=study,
                    modality="CT",
                    series_number=s + 1,
                    received_at=now,
                )
                for n, study in zip(numbers, study_rows, strict=True)
                for s in range(2)
            )
            Instance.objects.bulk_create(
                (
                    Instance(
                        sop_instance_uid=instance_uid(n, s, i),
                        series=series_rows[(n - first) * 2 + s],
                        sop_class_uid=CTImageStorage,
                        instance_number=i + 1,
                        transfer_syntax_uid=ExplicitVRLittleEndian,
                        rows=512,
                        columns=512,
                        bits_allocated=16,
                        path=f"{values[n]['StudyInstanceUID']}/{series_uid(n, s)}/{instance_uid(n, s, i)}.dcm",
                        size=526_000,
                        sha256="0" * 64,
                        calling_ae="BENCH",
                        source="dimse",
                        received_at=now,
                    )
                    for n in numbers
                    for s in range(2)
                    for i in range(s, per_study, 2)
                ),
                batch_size=2000,
            )


def write_orthanc_files(folder: Path, studies: int, per_study: int, parts: int) -> list[Path]:
    """The same studies as small Part 10 files without pixel data, dealt into `parts` folders."""
    subfolders = [folder / f"part{n}" for n in range(parts)]
    for subfolder in subfolders:
        subfolder.mkdir(parents=True)
    dataset = ct_dataset(side=512, pixels=False)
    count = 0
    for number in range(studies):
        for keyword, value in study_values(number).items():
            setattr(dataset, keyword, value)
        for index in range(per_study):
            series = index % 2
            dataset.SeriesInstanceUID = series_uid(number, series)
            dataset.SeriesNumber = series + 1
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = instance_uid(number, series, index)
            dataset.InstanceNumber = index + 1
            dataset.save_as(subfolders[count % parts] / f"{count:07d}.dcm", enforce_file_format=True)
            count += 1
    return subfolders


def ct_dataset(side: int, pixels: bool) -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = CTImageStorage
    dataset.SOPClassUID = CTImageStorage
    dataset.Modality = "CT"
    dataset.Rows = dataset.Columns = side
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    if pixels:
        dataset.PixelData = bytes(range(256)) * (side * side * 2 // 256)
        dataset["PixelData"].VR = "OW"
    return dataset


def write_stow_bodies(folder: Path, slices: int, study_number: int) -> tuple[str, list[Path]]:
    """One new study of `slices` 0.5 MB CT slices as multipart bodies of PER_REQUEST instances; (study, bodies)."""
    folder.mkdir(parents=True)
    dataset = ct_dataset(side=512, pixels=True)
    for keyword, value in study_values(study_number).items():
        setattr(dataset, keyword, value)
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID, dataset.SeriesNumber = generate_uid(), 1
    bodies = []
    for first in range(0, slices, PER_REQUEST):
        path = folder / f"body{first:05d}"
        with open(path, "wb") as body:
            for index in range(first, min(first + PER_REQUEST, slices)):
                dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                dataset.InstanceNumber = index + 1
                body.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
                dataset.save_as(body, enforce_file_format=True)
                body.write(b"\r\n")
            body.write(f"--{BOUNDARY}--\r\n".encode())
        bodies.append(path)
    return dataset.StudyInstanceUID, bodies


BOUNDARY = uuid.uuid4().hex
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


# -- servers ------------------------------------------------------------------------


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Server:
    name: str
    base: Path
    http: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    headers: dict[str, str] = field(default_factory=dict)
    instances: int = 0

    @property
    def url(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


class Isthmus(Server):
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}/dicomweb"

    def env(self) -> dict[str, str]:
        return isthmus_env(self.base, DJANGO_SETTINGS_MODULE="gateway.settings")

    def prepare(self, studies: int, per_study: int) -> float:
        """Migrate, bulk-load the index and issue a token; returns the load time in seconds."""
        manage = [sys.executable, str(ROOT / "manage.py")]
        subprocess.run([*manage, "migrate", "--verbosity", "0"], env=self.env(), cwd=ROOT, check=True)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--load-index", str(studies), str(per_study)],
            env=self.env(),
            cwd=ROOT,
            check=True,
        )
        elapsed = time.perf_counter() - started
        token = subprocess.run(
            [*manage, "create_token", "bench", "--scope", "read,write"],
            env=self.env(),
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.headers = {"Authorization": f"Bearer {token}"}
        self.instances = studies * per_study
        return elapsed

    def start(self) -> None:
        log = open(self.base / "web.log", "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            # As `manage.py run` starts it: 2 workers of 4 threads (ISTHMUS_WEB_WORKERS defaults to 2).
            [sys.executable, "-m", "gunicorn", "gateway.wsgi", "--bind", f"127.0.0.1:{self.http}", *GUNICORN],
            env=self.env(),
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
        wait_for_port(self.http, self.process)


class Orthanc(Server):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}/dicom-web"

    def start(self) -> None:
        self.port = free_port()
        config = {
            "Name": "bench",
            "StorageDirectory": str(self.base / "storage"),
            "IndexDirectory": str(self.base / "index"),
            "DicomAet": "ORTHANC",
            "DicomPort": self.port,
            "HttpPort": self.http,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.process = start_orthanc(self.base, config, self.http, self.port)

    def load(self, folders: list[Path]) -> float:
        """storescu, one per folder, all at once; returns the wall time."""
        started = time.perf_counter()
        clients = [
            subprocess.Popen(
                [STORESCU, "-aet", "BENCH", "-aec", "ORTHANC", "+sd", "-to", "60", "127.0.0.1", str(self.port), str(f)],
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for f in folders
        ]
        for client in clients:
            if client.wait(3600) != 0:
                raise RuntimeError(f"storescu to Orthanc exited {client.returncode}")
        elapsed = time.perf_counter() - started
        with urllib_get(f"http://127.0.0.1:{self.http}/statistics") as answer:
            self.instances = answer.json()["CountInstances"]
        return elapsed


def urllib_get(url: str) -> requests.Response:
    return requests.get(url, timeout=60)


# -- measurements ---------------------------------------------------------------------


def queries(orthanc_studies: int) -> dict[str, str]:
    """The viewer's queries; every value exists in both servers' data."""
    some = study_values(min(42, orthanc_studies - 1))
    return {
        "date range, limit 25": "studies?StudyDate=20240301-20240331&limit=25",
        "PatientName wildcard, limit 25": "studies?PatientName=SMI*&limit=25",
        "AccessionNumber": f"studies?AccessionNumber={some['AccessionNumber']}",
        "PatientID": f"studies?PatientID={some['PatientID']}",
    }


def latency(server: Server, query: str, count: int) -> tuple[float, float, int]:
    """(median ms, p95 ms, number of studies answered)."""
    session = requests.Session()
    session.headers.update({**server.headers, "Accept": "application/dicom+json"})
    url = f"{server.url}/{query}"
    answered = 0
    for _ in range(3):
        response = session.get(url, timeout=60)
        response.raise_for_status()
        answered = len(response.json()) if response.content else 0
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = session.get(url, timeout=60)
        response.raise_for_status()
        _ = response.content
        times.append((time.perf_counter() - started) * 1000)
    p95 = statistics.quantiles(times, n=20)[18] if len(times) >= 2 else times[0]
    return statistics.median(times), p95, answered


def stow(server: Server, bodies: list[Path], clients: int) -> float:
    """POST the bodies from `clients` threads at once; returns the wall time. Every answer must be 200."""
    os.sync()
    failures: list[str] = []
    shares = [bodies[n::clients] for n in range(clients)]

    def send(share: list[Path]) -> None:
        session = requests.Session()
        for body in share:
            with open(body, "rb") as stream:
                response = session.post(
                    f"{server.url}/studies",
                    data=stream,
                    headers={**server.headers, "Content-Type": STOW_TYPE, "Accept": "application/dicom+json"},
                    timeout=600,
                )
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text[:300]}")

    threads = [threading.Thread(target=send, args=(share,)) for share in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(1800)
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"STOW-RS to {server.name} failed: {failures[:3]}")
    return elapsed


def retrieve(server: Server, study: str) -> int:
    """WADO-RS retrieve study, streamed; returns the bytes received."""
    headers = {**server.headers, "Accept": RETRIEVE_ACCEPT}
    received = 0
    with requests.get(f"{server.url}/studies/{study}", headers=headers, stream=True, timeout=600) as response:
        response.raise_for_status()
        for chunk in response.iter_content(MB):
            received += len(chunk)
    return received


def wado(server: Server, study: str, repeat: int) -> tuple[float, int]:
    """(median MB/s, bytes of one retrieve)."""
    rates, size = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        size = retrieve(server, study)
        rates.append(size / MB / (time.perf_counter() - started))
    return statistics.median(rates), size


# -- main ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--per-study", type=int, default=100)
    parser.add_argument("--orthanc-studies", type=int, default=None, help="how many of them Orthanc gets (all)")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--stow-clients", default="1,4", help="the STOW-RS cells: concurrent clients, comma-separated")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument(
        "--only", action="append", choices=["qido", "stow", "wado"], help="measure only these (repeatable; all)"
    )
    args = parser.parse_args()
    if args.quick:
        args.studies, args.per_study, args.orthanc_studies, args.slices, args.queries = 100, 20, None, 40, 10
    args.orthanc_studies = min(args.orthanc_studies or args.studies, args.studies)

    work = args.work = Path(tempfile.mkdtemp(prefix="dicomweb-bench-", dir=os.environ.get("BENCH_TMPDIR")))
    isthmus, orthanc = Isthmus("Isthmus", work / "isthmus"), Orthanc("Orthanc", work / "orthanc")
    isthmus.base.mkdir()
    orthanc.base.mkdir()
    load_before = os.getloadavg()
    try:
        run(args, work, isthmus, orthanc, load_before)
    finally:
        isthmus.stop()
        orthanc.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path, isthmus: Isthmus, orthanc: Orthanc, load_before) -> None:
    print(f"preparing: Isthmus index {args.studies} x {args.per_study}, Orthanc {args.orthanc_studies} studies ...")
    index_s = isthmus.prepare(args.studies, args.per_study)
    isthmus.start()
    orthanc.start()
    folders = write_orthanc_files(work / "orthanc-files", args.orthanc_studies, args.per_study, parts=2)
    orthanc_s = orthanc.load(folders)
    shutil.rmtree(work / "orthanc-files")
    print(f"  Isthmus: {isthmus.instances} instances indexed in bulk in {index_s:.1f} s")
    print(f"  Orthanc: {orthanc.instances} instances stored by storescu in {orthanc_s:.1f} s")

    only = set(args.only or ["qido", "stow", "wado"])
    rows = qido_rows(args, isthmus, orthanc) if "qido" in only else []
    rows += stow_rows(args, work, isthmus, orthanc) if "stow" in only else []
    rows += [wado_row(args, isthmus, orthanc)] if "wado" in only else []
    print()
    print(
        f"| measure | Isthmus ({isthmus.instances} indexed) | Orthanc ({orthanc.instances} stored) | Isthmus faster by |"
    )
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print("QIDO: median / p95 (studies answered), ratio of medians; STOW and WADO: median of --repeat runs")
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)")


def qido_rows(args, isthmus: Isthmus, orthanc: Orthanc) -> list[tuple[str, ...]]:
    rows = []
    for name, query in queries(args.orthanc_studies).items():
        medians, cells = [], []
        for server in (isthmus, orthanc):
            median, p95, answered = latency(server, query, args.queries)
            medians.append(median)
            cells.append(f"{median:.1f} / {p95:.1f} ms ({answered})")
        rows.append((f"QIDO-RS {name}", *cells, f"{medians[1] / medians[0]:.2f}x"))
    return rows


def stow_rows(args, work: Path, isthmus: Isthmus, orthanc: Orthanc) -> list[tuple[str, ...]]:
    """Each cell --repeat times with a new study each time (no duplicates), the server going first alternating."""
    rows = []
    for clients in [int(number) for number in args.stow_clients.split(",")]:
        rates: dict[str, list[float]] = {"Isthmus": [], "Orthanc": []}
        cpu: dict[str, float] = {"Isthmus": 0.0, "Orthanc": 0.0}
        for attempt in range(args.repeat):
            _study, bodies = write_stow_bodies(work / f"stow{clients}-{attempt}", args.slices, 2)
            order = (isthmus, orthanc) if attempt % 2 == 0 else (orthanc, isthmus)
            for server in order:
                before = cpu_seconds(server.process.pid)
                rates[server.name].append(args.slices / stow(server, bodies, clients))
                cpu[server.name] += cpu_seconds(server.process.pid) - before
            shutil.rmtree(bodies[0].parent)
        isthmus_rate, orthanc_rate = statistics.median(rates["Isthmus"]), statistics.median(rates["Orthanc"])
        per_instance = {name: seconds * 1000 / (args.slices * args.repeat) for name, seconds in cpu.items()}
        print(
            f"  STOW-RS {clients} client(s): server CPU per instance, Isthmus {per_instance['Isthmus']:.2f} ms,"
            f" Orthanc {per_instance['Orthanc']:.2f} ms"
        )
        rows.append(
            (f"STOW-RS {clients} client(s), instances/s", f"{isthmus_rate:.1f}", f"{orthanc_rate:.1f}",
             f"{isthmus_rate / orthanc_rate:.2f}x")
        )  # fmt: skip
    return rows


def wado_row(args, isthmus: Isthmus, orthanc: Orthanc) -> tuple[str, ...]:
    """A --slices study stored in both by STOW-RS (not timed), then retrieved whole --repeat times."""
    study, bodies = write_stow_bodies(args.work / "wado", args.slices, 1)
    for server in (isthmus, orthanc):
        stow(server, bodies, 1)
    rates = {}
    for server in (isthmus, orthanc):
        rates[server.name], size = wado(server, study, args.repeat)
    return (
        f"WADO-RS study of {args.slices} slices ({size / MB:.0f} MB), MB/s",
        f"{rates['Isthmus']:.1f}",
        f"{rates['Orthanc']:.1f}",
        f"{rates['Isthmus'] / rates['Orthanc']:.2f}x",
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--load-index":
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        load_index(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
