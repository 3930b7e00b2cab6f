"""Isthmus settings: everything from the environment, with safe defaults.

With no variables set, Isthmus runs on SQLite and a filesystem queue under the
data directory, so `make run` needs no external service. A bad value stops
start-up with one line naming the variable (see gateway/env.py).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import dj_database_url

from gateway.env import Env

BASE_DIR = Path(__file__).resolve().parent.parent
env = Env()

# --- Isthmus ---------------------------------------------------------------
DATA_DIR = Path(env.str("ISTHMUS_DATA_DIR", str(BASE_DIR / "data"))).expanduser().resolve()
try:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    if not os.access(DATA_DIR, os.W_OK):
        raise PermissionError(str(DATA_DIR))
except OSError:
    env.fail("ISTHMUS_DATA_DIR", str(DATA_DIR), "a directory Isthmus can create and write")


def _ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # ISTHMUS_DATA_DIR is already reported
    return path


AE_TITLE = env.ae_title("ISTHMUS_AE_TITLE", "ISTHMUS")
DIMSE_HOST = env.str("ISTHMUS_DIMSE_HOST", "0.0.0.0")
DIMSE_PORT = env.port("ISTHMUS_DIMSE_PORT", 11112)
HTTP_HOST = env.str("ISTHMUS_HTTP_HOST", "0.0.0.0")
HTTP_PORT = env.port("ISTHMUS_HTTP_PORT", 8000)
HL7_PORT = env.port("ISTHMUS_HL7_PORT", 2575)
HL7_HOST = env.str("ISTHMUS_HL7_HOST", DIMSE_HOST)
REQUIRE_KNOWN_AE = env.bool("ISTHMUS_REQUIRE_KNOWN_AE", True)
# Seconds: TCP connect and ACSE/DIMSE answer limits for associations we open.
DIMSE_TIMEOUT = env.float("ISTHMUS_DIMSE_TIMEOUT", 10.0, low=0.1)
# Seconds an association may stay silent before the listener aborts it.
DIMSE_IDLE_TIMEOUT = env.float("ISTHMUS_DIMSE_IDLE_TIMEOUT", 60.0, low=1.0)
DIMSE_MAX_ASSOCIATIONS = env.int("ISTHMUS_DIMSE_MAX_ASSOCIATIONS", 50, 1, 1000)
# Listener processes sharing the DIMSE port (SO_REUSEPORT): one per core, since one
# Python process receives on one core. Largest PDU we accept: fewer, bigger chunks.
DIMSE_PROCESSES = env.int("ISTHMUS_DIMSE_PROCESSES", min(os.cpu_count() or 1, 8), 1, 64)
DIMSE_MAX_PDU = env.int("ISTHMUS_DIMSE_MAX_PDU", 131072, 0, 16_777_216)
# Seconds SIGTERM waits for in-flight associations before closing them.
DIMSE_SHUTDOWN_GRACE = env.float("ISTHMUS_DIMSE_SHUTDOWN_GRACE", 30.0)
HEARTBEAT_INTERVAL = env.float("ISTHMUS_HEARTBEAT_INTERVAL", 10.0, low=0.5)
# A listener whose heartbeat is older than this is reported down by /healthz.
HEARTBEAT_STALE_AFTER = env.float("ISTHMUS_HEARTBEAT_STALE_AFTER", 45.0, low=1.0)
MIN_FREE_BYTES = env.int("ISTHMUS_MIN_FREE_MB", 1024, 0) * 1024 * 1024
# Largest instance accepted over C-STORE or STOW-RS, and most a deflated data set may inflate to:
# room for a 4 GB multi-frame and its header.
MAX_INSTANCE_BYTES = env.int("ISTHMUS_MAX_INSTANCE_MB", 5 * 1024, 1) * 1024 * 1024
EVENT_RETENTION_DAYS = env.int("ISTHMUS_EVENT_RETENTION_DAYS", 90, 1)
# Where received instances live: <root>/<study>/<series>/<sop>.dcm
STORAGE_DIR = Path(env.str("ISTHMUS_STORAGE_DIR", str(DATA_DIR / "storage"))).expanduser().resolve()
# Same SOP Instance UID, different bytes: keep-first (answer success, keep the old), replace, or reject.
DUPLICATE_POLICY = env.choice("ISTHMUS_DUPLICATE_POLICY", "keep-first", ("keep-first", "replace", "reject"))
# What Storage Commitment promises: "stored" here and indexed, or also "delivered" to every destination.
COMMITMENT_POLICY = env.choice("ISTHMUS_COMMITMENT_POLICY", "stored", ("stored", "delivered"))
# Most C-FIND answers to one query; the rest are cut with a warning in the log.
FIND_LIMIT = env.int("ISTHMUS_FIND_LIMIT", 5000, 1, 1_000_000)
# Worklist: PN matching ignores case (many modalities send upper case), and answers per query.
WORKLIST_PN_CASE_INSENSITIVE = env.bool("ISTHMUS_WORKLIST_PN_CASE_INSENSITIVE", True)
WORKLIST_LIMIT = env.int("ISTHMUS_WORKLIST_LIMIT", 500, 1, 100_000)
# Downstream MPPS SCPs (node names, comma-separated) that receive a copy of every MPPS.
MPPS_RELAY_NODES = env.list("ISTHMUS_MPPS_RELAY_NODES", [])
# Routing: how often beat re-rings due forward jobs; how long a delivery holds its jobs (renewed
# while it progresses) before another worker may take them; how stale the rules cached per process may be.
ROUTING_SWEEP_SECONDS = env.float("ISTHMUS_ROUTING_SWEEP_SECONDS", 10.0, low=0.5)
ROUTING_LEASE_SECONDS = env.float("ISTHMUS_ROUTING_LEASE_SECONDS", 300.0, low=2.0)
ROUTING_RULES_RELOAD_SECONDS = env.float("ISTHMUS_ROUTING_RULES_RELOAD_SECONDS", 1.0)
# One delivery message per (destination, study) per window while a study arrives, plus one after it.
ROUTING_RING_WINDOW_SECONDS = env.float("ISTHMUS_ROUTING_RING_WINDOW_SECONDS", 0.5, low=0.0)
WEB_WORKERS = env.int("ISTHMUS_WEB_WORKERS", 2, 1, 64)
WORKER_CONCURRENCY = env.int("ISTHMUS_WORKER_CONCURRENCY", 2, 1, 256)
# --- DICOMweb QIDO-RS (helper C1) ---
# Most results in one QIDO-RS answer (a larger limit is cut to it; offset pages on).
QIDO_LIMIT = env.int("ISTHMUS_QIDO_LIMIT", 1000, 1, 100_000)
# QIDO-RS patient-name matching ignores case (viewers type "doe*").
QIDO_PN_CASE_INSENSITIVE = env.bool("ISTHMUS_QIDO_PN_CASE_INSENSITIVE", True)

# --- Django ----------------------------------------------------------------
DEBUG = env.bool("ISTHMUS_DEBUG", False)
ALLOWED_HOSTS = env.list("ISTHMUS_ALLOWED_HOSTS", ["*"])
CSRF_TRUSTED_ORIGINS = env.list("ISTHMUS_CSRF_TRUSTED_ORIGINS", [])


def _secret_key() -> str:
    """Keep a generated key in the data dir so sessions survive restarts."""
    from_env = os.environ.get("DJANGO_SECRET_KEY", "").strip()
    if from_env:
        return from_env
    path = DATA_DIR / "secret_key"
    try:
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(50))
        return path.read_text().strip()
    except FileExistsError:  # another process won the race; read its key
        return path.read_text().strip()
    except OSError:
        if not any("ISTHMUS_DATA_DIR" in error for error in env.errors):
            env.fail("DJANGO_SECRET_KEY", "", f"a value, or a writable {path}")
        return "unusable"


SECRET_KEY = _secret_key()

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "gateway",
    "worklist",
    "routing",
    "dicomweb",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "gateway.urls"
WSGI_APPLICATION = "gateway.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict:
    url = os.environ.get("DATABASE_URL", "").strip()
    # Several processes share an SQLite file: WAL lets readers run beside the
    # writer, IMMEDIATE takes the write lock up front. synchronous=FULL syncs the
    # WAL at every commit, so a success answered after a commit survives a power
    # cut (NORMAL, faster, may lose the last commits: docs/benchmarks.md has the cost).
    synchronous = env.choice("ISTHMUS_SQLITE_SYNCHRONOUS", "full", ("full", "normal"))
    sqlite_options = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": f"PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous.upper()};",
    }
    if not url:
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(DATA_DIR / "isthmus.sqlite3"),
            # Kept open between requests (each web thread and listener keeps its own).
            "CONN_MAX_AGE": 60,
            # Tests share their database with the processes they start: keep it a file.
            "TEST": {"NAME": str(DATA_DIR / "test-isthmus.sqlite3")},
            "OPTIONS": sqlite_options,
        }
    expected = "postgres://USER:PASSWORD@HOST:PORT/NAME or sqlite:///PATH"
    try:
        config = dj_database_url.parse(url, conn_max_age=60, conn_health_checks=True)
    except ValueError:
        config = {}
    if not config.get("ENGINE", "").endswith(("postgresql", "sqlite3")):
        env.fail("DATABASE_URL", url, expected)
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
    if config["ENGINE"].endswith("sqlite3"):
        config["OPTIONS"] = {**sqlite_options, **config.get("OPTIONS", {})}
    if config.get("ENGINE", "").endswith("postgresql"):
        config.setdefault("OPTIONS", {}).setdefault("connect_timeout", 5)
    return config


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("ISTHMUS_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"


_ensure_dir(STATIC_ROOT)
WHITENOISE_USE_FINDERS = True

REST_FRAMEWORK = {
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.BasicAuthentication",
    ],
}

# --- DICOMweb and API access -------------------------------------------------
# Bearer tokens (API tokens or JWTs) work on /api/ too; staff sessions still do.
REST_FRAMEWORK["DEFAULT_AUTHENTICATION_CLASSES"].append("dicomweb.auth.BearerTokenAuthentication")
REST_FRAMEWORK["DEFAULT_PERMISSION_CLASSES"] = ["dicomweb.auth.ApiScope"]
REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"] = "drf_spectacular.openapi.AutoSchema"
INSTALLED_APPS += ["corsheaders", "drf_spectacular"]
_CORS = "corsheaders.middleware.CorsMiddleware"
MIDDLEWARE.insert(MIDDLEWARE.index("django.middleware.common.CommonMiddleware"), _CORS)
# STOW-RS caps: checked against Content-Length up front and counted while streaming.
STOW_MAX_BYTES = env.int("ISTHMUS_STOW_MAX_BYTES", 4 * 2**30, 1)
STOW_MAX_PARTS = env.int("ISTHMUS_STOW_MAX_PARTS", 10_000, 1)
# Browser viewers on other origins (e.g. https://viewer.example.org), comma-separated; none by default.
CORS_ALLOWED_ORIGINS = env.list("ISTHMUS_CORS_ALLOWED_ORIGINS", [])
CORS_URLS_REGEX = r"^/(dicomweb|api)/.*$"
CORS_EXPOSE_HEADERS = ["Warning", "Content-Location"]


def _networks(name: str) -> list:
    """CIDRs from a comma-separated variable; a bad one stops start-up."""
    import ipaddress

    networks = []
    for cidr in env.list(name, []):
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            env.fail(name, cidr, "comma-separated networks such as 10.0.0.0/8,192.168.1.0/24")
    return networks


# Read (QIDO-RS, WADO-RS) without a token from these networks: only for a trusted network.
DICOMWEB_OPEN_READ_NETWORKS = _networks("ISTHMUS_DICOMWEB_OPEN_READ_NETWORKS")


def _jwt_key() -> str:
    """ISTHMUS_JWT_PUBLIC_KEY: the identity provider's public key, as PEM text or a path to a PEM file."""
    value = os.environ.get("ISTHMUS_JWT_PUBLIC_KEY", "").strip()
    if not value or value.startswith("-----BEGIN"):
        return value.replace("\\n", "\n")
    try:
        return Path(value).expanduser().read_text()
    except OSError:
        env.fail("ISTHMUS_JWT_PUBLIC_KEY", value, "a PEM public key or the path of a readable PEM file")
        return ""


JWT_PUBLIC_KEY = _jwt_key()
JWT_ISSUER = env.str("ISTHMUS_JWT_ISSUER", "")
JWT_AUDIENCE = env.str("ISTHMUS_JWT_AUDIENCE", "")
JWT_ALGORITHMS = env.list("ISTHMUS_JWT_ALGORITHMS", ["RS256", "ES256"])
SPECTACULAR_SETTINGS = {
    "TITLE": "Isthmus API",
    "DESCRIPTION": "Nodes and worklist orders. DICOMweb is described by GET /dicomweb/ (capabilities).",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["dicomweb.auth.ApiScope"],
    "PREPROCESSING_HOOKS": ["dicomweb.capabilities.api_endpoints_only"],
}

# --- Celery ----------------------------------------------------------------
QUEUE_DIR = DATA_DIR / "queue"
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "").strip() or "filesystem://"
_BROKER_SCHEMES = ("filesystem", "redis", "rediss", "amqp", "amqps", "pyamqp", "sqs")
if CELERY_BROKER_URL.split("://", 1)[0] not in _BROKER_SCHEMES or "://" not in CELERY_BROKER_URL:
    env.fail("CELERY_BROKER_URL", CELERY_BROKER_URL, "redis://HOST:PORT/DB, amqp://... or filesystem://")
EMBEDDED_QUEUE = CELERY_BROKER_URL.startswith("filesystem://")
CELERY_BROKER_TRANSPORT_OPTIONS: dict = {}
if EMBEDDED_QUEUE:
    _ensure_dir(QUEUE_DIR / "control")
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(QUEUE_DIR),
        "data_folder_out": str(QUEUE_DIR),
        "control_folder": str(QUEUE_DIR / "control"),
        "store_processed": False,
    }
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")

# --- Caches ----------------------------------------------------------------
# Rate limits (gateway/ratelimit.py) count per source across every process of a host: a file
# cache under the data directory by default, Redis when ISTHMUS_CACHE_URL names one.
CACHE_URL = env.str("ISTHMUS_CACHE_URL", "")
if CACHE_URL and not CACHE_URL.startswith(("redis://", "rediss://")):
    env.fail("ISTHMUS_CACHE_URL", CACHE_URL, "redis://HOST:PORT/DB")
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "ratelimit": (
        {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CACHE_URL}
        if CACHE_URL.startswith(("redis://", "rediss://"))
        else {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(_ensure_dir(DATA_DIR / "cache")),
            "OPTIONS": {"MAX_ENTRIES": 10_000},
        }
    ),
}

# --- Metrics ---------------------------------------------------------------
# Every process (web, dimse, worker) writes its counters here; /metrics sums
# them. Must be in the environment before prometheus_client is imported.
PROMETHEUS_DIR = _ensure_dir(Path(os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(DATA_DIR / "prometheus"))))

# --- Routing: operators' view ------------------------------------------------
# /healthz reports "degraded" (still 200) when a destination's oldest pending job is older than this.
ROUTING_BACKLOG_ALERT_SECONDS = env.float("ISTHMUS_ROUTING_BACKLOG_ALERT_SECONDS", 900.0, low=1.0)

# --- Logging ---------------------------------------------------------------
LOG_LEVEL = env.choice("ISTHMUS_LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    # pynetdicom logs dataset contents (patient data) below WARNING.
    "loggers": {"pynetdicom": {"level": "WARNING"}},
}

if env.errors:
    for line in env.errors:
        sys.stderr.write(f"isthmus: {line}\n")
    raise SystemExit(2)
