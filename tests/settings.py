"""Settings for the test run: the product's settings over a throw-away data directory.

Set here, not in a conftest, because pytest-django reads settings before any
conftest runs. Processes the tests start inherit both variables.
"""

import os
import tempfile

os.environ.setdefault("ISTHMUS_DATA_DIR", tempfile.mkdtemp(prefix="isthmus-test-"))
os.environ.setdefault("TCP_NODELAY", "1")
# One listener process unless a test asks for more (tests/gateway/test_dimse_command.py does).
os.environ.setdefault("ISTHMUS_DIMSE_PROCESSES", "1")

from gateway.settings import *  # noqa: E402,F403
