"""A database outage while the HL7 listener runs: AR (the RIS retries later), never AE, then AA once it is back.

The listener is `manage.py hl7` in its own process on the test database. The
outage is real: on PostgreSQL the database stops accepting connections and the
listener's are terminated; on SQLite another process holds the write lock.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from django.db import connection

from tests.conftest import ROOT, free_port, peer_env, stop_process, wait_for_port
from tests.worklist.hl7_messages import err, msa, orm, pid
from worklist.hl7.mllp import send
from worklist.models import Order


@contextmanager
def database_unavailable() -> Iterator[None]:
    """The test database refuses the listener until the block ends."""
    name = connection.settings_dict["NAME"]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            (ours,) = cursor.fetchone()
        settings = connection.settings_dict  # a database may not close itself: ask from the maintenance one
        with psycopg.connect(host=settings["HOST"], port=settings["PORT"] or 5432, user=settings["USER"],
                             dbname="postgres", autocommit=True) as admin:  # fmt: skip
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
                          (name, ours))  # fmt: skip
            try:
                yield
            finally:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        return
    holder = sqlite3.connect(name, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # no other writer until the block ends
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def _listener_env() -> dict[str, str]:
    env = peer_env()
    if connection.vendor == "sqlite":  # wait 1 s for the write lock, not 30
        env["DATABASE_URL"] += "?timeout=1"
    return env


def test_database_outage_answers_ar_and_the_retry_is_applied(hl7_sender):
    port = free_port()
    listener = subprocess.Popen(
        [sys.executable, "manage.py", "hl7", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=_listener_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for_port(port, process=listener)
        private = pid("SECRET42", "PRIVATE^PENNY", "19551231")
        (before,) = send("127.0.0.1", port, [orm("O1", "NW", "ACC100", patient=private)], timeout=30)
        assert msa(before.decode())[1] == "AA"

        with database_unavailable():
            (during,) = send("127.0.0.1", port, [orm("O2", "NW", "ACC101", patient=private)], timeout=30)
            assert listener.poll() is None
        answer = during.decode()
        assert msa(answer)[1:4] == ["AR", "O2", "database unavailable: retry later"]
        assert err(answer)[3].startswith("206^")  # application record locked: the storage level, not the message

        (retried,) = send("127.0.0.1", port, [orm("O2", "NW", "ACC101", patient=private)], timeout=30)
        assert msa(retried.decode())[1] == "AA"
        assert sorted(Order.objects.values_list("accession_number", flat=True)) == ["ACC100", "ACC101"]
    finally:
        stop_process(listener)
    output = listener.stdout.read()
    assert "HL7 ORM^O01 control=O2 not applied, database unavailable" in output
    for secret in ("SECRET42", "PRIVATE", "PENNY", "19551231"):
        assert secret not in output
