"""Hypothesis settings shared by the fuzz tests: a bounded, repeatable run in CI, a long random one on request.

`ISTHMUS_FUZZ_EXAMPLES=20000 make test PYTEST_ARGS="-k fuzz"` runs the long one.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("ISTHMUS_FUZZ_EXAMPLES", "150"))
LONG_RUN = "ISTHMUS_FUZZ_EXAMPLES" in os.environ

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a loaded CI machine must not turn slowness into a failure; hangs are caught by timeouts
    derandomize=not LONG_RUN,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
