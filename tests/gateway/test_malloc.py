"""The web workers' malloc tuning: taken by glibc, a no-op elsewhere."""

import platform

from gateway.malloc import keep_large_buffers


def test_glibc_accepts_the_thresholds():
    assert keep_large_buffers() is (platform.libc_ver()[0] == "glibc")
