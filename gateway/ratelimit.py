"""Per-source rate limits on the shared cache: logins, bearer tokens, HL7 messages.

A fixed window per (kind, source): the first hit opens the window, each hit
counts, and a source past `limit` in its window is refused until the window
ends. The cache is shared by every process of a host (a file cache under the
data directory, or Redis when one is configured), so several web workers
count together. Losing the cache (a Redis flush) only forgets counts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time

from django.core.cache import caches

log = logging.getLogger("isthmus.ratelimit")

CACHE = "ratelimit"


def _key(kind: str, source: str) -> str:
    # Hashed: cache keys must be short and plain whatever a peer sends as its address or user name.
    return f"rl:{kind}:{hashlib.sha256(source.encode('utf-8', 'replace')).hexdigest()[:32]}"


def hit(kind: str, source: str, *, limit: int, window: float) -> bool:
    """Count one event of `kind` from `source`; False once `source` has had more than `limit` in `window` seconds."""
    if limit <= 0:
        return True
    cache, key, seconds = caches[CACHE], _key(kind, source), max(1, int(window))
    try:
        if cache.add(key, 1, timeout=seconds):
            cache.set(f"{key}:end", time.time() + seconds, timeout=seconds)
            return True
        count = cache.incr(key)
        _keep_window(cache, key)
    except ValueError:  # the window ended between add() and incr()
        cache.add(key, 1, timeout=seconds)
        cache.set(f"{key}:end", time.time() + seconds, timeout=seconds)
        return True
    except Exception:  # the cache is down: limits are a defence, not a reason to refuse everyone
        log.warning("rate limit cache unavailable; %s from a source not counted", kind)
        return True
    return count <= limit


def _keep_window(cache, key: str) -> None:
    """incr() on the file cache rewrites the entry with the default timeout: put the window's end back."""
    end = cache.get(f"{key}:end")
    if end is not None:
        cache.touch(key, max(1, math.ceil(end - time.time())))


def retry_after(kind: str, source: str) -> int:
    """Whole seconds until `source`'s current window of `kind` ends (0 when there is none)."""
    try:
        end = caches[CACHE].get(f"{_key(kind, source)}:end")
    except Exception:
        return 0
    return max(1, math.ceil(end - time.time())) if end is not None else 0


def blocked(kind: str, source: str, *, limit: int) -> bool:
    """True while `source` is over `limit` in its current window, without counting a new event."""
    if limit <= 0:
        return False
    try:
        count = caches[CACHE].get(_key(kind, source), 0)
    except Exception:
        return False
    return count > limit


def reset(kind: str, source: str) -> None:
    """Forget `source`'s count (a successful login after failures)."""
    try:
        caches[CACHE].delete_many([_key(kind, source), f"{_key(kind, source)}:end"])
    except Exception:
        pass
