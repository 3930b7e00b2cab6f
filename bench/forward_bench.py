"""Forwarding: instances pushed to Isthmus and relayed to an Orthanc, against Orthanc relaying to an Orthanc.

    .venv/bin/python bench/forward_bench.py [--count N] [--embedded] [--quick] [--keep]

Two cells, C-STORE and STOW-RS. In each, the same N CT slices (~0.5 MB,
512x512x16 bit, one study) are sent once by dcmtk storescu (one association,
TCP_NODELAY=1) to

- Isthmus: `manage.py dimse` plus one `celery -A gateway worker --beat`
  (concurrency 2), on PostgreSQL database `isthmus_fwdbench` with the Redis
  broker on db 9 (recreated and flushed at start), or with `--embedded` on
  SQLite and the filesystem queue. Its configuration (nodes, two destinations,
  rules choosing by Study Description) is loaded with `manage.py import_config`,
  as a user would. Destinations use the defaults (2 concurrent batches of 50).
- Orthanc as a router: its Lua `OnStoredInstance` forwards each instance as it
  is stored, with `SendToModality` (C-STORE cell) or an asynchronous job of the
  DICOMweb plugin's `/dicom-web/servers/target/stow` (STOW-RS cell; Orthanc runs
  2 jobs at once by default). A third STOW-RS run is Orthanc's other idiom:
  `OnStableStudy` (StableAge 1 s) sends the whole study in one STOW-RS job.

Each relays to its own target Orthanc (DICOMweb plugin loaded). Per instance
we take the time storescu logs "Received Store Response (Success)" for it, and
the time it shows up in the target's /changes feed, polled every 50 ms (so
arrival times are late by up to one poll period plus the poll's own time).
Reported: storescu's wall time, the end-to-end time (storescu start to the last
arrival at the target), forwarded instances/s over that span (sustained rate),
and p50/p95/max of the per-instance latency (success at the first hop -> arrival).
The two routers run one after the other on the same machine, not at once.
Each cell then has a "backlog drain" run for Isthmus: the destination is
paused (as the admin action does) while a fresh copy of the study arrives,
then resumed; its rate is over resume -> last arrival, i.e. delivery alone,
not bounded by the ingest rate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ports import free_port, start_orthanc, wait_for_port  # bench/ is sys.path[0]
from pydicom.uid import generate_uid
from store_bench import image, stop

ROOT = Path(__file__).resolve().parent.parent
STORESCU = "/usr/bin/storescu"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
CALLING = "BENCHSCU"
PG_ADMIN = "postgres://postgres@127.0.0.1:5432/postgres"
PG_NAME = "isthmus_fwdbench"
REDIS_URL = "redis://127.0.0.1:6379/9"
CELLS = {"C-STORE": "FWD-DIMSE", "STOW-RS": "FWD-STOW"}  # cell -> Study Description the rules match
DESTINATIONS = {"C-STORE": "orthanc-dimse", "STOW-RS": "orthanc-stow"}
POLL = 0.05

LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RequestOrigin'] == 'Lua' then return end
  if tags['StudyDescription'] == 'FWD-STOW' then
    RestApiPost('/dicom-web/servers/target/stow', '{"Resources": ["' .. instanceId .. '"], "Synchronous": false}')
  elseif tags['StudyDescription'] == 'FWD-DIMSE' then
    SendToModality(instanceId, 'target')
  end
end

function OnStableStudy(studyId, tags, metadata)
  if tags['StudyDescription'] == 'FWD-STOW-STABLE' then
    RestApiPost('/dicom-web/servers/target/stow', '{"Resources": ["' .. studyId .. '"]}')
  end
end
"""
STABLE_AGE = 1  # seconds without a new instance before Orthanc calls a study stable


# -- files -------------------------------------------------------------------


def orthanc_id(patient_id: str, study: str, series: str, sop: str) -> str:
    """Orthanc's public ID of an instance: SHA-1 of its identifiers, in groups of 8 hex digits."""
    digest = hashlib.sha1(f"{patient_id}|{study}|{series}|{sop}".encode()).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


def write_study(folder: Path, count: int, description: str) -> dict[str, str]:
    """`count` 0.5 MB CT slices of one new study; returns {file name: Orthanc instance ID}."""
    folder.mkdir(parents=True)
    dataset = image(512)
    dataset.StudyDescription = description
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.PixelData = bytes(range(256)) * (512 * 512 * 2 // 256)
    dataset["PixelData"].VR = "OW"
    ids = {}
    for number in range(count):
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.InstanceNumber = number + 1
        name = f"{number:06d}.dcm"
        dataset.save_as(folder / name, enforce_file_format=True)
        ids[name] = orthanc_id(
            dataset.PatientID, dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID
        )
    return ids


# -- Orthanc -----------------------------------------------------------------


@dataclass
class Orthanc:
    name: str
    ae_title: str
    base: Path
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, **extra) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": self.name,
            "StorageDirectory": str(self.base / "storage"),
            "IndexDirectory": str(self.base / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", **extra.pop("DicomWeb", {})},
            **extra,
        }
        self.process = start_orthanc(self.base, config, self.http_port, self.dicom_port)

    def get(self, path: str) -> dict | list:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as answer:
            return json.load(answer)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


class Arrivals(threading.Thread):
    """Polls a target Orthanc's /changes feed; the time each new instance was first seen, by Orthanc ID."""

    def __init__(self, target: Orthanc) -> None:
        super().__init__(daemon=True)
        self.target, self.seen, self.running = target, {}, True
        self.since = target.get("/changes?last")["Last"]

    def run(self) -> None:
        while self.running:
            try:
                answer = self.target.get(f"/changes?since={self.since}&limit=1000")
            except OSError as exc:  # a slow answer on a busy machine: poll again
                print(f"  /changes poll failed: {exc}", flush=True)
                time.sleep(POLL)
                continue
            now = time.time()
            for change in answer["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    self.seen.setdefault(change["ID"], now)
            self.since = answer["Last"]
            if answer["Done"]:
                time.sleep(POLL)

    def wait_for(self, ids: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ids <= self.seen.keys():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(ids - self.seen.keys())} of {len(ids)} instances never reached the target")
            time.sleep(0.2)
        self.running = False
        self.join(5)


# -- Isthmus -----------------------------------------------------------------


class Isthmus:
    """`manage.py dimse` and a celery worker (with beat), sharing one data dir, database and broker."""

    def __init__(self, base: Path, embedded: bool) -> None:
        self.base, self.embedded = base, embedded
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []
        base.mkdir(parents=True)

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("DATABASE_URL", "CELERY_"))}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(ISTHMUS_DATA_DIR=str(self.base), ISTHMUS_LOG_LEVEL="warning", ISTHMUS_MIN_FREE_MB="0",
                   TCP_NODELAY="1", PYTHONUNBUFFERED="1")  # fmt: skip
        if not self.embedded:
            env.update(DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{PG_NAME}", CELERY_BROKER_URL=REDIS_URL)
        return env

    def manage(self, *args: str) -> str:
        result = subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], env=self.env(), cwd=ROOT,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)}: {result.stderr[-2000:]}")
        return result.stdout

    def reset_engines(self) -> None:
        if self.embedded:
            return
        import psycopg
        import redis

        with psycopg.connect(PG_ADMIN, autocommit=True) as db:
            db.execute(f"DROP DATABASE IF EXISTS {PG_NAME} WITH (FORCE)")
            db.execute(f"CREATE DATABASE {PG_NAME}")
        redis.Redis.from_url(REDIS_URL).flushdb()

    def start(self, config: str) -> None:
        self.reset_engines()
        self.manage("migrate", "--verbosity", "0")
        (self.base / "isthmus.yaml").write_text(config)
        print(self.manage("import_config", str(self.base / "isthmus.yaml")).strip().splitlines()[-1], flush=True)
        log = open(self.base / "processes.log", "ab")  # noqa: SIM115 - the children keep it
        python = [sys.executable]
        for command in (
            [*python, str(ROOT / "manage.py"), "dimse", "--host", "127.0.0.1", "--port", str(self.port)],
            [*python, "-m", "celery", "-A", "gateway", "worker", "--beat", "--concurrency", "2",
             "--loglevel", "WARNING", "--hostname", "fwdbench@%h"],
        ):  # fmt: skip
            self.processes.append(subprocess.Popen(command, env=self.env(), cwd=ROOT, stdout=log, stderr=log))
        wait_for_port(self.port, self.processes[0])
        self.wait_for_worker()

    def wait_for_worker(self, timeout: float = 90.0) -> None:
        """Until the worker's beat-driven heartbeat is in the database: the worker consumes tasks."""
        deadline = time.monotonic() + timeout
        while "worker" not in self.manage("shell", "-c", _HEARTBEATS):
            if time.monotonic() > deadline or self.processes[1].poll() is not None:
                raise RuntimeError(f"the celery worker did not report in; see {self.base / 'processes.log'}")
            time.sleep(1)

    def set_paused(self, destination: str, paused: bool) -> float:
        """Pause or resume a destination as the admin action does; returns when it took effect (epoch s)."""
        code = (
            "import time; from routing import services; from routing.models import Destination; "
            f"services.set_paused(Destination.objects.get(name={destination!r}), {paused}); print(time.time())"
        )
        return float(self.manage("shell", "-c", code).split()[-1])

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop(process)
        self.processes = []


_HEARTBEATS = "from gateway.models import Heartbeat; print(list(Heartbeat.objects.values_list('kind', flat=True)))"


def isthmus_config(target: Orthanc) -> str:
    return f"""
nodes:
  - {{name: bench-scu, ae_title: {CALLING}, host: 127.0.0.1, port: 104, allowed_out: false}}
  - {{name: target, ae_title: {target.ae_title}, host: 127.0.0.1, port: {target.dicom_port}, allowed_in: false}}
destinations:
  - {{name: orthanc-dimse, kind: dimse, node: target}}
  - {{name: orthanc-stow, kind: dicomweb, url: "{target.url}/dicom-web"}}
rules:
  - {{name: dimse-cell, conditions: {{StudyDescription: {CELLS["C-STORE"]}}}, destinations: [orthanc-dimse]}}
  - {{name: stow-cell, conditions: {{StudyDescription: {CELLS["STOW-RS"]}}}, destinations: [orthanc-stow]}}
"""


# -- one run -----------------------------------------------------------------

SENDING = re.compile(r"Sending file: (\S+)")
SUCCESS = re.compile(r"Received Store Response \(Success")


def push(port: int, called: str, folder: Path) -> tuple[float, float, dict[str, float]]:
    """storescu -v of a folder; (start, end, {file name: time its success status arrived})."""
    started = time.time()
    client = subprocess.Popen(
        [STORESCU, "-v", "-aet", CALLING, "-aec", called, "-to", "60", "+sd", "127.0.0.1", str(port), str(folder)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    acknowledged, current, tail = {}, None, []
    for line in client.stdout:
        tail = (tail + [line])[-20:]
        if sending := SENDING.search(line):
            current = Path(sending.group(1)).name
        elif SUCCESS.search(line) and current:
            acknowledged[current] = time.time()
    client.wait(600)
    if client.returncode != 0:
        raise RuntimeError(f"storescu to {called} exited {client.returncode}: {''.join(tail)}")
    return started, time.time(), acknowledged


@dataclass
class Result:
    router: str
    cell: str
    count: int
    push_seconds: float
    total_seconds: float
    latencies: list[float]

    def row(self) -> str:
        rate = self.count / self.total_seconds
        if self.latencies:
            q = statistics.quantiles(self.latencies, n=100)
            latency = f"{q[49]:.2f} | {q[94]:.2f} | {max(self.latencies):.2f}"
        else:
            latency = "– | – | –"
        return (f"| {self.cell} | {self.router} | {self.count} | {self.push_seconds:.1f} | {self.total_seconds:.1f} "
                f"| {rate:.1f} | {latency} |")  # fmt: skip


def relay(router: str, cell: str, port: int, called: str, target: Orthanc, folder: Path, ids: dict) -> Result:
    arrivals = Arrivals(target)
    arrivals.start()
    started, ended, acknowledged = push(port, called, folder)
    if len(acknowledged) != len(ids):
        raise RuntimeError(f"{router}: {len(acknowledged)} of {len(ids)} C-STOREs acknowledged")
    arrivals.wait_for(set(ids.values()), timeout=max(300.0, len(ids)))
    latencies = [arrivals.seen[ids[name]] - at for name, at in acknowledged.items()]
    last = max(arrivals.seen[orthanc] for orthanc in ids.values())
    result = Result(router, cell, len(ids), ended - started, last - started, latencies)
    print(f"  {result.row()}", flush=True)
    return result


def warm_up(work: Path, isthmus: Isthmus, router: Orthanc, isthmus_target: Orthanc, orthanc_target: Orthanc) -> None:
    """A few instances through every path first, so no cell pays for cold caches, imports or connections."""
    for description in CELLS.values():
        folder = work / "warm-up"
        ids = write_study(folder, 10, description)
        for port, called, target in ((isthmus.port, "ISTHMUS", isthmus_target), (router.dicom_port, "ROUTER",
                                                                                  orthanc_target)):  # fmt: skip
            arrivals = Arrivals(target)
            arrivals.start()
            push(port, called, folder)
            arrivals.wait_for(set(ids.values()), timeout=120)
        shutil.rmtree(folder)


def drain(cell: str, destination: str, isthmus: Isthmus, target: Orthanc, folder: Path, ids: dict) -> Result:
    """Isthmus's delivery rate alone: the destination paused while the study arrives, then resumed.

    End-to-end is from the resume to the last arrival, so the rate is the backlog's drain rate.
    """
    isthmus.set_paused(destination, True)
    arrivals = Arrivals(target)
    arrivals.start()
    started, ended, acknowledged = push(isthmus.port, "ISTHMUS", folder)
    if len(acknowledged) != len(ids):
        raise RuntimeError(f"backlog drain: {len(acknowledged)} of {len(ids)} C-STOREs acknowledged")
    if arrivals.seen.keys() & set(ids.values()):
        raise RuntimeError("a paused destination received instances")
    resumed = isthmus.set_paused(destination, False)
    arrivals.wait_for(set(ids.values()), timeout=max(300.0, len(ids)))
    last = max(arrivals.seen[orthanc] for orthanc in ids.values())
    result = Result("Isthmus, backlog drain", cell, len(ids), ended - started, last - resumed, [])
    print(f"  {result.row()}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="instances per cell (default 1000)")
    parser.add_argument("--embedded", action="store_true", help="SQLite and the filesystem queue, not PostgreSQL+Redis")
    parser.add_argument("--quick", action="store_true", help="--count 100: a smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, stores)")
    args = parser.parse_args()
    count = 100 if args.quick else args.count
    work = Path(tempfile.mkdtemp(prefix="isthmus-forward-bench-", dir=os.environ.get("BENCH_TMPDIR")))
    isthmus_target = Orthanc("isthmus-target", "TARGETI", work / "isthmus-target")
    orthanc_target = Orthanc("orthanc-target", "TARGETO", work / "orthanc-target")
    router = Orthanc("orthanc-router", "ROUTER", work / "orthanc-router")
    isthmus = Isthmus(work / "isthmus", args.embedded)
    engines = "SQLite + filesystem queue" if args.embedded else f"PostgreSQL {PG_NAME} + Redis db 9"
    print(f"nproc {os.cpu_count()}, load {os.getloadavg()}, {count} instances per cell, Isthmus on {engines}")
    results = []
    try:
        isthmus_target.start()
        orthanc_target.start()
        (work / "route.lua").write_text(LUA)
        router.start(
            LuaScripts=[str(work / "route.lua")],
            StableAge=STABLE_AGE,
            DicomModalities={"target": [orthanc_target.ae_title, "127.0.0.1", orthanc_target.dicom_port]},
            DicomWeb={"Servers": {"target": [f"{orthanc_target.url}/dicom-web/"]}},
        )
        isthmus.start(isthmus_config(isthmus_target))
        warm_up(work, isthmus, router, isthmus_target, orthanc_target)
        for number, (cell, description) in enumerate(CELLS.items()):
            folder = work / f"cell-{number}"
            ids = write_study(folder, count, description)
            os.sync()
            runs = [("Isthmus", isthmus.port, "ISTHMUS", isthmus_target), ("Orthanc", router.dicom_port, "ROUTER",
                                                                          orthanc_target)]  # fmt: skip
            for name, port, called, target in runs if number % 2 == 0 else runs[::-1]:
                results.append(relay(name, cell, port, called, target, folder, ids))
            shutil.rmtree(folder)
            ids = write_study(folder, count, description)  # new UIDs: the target must not have them yet
            os.sync()
            results.append(drain(cell, DESTINATIONS[cell], isthmus, isthmus_target, folder, ids))
            shutil.rmtree(folder)
        # Orthanc's other way to STOW: the whole study once it is stable (StableAge), one request.
        ids = write_study(work / "stable", count, "FWD-STOW-STABLE")
        os.sync()
        name = f"Orthanc, stable study (StableAge {STABLE_AGE} s)"
        results.append(relay(name, "STOW-RS", router.dicom_port, "ROUTER", orthanc_target, work / "stable", ids))
        load = os.getloadavg()
    finally:
        isthmus.stop()
        for orthanc in (router, orthanc_target, isthmus_target):
            orthanc.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| cell | router | instances | push s | end-to-end s | forwarded inst/s | latency p50 s | p95 s | max s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        print(result.row())
    print(f"\nload average at the end (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
