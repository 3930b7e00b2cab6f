"""MWL C-FIND latency: Isthmus (database matching) against dcmtk wlmscpfs and Orthanc's worklist plugin.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/isthmus_mwl_bench \\
        .venv/bin/python bench/mwl_bench.py --steps 10000 --queries 210

Prints a table: median and p95 of one C-FIND (request to final response, on
an open association, pynetdicom SCU for all three) for three typical queries.
wlmscpfs and Orthanc (/usr/sbin/Orthanc with libModalityWorklists) serve the
same worklist from one folder of .wl files; each must give the same number of
answers as Isthmus for every query, or the run exits non-zero.
The database named by DATABASE_URL is emptied of worklist rows and refilled.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ISTHMUS_DATA_DIR", tempfile.mkdtemp(prefix="isthmus-bench-"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
os.environ.setdefault("TCP_NODELAY", "1")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from ports import free_port, wait_for_port  # noqa: E402  (bench/ is sys.path[0])
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ImplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import ModalityWorklistInformationFind  # noqa: E402

from gateway.dimse.sockets import set_nodelay  # noqa: E402
from worklist.models import Order, Patient, ScheduledStep  # noqa: E402

STATIONS = [f"STATION{n:02d}" for n in range(20)]
MODALITIES = ["CT", "MR", "US", "CR"]
DAYS = [f"202403{day:02d}" for day in range(1, 31)]
BATCH = 5000
WLMSCPFS = "/usr/bin/wlmscpfs"
ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_WORKLISTS = "/usr/share/orthanc/plugins/libModalityWorklists.so"


def step_values(number: int) -> dict:
    rng = random.Random(number)
    return {
        "patient_id": f"PID{number:07d}",
        "patient_name": f"NAME{number:07d}^GIVEN",
        "accession": f"A{number:07d}",
        "station": STATIONS[number % len(STATIONS)],
        "modality": MODALITIES[number % len(MODALITIES)],
        "date": DAYS[(number // len(STATIONS)) % len(DAYS)],
        "time": f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}00",
        "study_uid": f"1.2.826.0.1.3680043.8.498.{number + 1}",
    }


def fill_database(count: int) -> None:
    ScheduledStep.objects.all().delete()
    Order.objects.all().delete()
    Patient.objects.all().delete()
    for start in range(0, count, BATCH):
        values = [step_values(n) for n in range(start, min(count, start + BATCH))]
        patients = Patient.objects.bulk_create(
            Patient(patient_id=v["patient_id"], patient_name=v["patient_name"]) for v in values
        )
        orders = Order.objects.bulk_create(
            Order(
                patient=p,
                accession_number=v["accession"],
                requested_procedure_id=v["accession"],
                study_instance_uid=v["study_uid"],
            )  # fmt: skip
            for p, v in zip(patients, values, strict=True)
        )
        ScheduledStep.objects.bulk_create(
            ScheduledStep(
                order=o,
                step_id=v["accession"],
                station_ae_title=v["station"],
                modality=v["modality"],
                start_date=v["date"],
                start_time=v["time"],
            )  # fmt: skip
            for o, v in zip(orders, values, strict=True)
        )
    # What autovacuum does within a minute of a bulk load in production; without it the
    # planner still sees the empty tables of the migration and picks sequential scans.
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


def write_wl_files(count: int, folder: Path) -> None:
    """The same worklist as dcmtk worklist files (one per step) for wlmscpfs."""
    folder.mkdir(parents=True)
    for number in range(count):
        v = step_values(number)
        ds = Dataset()
        ds.PatientName, ds.PatientID = v["patient_name"], v["patient_id"]
        ds.AccessionNumber, ds.RequestedProcedureID, ds.StudyInstanceUID = (
            v["accession"],
            v["accession"],
            v["study_uid"],
        )
        item = Dataset()
        item.ScheduledStationAETitle, item.Modality = v["station"], v["modality"]
        item.ScheduledProcedureStepStartDate, item.ScheduledProcedureStepStartTime = v["date"], v["time"]
        item.ScheduledProcedureStepID = v["accession"]
        ds.ScheduledProcedureStepSequence = [item]
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ModalityWorklistInformationFind
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"{number:07d}.wl", enforce_file_format=True)
    (folder / "lockfile").touch()


def queries(count: int, steps: int) -> list[tuple[str, Dataset]]:
    """Typical modality queries: its station today, a name with a wildcard, an accession number."""
    rng = random.Random(42)
    made = []
    for index in range(count):
        v = step_values(rng.randrange(steps))
        query = Dataset()
        query.PatientName, query.PatientID, query.AccessionNumber, query.StudyInstanceUID = None, None, None, None
        item = Dataset()
        item.ScheduledStationAETitle, item.ScheduledProcedureStepStartDate = None, None
        item.ScheduledProcedureStepStartTime, item.Modality, item.ScheduledProcedureStepID = None, None, None
        kind = ("station-today", "name-wildcard", "accession")[index % 3]
        if kind == "station-today":
            item.ScheduledStationAETitle, item.ScheduledProcedureStepStartDate = v["station"], v["date"]
        elif kind == "name-wildcard":
            query.PatientName = v["patient_name"][:10] + "*"  # NAME001234*: ten patients
        else:
            query.AccessionNumber = v["accession"]
        query.ScheduledProcedureStepSequence = [item]
        made.append((kind, query))
    return made


def measure(port: int, called: str, workload: list[tuple[str, Dataset]]) -> list[tuple[str, float, int]]:
    """(query kind, milliseconds, answers) for each query, in workload order."""
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    # Without TCP_NODELAY, Nagle and delayed ACKs add ~40 ms to every exchange.
    assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    assert assoc.is_established, f"no association with {called}"
    results = []
    try:
        for kind, query in workload:
            started = time.perf_counter()
            found = sum(1 for status, _ in assoc.send_c_find(query, ModalityWorklistInformationFind)
                        if status and status.Status in (0xFF00, 0xFF01))  # fmt: skip
            results.append((kind, (time.perf_counter() - started) * 1000, found))
    finally:
        assoc.release()
    return results


def report(name: str, steps: int, results: list[tuple[str, float, int]]) -> None:
    """One row per query kind, then one over the whole mix (what a modality's queries see overall)."""
    for kind in [*dict.fromkeys(kind for kind, _, _ in results), "all kinds"]:
        values = sorted(ms for each, ms, _ in results if kind in (each, "all kinds"))
        answers = [found for each, _, found in results if kind in (each, "all kinds")]
        p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
        print(f"| {name} | {steps:,} | {kind} | {len(values)} | {statistics.mean(answers):.1f} | "
              f"{statistics.median(values):.1f} | {p95:.1f} |", flush=True)  # fmt: skip


def differences(name: str, results: list[tuple[str, float, int]], reference: list[tuple[str, float, int]]) -> int:
    """Queries where a server's answer count differs from Isthmus's (same workload order)."""
    pairs = zip(results, reference[: len(results)], strict=True)
    differ = [(index, ours[2], theirs[2]) for index, (theirs, ours) in enumerate(pairs) if theirs[2] != ours[2]]
    for index, ref, res in differ[:5]:
        print(f"{name}: query {index} gave {res} answers, Isthmus {ref}", file=sys.stderr)
    return len(differ)


@contextmanager
def running(command: list[str], log: Path, ports: list[int]) -> Iterator[None]:
    """A reference server, with TCP_NODELAY like our sockets, until the block ends."""
    with open(log, "ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=output, cwd=log.parent,
                                   env={**os.environ, "TCP_NODELAY": "1"})  # fmt: skip
        try:
            for port in ports:
                wait_for_port(port, process)
            yield
        except Exception:
            print(f"{command[0]} log ends:\n" + log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wlmscpfs(work: Path) -> tuple[list[str], int, list[int]]:
    """dcmtk wlmscpfs serving work/WLMSCP, re-reading the files for every query (-dfr)."""
    port = free_port()
    return [WLMSCPFS, "-dfr", "-dfp", str(work), str(port)], port, [port]


def orthanc(work: Path) -> tuple[list[str], int, list[int]]:
    """Orthanc with its ModalityWorklists plugin serving the same folder of .wl files."""
    port, http = free_port(), free_port()
    config = {
        "Name": "mwl-bench",
        "StorageDirectory": str(work / "orthanc-storage"),
        "IndexDirectory": str(work / "orthanc-storage"),
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "HttpPort": http,
        "DicomCheckCalledAet": False,
        # Orthanc 1.10.1 rejects a worklist C-FIND from an AE not in DicomModalities, even with
        # DicomAlwaysAllowFind ("Rejected FindWorklist request"): register the bench's calling AE.
        "DicomModalities": {"bench": {"AET": "BENCH", "Host": "127.0.0.1", "Port": 104, "AllowFindWorklist": True}},
        "DicomAlwaysAllowEcho": True,
        "DicomScpTimeout": 120,
        "RemoteAccessAllowed": True,
        "AuthenticationEnabled": False,
        "Plugins": [ORTHANC_WORKLISTS],
        "Worklists": {"Enable": True, "Database": str(work / "WLMSCP")},
    }
    (work / "orthanc.json").write_text(json.dumps(config, indent=2))
    return [ORTHANC, str(work / "orthanc.json")], port, [http, port]


def compare(name: str, server: Callable, called: str, work: Path, workload: list, reference: list, steps: int) -> int:
    """Time a reference server on the first queries of the workload; the count of answer mismatches."""
    command, port, ports = server(work)
    with running(command, work / f"{called.lower()}.log", ports):
        results = measure(port, called, workload)
    report(name, steps, results)
    return differences(name, results, reference)


@contextmanager
def isthmus_listener() -> Iterator[int]:
    """`manage.py dimse` in its own process, as deployed (in-process, it would share the bench's GIL)."""
    port = free_port()
    db = connection.settings_dict
    database_url = (
        f"sqlite:///{db['NAME']}"
        if connection.vendor == "sqlite"
        else f"postgres://{db['USER']}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"
    )
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ISTHMUS_REQUIRE_KNOWN_AE": "false",
        "ISTHMUS_WORKLIST_LIMIT": "100000",
        "ISTHMUS_DIMSE_PROCESSES": "1",
        "ISTHMUS_LOG_LEVEL": "warning",
        "TCP_NODELAY": "1",
    }
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "dimse", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=ROOT,
    )
    try:
        wait_for_port(port, process)
        yield port
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=210)
    parser.add_argument("--wlmscpfs-queries", type=int, default=None, help="fewer queries for wlmscpfs (slow)")
    parser.add_argument("--orthanc-queries", type=int, default=None, help="fewer queries for Orthanc (slow)")
    parser.add_argument("--skip-wlmscpfs", action="store_true")
    parser.add_argument("--skip-orthanc", action="store_true")
    args = parser.parse_args()
    from django.conf import settings

    settings.REQUIRE_KNOWN_AE = False
    settings.WORKLIST_LIMIT = 100_000
    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    fill_database(args.steps)
    print(f"database filled with {args.steps:,} steps in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    workload = queries(args.queries, args.steps)
    print("| server | steps | query | n | answers/query | median ms | p95 ms |")
    print("|---|---|---|---|---|---|---|")
    with isthmus_listener() as port:
        reference = measure(port, settings.AE_TITLE, workload)
    report("Isthmus " + settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1], args.steps, reference)
    others = [("dcmtk wlmscpfs", wlmscpfs, "WLMSCP", args.wlmscpfs_queries, args.skip_wlmscpfs),
              ("Orthanc worklists", orthanc, "ORTHANC", args.orthanc_queries, args.skip_orthanc)]  # fmt: skip
    if all(skip for *_, skip in others):
        return
    work = Path(tempfile.mkdtemp(prefix="wlm-"))
    mismatches = 0
    try:
        write_wl_files(args.steps, work / "WLMSCP")
        for name, server, called, count, skip in others:
            if not skip:
                mismatches += compare(name, server, called, work, workload[:count], reference, args.steps)
    finally:
        shutil.rmtree(work)
    if mismatches:
        sys.exit(f"{mismatches} queries answered differently from Isthmus")


if __name__ == "__main__":
    main()
