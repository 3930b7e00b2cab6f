"""The outbox: ForwardJob rows written inside store.save()'s index transaction.

store.save() calls `tags()` to know which extra attributes to read from each
file's header (those the rules' conditions name) and `write_jobs()` once the
instance row exists, in the same transaction, so that an acknowledged
instance always has its jobs. Jobs are enqueued when the transaction commits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.models import Instance
    from gateway.store import Received


def tags() -> tuple[int, ...]:
    """Tags the enabled rules' conditions need beyond indexing.HEADER_TAGS."""
    return ()  # filled in by the routing work (issue 5)


def write_jobs(instance: Instance, received: Received) -> int:
    """Evaluate the rules for one stored instance and write its ForwardJobs; returns how many."""
    return 0  # filled in by the routing work (issue 5)
