"""Pacing a batch so that a destination's rate limits hold across all its concurrent deliveries.

At most `max_concurrency` batches of a destination run at once (claims enforce
it), so each batch paces itself at 1/max_concurrency of the limits and keeps
its slot until its share of time has passed: the sum never exceeds the limit,
whichever workers or hosts run the batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Pacer:
    """Waits before each instance so that instances/s and bytes/s stay within this batch's share."""

    def __init__(
        self,
        *,
        instances_per_second: float | None,
        mbytes_per_second: float | None,
        share: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        share = max(1, share)
        self.instance_rate = instances_per_second / share if instances_per_second else None
        self.byte_rate = mbytes_per_second * 1_000_000 / share if mbytes_per_second else None
        self.clock, self.sleep = clock, sleep
        self.started = clock()
        self.count = 0
        self.bytes = 0

    @property
    def limited(self) -> bool:
        return self.instance_rate is not None or self.byte_rate is not None

    def _due(self) -> float:
        seconds = 0.0
        if self.instance_rate:
            seconds = max(seconds, self.count / self.instance_rate)
        if self.byte_rate:
            seconds = max(seconds, self.bytes / self.byte_rate)
        return self.started + seconds

    def wait(self, size: int) -> None:
        """Call before sending an instance of `size` bytes."""
        if self.limited:
            delay = self._due() - self.clock()
            if delay > 0:
                self.sleep(delay)
        self.count += 1
        self.bytes += size

    def finish(self) -> None:
        """Call once the batch is sent: hold the slot until the batch's share of time has passed."""
        if self.limited:
            delay = self._due() - self.clock()
            if delay > 0:
                self.sleep(delay)
