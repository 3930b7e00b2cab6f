"""Test-wide environment, set before Django reads its settings."""

import os
import tempfile

# Each test run gets its own data directory (SQLite file, queue, metrics).
os.environ.setdefault("ISTHMUS_DATA_DIR", tempfile.mkdtemp(prefix="isthmus-test-"))
os.environ.setdefault("TCP_NODELAY", "1")
