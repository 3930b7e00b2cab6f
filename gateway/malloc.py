"""glibc malloc tuning for the web workers, which pass request bodies through large Python buffers."""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters (malloc.h)


def keep_large_buffers(mmap_threshold: int = 4 << 20, trim_threshold: int = 32 << 20) -> bool:
    """Serve buffers below `mmap_threshold` from the heap, and keep up to `trim_threshold` of it free.

    gunicorn hands a request body over through several bytes objects of up to a
    megabyte each. By default glibc gives each of them a fresh mmap(), which the
    kernel zeroes page by page as it is touched: about 110 page faults per 0.5 MB
    STOW-RS instance, and reading a 5 MB body cost 4 ms of CPU instead of 2
    (bench/dicomweb_bench.py). Returns False where there is no glibc mallopt().
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
