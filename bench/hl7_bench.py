"""HL7 ingest rate: new orders (ORM^O01 NW) per second through `manage.py hl7`, over 1 and 4 MLLP connections,
and how fast an unregistered address is refused.

    .venv/bin/python bench/hl7_bench.py --messages 2000
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/isthmus_hl7_bench .venv/bin/python bench/hl7_bench.py

The listener runs on its own data dir (SQLite unless DATABASE_URL names a
scratch database, which is migrated and filled). Its sender is registered from
a config file, as an administrator does, so every message passes the sender
check and the per-source rate limit as in production (the limit is raised for
the run so it measures the listener, not the limit). The rate tells how large
ISTHMUS_HL7_RATE_LIMIT must be for a RIS burst at go-live not to be refused.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ports import free_port, isthmus_env, wait_for_port  # noqa: E402  (bench/ is sys.path[0])

from tests.worklist.hl7_messages import msa, orm, pid  # noqa: E402
from worklist.hl7.mllp import send  # noqa: E402

SENDER = "hl7_senders:\n  - {name: bench-ris, host: 127.0.0.1}\n"


def start_listener(base: Path) -> tuple[subprocess.Popen, int, dict[str, str]]:
    env = isthmus_env(base, ISTHMUS_HL7_RATE_LIMIT="1000000000")  # counted, never reached
    if os.environ.get("DATABASE_URL"):
        env["DATABASE_URL"] = os.environ["DATABASE_URL"]
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "--verbosity", "0"], env=env, cwd=ROOT, check=True)
    (base / "senders.yaml").write_text(SENDER)
    subprocess.run([*manage, "import_config", str(base / "senders.yaml")], env=env, cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    port = free_port()
    log = open(base / "hl7.log", "wb")  # noqa: SIM115 - the child keeps it; one line per refusal
    listener = subprocess.Popen([*manage, "hl7", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=ROOT,
                                stdout=log, stderr=log)  # fmt: skip
    wait_for_port(port, listener)
    return listener, port, env


def run(port: int, connections: int, per_connection: int, tag: str, source: str = "127.0.0.1") -> float:
    """Messages per second, each connection sending its orders one after the other's ACK.

    From 127.0.0.1 (the registered sender) every answer must be AA; from another address, AR.
    """
    failures: list[str] = []
    expected = "AA" if source == "127.0.0.1" else "AR"

    def one(number: int) -> None:
        orders = [orm(f"{tag}{number}-{n}", "NW", f"{tag}{number}X{n}"[-16:], patient=pid(f"P{tag}{number}-{n}"))
                  for n in range(per_connection)]  # fmt: skip
        for answer in send("127.0.0.1", port, orders, timeout=60, source=source):
            if msa(answer.decode())[1] != expected:
                failures.append(answer.decode())

    threads = [threading.Thread(target=one, args=(n,)) for n in range(connections)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} messages not AA, e.g. {failures[0]!r}")
    return connections * per_connection / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=2000, help="orders per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="isthmus-hl7-bench-") as base:
        listener, port, env = start_listener(Path(base))
        try:
            database = "PostgreSQL" if env.get("DATABASE_URL", "").startswith("postgres") else "SQLite"
            tag = str(int(time.time()))[-5:]
            print("| database | sender | connections | orders/s |\n|---|---|---|---|")
            for connections in (1, 4):
                rate = run(port, connections, args.messages // connections, f"{tag}c{connections}")
                print(f"| {database} | registered: AA | {connections} | {rate:.0f} |")
            rate = run(port, 1, args.messages, f"{tag}u", source="127.0.0.2")
            print(f"| {database} | unknown: AR | 1 | {rate:.0f} |")
        finally:
            listener.terminate()
            listener.wait(30)


if __name__ == "__main__":
    main()
