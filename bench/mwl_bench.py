"""MWL C-FIND latency: Isthmus (database matching) against dcmtk wlmscpfs (the same worklist as .wl files).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/isthmus_mwl_bench \\
        .venv/bin/python bench/mwl_bench.py --steps 10000 --queries 200

Prints a table: median and p95 of one C-FIND (request to final response, on
an open association, pynetdicom SCU for both) for three typical queries.
The database named by DATABASE_URL is emptied of worklist rows and refilled.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ISTHMUS_DATA_DIR", tempfile.mkdtemp(prefix="isthmus-bench-"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
os.environ.setdefault("TCP_NODELAY", "1")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ImplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import ModalityWorklistInformationFind  # noqa: E402

from gateway.dimse.server import Listener  # noqa: E402
from gateway.dimse.sockets import set_nodelay  # noqa: E402
from worklist.models import Order, Patient, ScheduledStep  # noqa: E402

STATIONS = [f"STATION{n:02d}" for n in range(20)]
MODALITIES = ["CT", "MR", "US", "CR"]
DAYS = [f"202403{day:02d}" for day in range(1, 31)]
BATCH = 5000


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


def measure(port: int, called: str, workload: list[tuple[str, Dataset]]) -> dict[str, list[float]]:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    # Without TCP_NODELAY, Nagle and delayed ACKs add ~40 ms to every exchange.
    assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    assert assoc.is_established, f"no association with {called}"
    timings: dict[str, list[float]] = {}
    answers: dict[str, int] = {}
    try:
        for kind, query in workload:
            started = time.perf_counter()
            found = sum(1 for status, _ in assoc.send_c_find(query, ModalityWorklistInformationFind)
                        if status and status.Status in (0xFF00, 0xFF01))  # fmt: skip
            timings.setdefault(kind, []).append((time.perf_counter() - started) * 1000)
            answers[kind] = answers.get(kind, 0) + found
    finally:
        assoc.release()
    return {kind: (values, answers[kind] / len(values)) for kind, values in timings.items()}


def report(name: str, steps: int, results: dict) -> None:
    for kind, (values, mean_answers) in results.items():
        values = sorted(values)
        p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
        print(f"| {name} | {steps:,} | {kind} | {len(values)} | {mean_answers:.1f} | "
              f"{statistics.median(values):.1f} | {p95:.1f} |")  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=210)
    parser.add_argument("--wlmscpfs-queries", type=int, default=None, help="fewer queries for wlmscpfs (slow)")
    parser.add_argument("--skip-wlmscpfs", action="store_true")
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
    listener = Listener("127.0.0.1", 0)
    listener.start()
    try:
        report("Isthmus " + settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1], args.steps,
               measure(listener.port, settings.AE_TITLE, workload))  # fmt: skip
    finally:
        listener.stop(grace=5)
    if args.skip_wlmscpfs:
        return
    folder = Path(tempfile.mkdtemp(prefix="wlm-"))
    try:
        write_wl_files(args.steps, folder / "WLMSCP")
        port = free_port()
        process = subprocess.Popen(["/usr/bin/wlmscpfs", "-dfr", "-dfp", str(folder), str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"})  # fmt: skip
        time.sleep(1)
        try:
            report("dcmtk wlmscpfs", args.steps, measure(port, "WLMSCP", workload[: args.wlmscpfs_queries]))
        finally:
            process.terminate()
            process.wait(10)
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
