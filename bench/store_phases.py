"""Where store.save() spends its time, phase by phase, in-process (no network, no DIMSE).

    .venv/bin/python bench/store_phases.py [--count N]

Copies N generated instances of each size into the store's temp area and
saves them one by one, as the C-STORE handler does on one association, timing
each phase by wrapping the module functions that do it. Runs on SQLite in a
temp data dir unless DATABASE_URL is set (then that database's index tables
are emptied first: give it a database of its own).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = Path(tempfile.mkdtemp(prefix="isthmus-phases-"))
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
os.environ.update(ISTHMUS_DATA_DIR=str(WORK), ISTHMUS_LOG_LEVEL="warning", ISTHMUS_MIN_FREE_MB="0")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from bench.store_bench import SIZES, write_series  # noqa: E402
from gateway import indexing, store  # noqa: E402
from gateway.models import Instance, Patient, Series, Study  # noqa: E402

PHASES = [
    (store, "read_header", "header parse and completeness check"),
    (store, "_digest_and_sync", "sha256 and fsync of the file"),
    (store, "_index_many", "transaction (all below, BEGIN, COMMIT)"),
    (indexing, "insert_under_series", "  instance INSERT under a known series (one statement)"),
    (indexing, "lock_instance", "  duplicate check (SELECT ... FOR UPDATE)"),
    (indexing, "series_for", "  series/study/patient lookup"),
    (indexing, "create_instance", "  instance INSERT of a new series (in a savepoint)"),
    (store, "_place", "  rename into place (its directory is fsync'd before COMMIT)"),
]
ORIGINAL = {name: getattr(module, name) for module, name, _label in PHASES}


def instrument(totals: Counter) -> None:
    """Wrap each phase's function so that its wall time adds up in `totals`."""
    for module, name, label in PHASES:

        def timed(*args, _function=ORIGINAL[name], _label=label, **kwargs):
            started = time.perf_counter()
            try:
                return _function(*args, **kwargs)
            finally:
                totals[_label] += time.perf_counter() - started

        setattr(module, name, timed)


def measure(side: int, count: int) -> tuple[float, Counter]:
    folders = write_series(WORK / f"files{side}", side, count, 1)
    temps = []
    for path in sorted(folders[0].iterdir()):
        temps.append(store.temp_dir() / path.name)
        shutil.copyfile(path, temps[-1])
    os.sync()
    totals: Counter = Counter()
    instrument(totals)
    started = time.perf_counter()
    for temp in temps:
        result = store.save(source=temp, calling_ae="BENCHSCU", called_ae="ISTHMUS")
        if not result.ok:
            raise RuntimeError(f"save failed: {result}")
    elapsed = time.perf_counter() - started
    for module, name, _label in PHASES:
        setattr(module, name, ORIGINAL[name])
    return elapsed, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400)
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    try:
        for model in (Instance, Series, Study, Patient):
            model.objects.all().delete()
        print(f"database: {connection.vendor}, {args.count} saves per size, ms per instance\n")
        results = {kind: measure(side, args.count) for kind, side in SIZES.items()}
        print("| phase | " + " | ".join(results) + " |")
        print("|---|" + "---:|" * len(results))
        for _module, _name, label in PHASES:
            cells = " | ".join(f"{totals[label] / args.count * 1000:.2f}" for _elapsed, totals in results.values())
            print(f"| {label} | {cells} |")
        totals = " | ".join(f"**{elapsed / args.count * 1000:.2f}**" for elapsed, _totals in results.values())
        print(f"| store.save() total | {totals} |")
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
