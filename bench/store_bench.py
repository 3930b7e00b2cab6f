"""C-STORE ingest rate: Isthmus's DIMSE listener against Orthanc, the same files from the same dcmtk storescu.

    .venv/bin/python bench/store_bench.py [--count N] [--repeat R] [--big-mb MB] [--quick] [--keep]
                                          [--bare] [--synchronous full,normal]

Four cells: ~0.5 MB CT slices (512x512x16 bit) and ~8 KB instances, over 1
and 4 parallel associations (4 storescu processes, a quarter of the files
each). Each cell has its own files with fresh UIDs, sent once to each server,
so neither sees a duplicate. Both servers run as they would in production:
Isthmus's `manage.py dimse` on SQLite in its own data dir, Debian's Orthanc
with its default SQLite index and fsync'd storage; everything in one temp dir
on the same disk, TCP_NODELAY=1 everywhere. Wall time covers storescu's whole
run (scanning its files, association, transfers, release), and every cell is
checked afterwards by counting the instances each server indexed.

Every cell runs --repeat times (fresh files each time, the server that goes
first alternating); rates are from the median wall time and the ratio is the
median of the per-run ratios, since this machine is shared and noisy.

Then one multi-frame instance of --big-mb (default 1024) is sent to a freshly
started listener of each server and the listener's peak RSS (VmHWM) reported.
The temp dir is made in $BENCH_TMPDIR if set (it must be on the disk to test).

`--synchronous full,normal` runs one Isthmus listener per SQLite synchronous
mode (ISTHMUS_SQLITE_SYNCHRONOUS), each with its own data dir, their sends
interleaved in every cell, and adds the FULL / NORMAL ratio: the cost of
answering success only after a commit that survives a power cut.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ports import free_port, isthmus_env, start_orthanc, wait_for_port  # bench/ is sys.path[0]
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
STORESCU = "/usr/bin/storescu"
MB = 1 << 20
SIZES = {"CT 0.5 MB": 512, "8 KB": 56}  # rows = columns, 16 bit
CALLING = "BENCHSCU"


# -- test files --------------------------------------------------------------


def image(side: int, frames: int = 1) -> Dataset:
    """A CT-classed image data set without pixel data; UIDs are set per file."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = CTImageStorage
    dataset.SOPClassUID = CTImageStorage
    dataset.PatientName, dataset.PatientID = "Bench^Patient", "BENCH-0001"
    dataset.StudyDate, dataset.StudyTime, dataset.AccessionNumber = "20240301", "101500", "BENCH1"
    dataset.Modality, dataset.SeriesNumber = "CT", 1
    dataset.Rows = dataset.Columns = side
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        dataset.NumberOfFrames = frames
    return dataset


def write_series(folder: Path, side: int, count: int, parts: int) -> list[Path]:
    """`count` instances of one new study/series, dealt into `parts` sub-folders (one per association)."""
    dataset = image(side)
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    pixels = bytes(range(256)) * (side * side * 2 // 256) + bytes(side * side * 2 % 256)
    dataset.PixelData = pixels
    dataset["PixelData"].VR = "OW"
    subfolders = [folder / f"part{n}" for n in range(parts)]
    for subfolder in subfolders:
        subfolder.mkdir(parents=True)
    for number in range(count):
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.InstanceNumber = number + 1
        dataset.save_as(subfolders[number % parts] / f"{number:06d}.dcm", enforce_file_format=True)
    return subfolders


def write_big(path: Path, megabytes: int) -> int:
    """A multi-frame instance of about `megabytes`, streamed to disk (never whole in memory); returns its size."""
    frame = 512 * 512 * 2
    frames = max(1, math.ceil(megabytes * MB / frame))
    dataset = image(512, frames)
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.save_as(path, enforce_file_format=True)
    chunk = bytes(range(256)) * (frame // 256)
    with open(path, "ab") as stream:
        # PS3.5 7.1.2: explicit VR OW: tag, VR, 2 reserved bytes, 4-byte length; Pixel Data is the last element.
        stream.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * frame))
        for _ in range(frames):
            stream.write(chunk)
    return path.stat().st_size


def folder_size(folders: list[Path]) -> int:
    return sum(path.stat().st_size for folder in folders for path in folder.iterdir())


# -- servers -----------------------------------------------------------------


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def peak_rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


@dataclass
class Server:
    """One C-STORE SCP under test, started as its own process."""

    name: str
    called: str
    base: Path
    port: int = field(default_factory=free_port)
    http: int = field(default_factory=free_port)  # Orthanc's REST API, where the instances are counted
    process: subprocess.Popen | None = None

    def start(self) -> None:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


@dataclass
class Isthmus(Server):
    synchronous: str = "full"  # ISTHMUS_SQLITE_SYNCHRONOUS

    def env(self) -> dict[str, str]:
        return isthmus_env(self.base, ISTHMUS_REQUIRE_KNOWN_AE="false", ISTHMUS_SQLITE_SYNCHRONOUS=self.synchronous)

    def start(self) -> None:
        manage = [sys.executable, str(ROOT / "manage.py")]
        if not (self.base / "isthmus.sqlite3").exists():
            subprocess.run([*manage, "migrate", "--verbosity", "0"], env=self.env(), cwd=ROOT, check=True)
        log = open(self.base / "dimse.log", "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            [*manage, "dimse", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env(),
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
        wait_for_port(self.port, self.process)

    def count(self) -> int:
        with sqlite3.connect(self.base / "isthmus.sqlite3", timeout=30) as db:
            return db.execute("SELECT COUNT(*) FROM gateway_instance").fetchone()[0]


class Bare(Server):
    """bench/bare_scp.py: stock pynetdicom receiving to files, nothing else (the ceiling for pynetdicom)."""

    def start(self) -> None:
        (self.base / "out").mkdir(exist_ok=True)
        log = open(self.base / "bare.log", "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "bare_scp.py"), str(self.port), str(self.base / "out")],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=log,
            stderr=log,
        )
        wait_for_port(self.port, self.process)

    def count(self) -> int:
        return sum(1 for name in os.listdir(self.base / "out") if name.endswith(".dcm") and not name.startswith("tmp"))


class Orthanc(Server):
    def start(self) -> None:
        config = {
            "Name": "bench",
            "StorageDirectory": str(self.base / "storage"),
            "IndexDirectory": str(self.base / "index"),
            "DicomAet": self.called,
            "DicomPort": self.port,
            "HttpPort": self.http,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "Plugins": [],
        }
        self.process = start_orthanc(self.base, config, self.http, self.port)

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/statistics", timeout=30) as answer:
            return json.load(answer)["CountInstances"]


# -- sending -----------------------------------------------------------------


def send(server: Server, paths: list[Path]) -> float:
    """One storescu per path (a folder of files or one file), all at once; returns the wall time in seconds."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    os.sync()  # the previous cell's dirty pages must not be flushed on this cell's clock
    started = time.perf_counter()
    clients = [
        subprocess.Popen(
            [
                STORESCU,
                "-aet",
                CALLING,
                "-aec",
                server.called,
                "-to",
                "60",
                "+sd",
                "127.0.0.1",
                str(server.port),
                str(path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for path in paths
    ]
    outputs = [client.communicate(timeout=600)[0] for client in clients]
    elapsed = time.perf_counter() - started
    for client, output in zip(clients, outputs, strict=True):
        if client.returncode != 0:
            raise RuntimeError(f"storescu to {server.name} exited {client.returncode}: {output.decode()[-2000:]}")
    return elapsed


@dataclass
class Cell:
    """One size and number of associations; one wall time per server and repeat."""

    label: str
    side: int
    parallel: int
    files: int
    size: int = 0
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def rate(self, name: str) -> tuple[float, float]:
        """Instances/s and MiB/s from the median wall time."""
        seconds = statistics.median(self.seconds[name])
        return self.files / seconds, self.size / MB / seconds

    def ratio(self, name: str, reference: str = "Orthanc") -> float:
        """Median over repeats of `name`'s rate / `reference`'s, each pair measured side by side."""
        pairs = zip(self.seconds[name], self.seconds[reference], strict=True)
        return statistics.median(theirs / ours for ours, theirs in pairs)


def run_cell(cell: Cell, folder: Path, servers: list[Server], expected: dict[str, int]) -> None:
    """Fresh files for this cell, sent to each server in turn; checks each indexed all of them."""
    folders = write_series(folder, cell.side, cell.files, cell.parallel)
    cell.size = folder_size(folders)
    for server in servers:
        cell.seconds.setdefault(server.name, []).append(send(server, folders))
        expected[server.name] += cell.files
        indexed = server.count()
        if indexed != expected[server.name]:
            raise RuntimeError(f"{server.name} indexed {indexed} instances, {expected[server.name]} expected")
    shutil.rmtree(folder)


def ingest(work: Path, servers: list[Server], count: int, repeat: int) -> list[Cell]:
    cells = [
        Cell(f"{kind}, {parallel} assoc.", side, parallel, count) for kind, side in SIZES.items() for parallel in (1, 4)
    ]
    expected = {server.name: 0 for server in servers}
    for round_number in range(repeat):
        for number, cell in enumerate(cells):
            order = servers if (number + round_number) % 2 == 0 else servers[::-1]  # alternate who goes first
            run_cell(cell, work / "cell", order, expected)
            times = ", ".join(f"{server.name} {cell.seconds[server.name][-1]:.2f} s" for server in order)
            print(f"  round {round_number + 1}, {cell.label}: {times}", flush=True)
    return cells


def big_instance(work: Path, servers: list[Server], megabytes: int) -> list[tuple[str, float, float, float]]:
    """Send one big multi-frame to a fresh listener of each server; (name, seconds, RSS before, peak RSS)."""
    path = work / "big.dcm"
    size = write_big(path, megabytes)
    print(f"  big instance: {size / MB:.0f} MiB", flush=True)
    results = []
    for server in servers:
        server.stop()
        server.start()
        before, _ = peak_rss_mb(server.process.pid)
        seconds = send(server, [path])
        _, peak = peak_rss_mb(server.process.pid)
        results.append((server.name, seconds, before, peak))
    path.unlink()
    return results


# -- report ------------------------------------------------------------------


def ratios(names: list[str]) -> list[tuple[str, str]]:
    """The ratio columns: every server against Orthanc, and FULL against NORMAL when both ran."""
    pairs = [(name, "Orthanc") for name in names if name != "Orthanc"]
    if "Isthmus FULL" in names and "Isthmus NORMAL" in names:
        pairs.append(("Isthmus FULL", "Isthmus NORMAL"))
    return pairs


def table(cells: list[Cell], names: list[str]) -> str:
    pairs = ratios(names)
    header = ["cell", "instances", "MiB"]
    header += [f"{name} {unit}" for name in names for unit in ("inst/s", "MiB/s")]
    header += [f"{name} / {reference}" for name, reference in pairs]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for cell in cells:
        values = [cell.label, str(cell.files), f"{cell.size / MB:.1f}"]
        values += [f"{rate:.1f}" for name in names for rate in cell.rate(name)]
        values += [f"{cell.ratio(name, reference):.2f}" for name, reference in pairs]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def big_table(results: list[tuple[str, float, float, float]], size_mb: float) -> str:
    lines = ["| server | seconds | MiB/s | RSS before (MiB) | peak RSS (MiB) |", "|---|---:|---:|---:|---:|"]
    for name, seconds, before, peak in results:
        lines.append(f"| {name} | {seconds:.1f} | {size_mb / seconds:.0f} | {before:.0f} | {peak:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400, help="instances per cell and run (default 400)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of every cell (default 3)")
    parser.add_argument("--big-mb", type=int, default=1024, help="size of the multi-frame instance; 0 skips it")
    parser.add_argument("--quick", action="store_true", help="--count 40 --repeat 1 --big-mb 64: a smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, stores)")
    parser.add_argument("--bare", action="store_true", help="also measure stock pynetdicom (bench/bare_scp.py)")
    parser.add_argument(
        "--synchronous", default="full", help="SQLite synchronous mode(s) of Isthmus, comma-separated: full, normal"
    )
    args = parser.parse_args()
    if args.quick:
        args.count, args.repeat, args.big_mb = 40, 1, 64
    modes = [mode.strip().lower() for mode in args.synchronous.split(",") if mode.strip()]
    if not modes or set(modes) - {"full", "normal"}:
        parser.error("--synchronous takes full, normal or full,normal")
    work = Path(tempfile.mkdtemp(prefix="isthmus-store-bench-", dir=os.environ.get("BENCH_TMPDIR")))
    servers: list[Server] = [
        Isthmus(
            f"Isthmus {mode.upper()}" if len(modes) > 1 else "Isthmus",
            "ISTHMUS",
            work / f"isthmus-{mode}",
            synchronous=mode,
        )
        for mode in modes
    ]
    servers.append(Orthanc("Orthanc", "ORTHANC", work / "orthanc"))
    if args.bare:
        servers.append(Bare("pynetdicom", "BARE", work / "bare"))
    for server in servers:
        server.base.mkdir()
    print(f"nproc {os.cpu_count()}, work dir {work}, {args.count} instances per cell and run", flush=True)
    try:
        for server in servers:
            server.start()
        cells = ingest(work, servers, args.count, args.repeat)
        big = big_instance(work, servers, args.big_mb) if args.big_mb else []
    finally:
        for server in servers:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    names = [server.name for server in servers]
    print(table(cells, names))
    means = ", ".join(
        f"{name} / {reference} {statistics.geometric_mean(cell.ratio(name, reference) for cell in cells):.2f}"
        for name, reference in ratios(names)
    )
    print(
        f"\nrates from the median of {args.repeat} runs; a / b = median over runs of a's inst/s / b's inst/s,"
        f" measured side by side (geometric means over the cells: {means}); MiB = 2^20 bytes"
    )
    if big:
        print(f"\nOne {args.big_mb} MiB multi-frame instance, one association, fresh listener:\n")
        print(big_table(big, args.big_mb))


if __name__ == "__main__":
    main()
