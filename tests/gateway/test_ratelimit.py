"""Per-source rate limits on the shared cache: the file cache (embedded) and real Redis."""

from __future__ import annotations

import time
import uuid

import pytest
from django.test import override_settings

from gateway import ratelimit
from tests.conftest import REDIS_URL


def _caches(tmp_path) -> dict:
    return {
        "file": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(tmp_path)},
        "redis": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL},
    }


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_a_source_past_its_limit_is_refused_and_others_are_not(tmp_path, backend) -> None:
    caches = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    with override_settings(CACHES={**caches, "ratelimit": _caches(tmp_path)[backend]}):
        source, other = f"10.0.0.{uuid.uuid4().int % 250}", f"login:{uuid.uuid4()}"
        answers = [ratelimit.hit("login", source, limit=3, window=60) for _ in range(5)]
        assert answers == [True, True, True, False, False]
        assert ratelimit.blocked("login", source, limit=3)
        assert ratelimit.hit("login", other, limit=3, window=60)
        assert not ratelimit.blocked("token", source, limit=3)  # kinds count apart
        ratelimit.reset("login", source)
        assert not ratelimit.blocked("login", source, limit=3)
        assert ratelimit.hit("login", source, limit=3, window=60)


def test_an_unreachable_cache_counts_nothing_and_refuses_nobody() -> None:
    down = {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": "redis://127.0.0.1:1/0"}
    caches = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}, "ratelimit": down}
    with override_settings(CACHES=caches):
        assert all(ratelimit.hit("hl7", "10.1.1.1", limit=1, window=60) for _ in range(3))
        assert not ratelimit.blocked("hl7", "10.1.1.1", limit=1)


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_a_window_ends_on_time_however_many_hits_it_had(tmp_path, backend) -> None:
    """The file cache's incr() rewrites an entry with the default timeout (300 s): the window must not stretch."""
    caches = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    with override_settings(CACHES={**caches, "ratelimit": _caches(tmp_path)[backend]}):
        source = f"10.0.1.{uuid.uuid4().int % 250}"
        assert [ratelimit.hit("token", source, limit=1, window=1) for _ in range(4)] == [True, False, False, False]
        assert ratelimit.blocked("token", source, limit=1) and ratelimit.retry_after("token", source) == 1

        time.sleep(1.2)

        assert not ratelimit.blocked("token", source, limit=1) and ratelimit.retry_after("token", source) == 0
        assert ratelimit.hit("token", source, limit=1, window=1)
