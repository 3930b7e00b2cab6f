"""Who may hold a connection to the DIMSE port: caps counted when a connection is accepted, before any PDU.

The node registry judges an A-ASSOCIATE-RQ (access.py), but a connection that
never sends one still costs two threads until its ARTIM timer ends it; these
caps bound how many such connections exist at once, in all and from one source
address. A quarter of the connections is kept for the hosts of registered
nodes, so unknown addresses cannot take every slot from a modality.

Counts are per listener process: with ISTHMUS_DIMSE_PROCESSES=N sharing the
port (SO_REUSEPORT) the kernel spreads connections over the N processes, so the
port as a whole holds up to N times each cap (docs/security.md).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

from django.db import connection

from gateway import metrics
from gateway.dimse import access
from gateway.logthrottle import Throttled
from gateway.models import Node

log = logging.getLogger("isthmus.dimse")

REFRESH_SECONDS = 15.0  # how soon a node added or changed in the admin gets its reserved slots
RESERVED_SHARE = 4  # 1/4 of the connections is kept for registered nodes' hosts


class KnownHosts:
    """The addresses of enabled, allowed-in nodes pinned to a host, re-read in the background.

    The accept loop asks this for every connection, so it never waits on the
    database or DNS: a refresh that fails keeps the addresses it had.
    """

    def __init__(self, refresh: float = REFRESH_SECONDS) -> None:
        self.refresh_seconds = refresh
        self._addresses: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __contains__(self, address: str) -> bool:
        return address in self._addresses

    def __bool__(self) -> bool:
        return bool(self._addresses)

    def refresh(self) -> None:
        try:
            hosts = set(
                Node.objects.filter(enabled=True, allowed_in=True).exclude(host="").values_list("host", flat=True)
            )
        except Exception as exc:  # the database is down: keep what we knew
            log.warning("registered hosts not re-read (%s); keeping %d address(es)", type(exc).__name__, len(self))
            return
        finally:
            connection.close()  # this thread's own connection; it sleeps between refreshes
        self._addresses = frozenset().union(*(access.resolve(host) for host in hosts))

    def __len__(self) -> int:
        return len(self._addresses)

    def start(self, on_first_refresh: Callable[[], None] | None = None) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(on_first_refresh,), name="isthmus-known-hosts", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self, on_first_refresh: Callable[[], None] | None) -> None:
        self.refresh()
        if on_first_refresh is not None:
            on_first_refresh()
        while not self._stop.wait(self.refresh_seconds):
            self.refresh()


class Admission:
    """Open connections of one listener process, by source address; admit() takes a slot, release() gives it back."""

    def __init__(self, *, total: int, per_host: int, known: KnownHosts | None = None) -> None:
        self.total, self.per_host = total, per_host
        self.known = known if known is not None else KnownHosts()
        self._lock = threading.Lock()
        self._by_address: Counter[str] = Counter()
        self._open = 0
        self._refusals = Throttled(log)

    @property
    def reserved(self) -> int:
        """Slots only registered nodes' hosts may take (none while no node is pinned to a host)."""
        return self.total // RESERVED_SHARE if self.known else 0

    def open(self, address: str | None = None) -> int:
        with self._lock:
            return self._open if address is None else self._by_address[access.normalise_address(address)]

    def admit(self, address: str) -> bool:
        """Take a slot for a connection from `address`, or refuse it (one log line per flood, a metric per refusal)."""
        address = access.normalise_address(address)
        limit = self.total if address in self.known else self.total - self.reserved
        with self._lock:
            from_address = self._by_address[address]
            if from_address < self.per_host and self._open < limit:
                self._by_address[address] += 1
                self._open += 1
                return True
            open_now = self._open
        if from_address >= self.per_host:
            metrics.DIMSE_REFUSED.labels("connections-per-host").inc()
            self._refusals.warning(
                "per-host",
                "DIMSE connection from %s refused: %d open from that address (ISTHMUS_DIMSE_MAX_CONNECTIONS_PER_HOST)",
                address,
                from_address,
            )
        else:
            metrics.DIMSE_REFUSED.labels("connections").inc()
            self._refusals.warning(
                "total",
                "DIMSE connection from %s refused: %d connections open, %d of %d kept for registered nodes' hosts "
                "(ISTHMUS_DIMSE_MAX_CONNECTIONS)",
                address,
                open_now,
                self.reserved,
                self.total,
            )
        return False

    def release(self, address: str) -> None:
        address = access.normalise_address(address)
        with self._lock:
            if self._by_address[address] <= 0:
                return
            self._by_address[address] -= 1
            if not self._by_address[address]:
                del self._by_address[address]
            self._open -= 1

    def start(self) -> None:
        self.known.start(on_first_refresh=self._log_caps)

    def _log_caps(self) -> None:
        log.info(
            "DIMSE connections capped at %d per process (%d kept for %d address(es) of registered nodes), %d per address",
            self.total,
            self.reserved,
            len(self.known),
            self.per_host,
        )

    def stop(self) -> None:
        self.known.stop()
