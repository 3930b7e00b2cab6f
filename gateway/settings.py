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

from gateway import private_files
from gateway.env import Env

BASE_DIR = Path(__file__).resolve().parent.parent
env = Env()

# --- Isthmus ---------------------------------------------------------------
# Every process imports this module before it writes a file: new files 0600, directories 0700.
private_files.restrict_umask()
DATA_DIR = Path(env.str("ISTHMUS_DATA_DIR", str(BASE_DIR / "data"))).expanduser().resolve()
try:
    DATA_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not os.access(DATA_DIR, os.W_OK):
        raise PermissionError(str(DATA_DIR))
    private_files.close_directory(DATA_DIR)
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
# --- DIMSE port limits (docs/security.md, "DIMSE port"); counted per listener process ---
# Open connections at accept time, before any A-ASSOCIATE-RQ: in all, and from one source address.
DIMSE_MAX_CONNECTIONS = env.int("ISTHMUS_DIMSE_MAX_CONNECTIONS", 200, 1, 100_000)
DIMSE_MAX_CONNECTIONS_PER_HOST = env.int("ISTHMUS_DIMSE_MAX_CONNECTIONS_PER_HOST", 20, 1, 100_000)
# Seconds from connect to a complete A-ASSOCIATE-RQ (PS3.8 9.1.5 ARTIM), and to receive any one whole PDU.
DIMSE_ARTIM_TIMEOUT = env.float("ISTHMUS_DIMSE_ARTIM_TIMEOUT", 10.0, low=0.1)
DIMSE_PDU_TIMEOUT = env.float("ISTHMUS_DIMSE_PDU_TIMEOUT", 30.0, low=0.1)
# Largest command set or non-storage data set (query, MPPS, commitment) held in memory while it arrives.
DIMSE_MAX_MESSAGE_BYTES = env.int("ISTHMUS_DIMSE_MAX_MESSAGE_MB", 16, 1, 4096) * 1024 * 1024
# Seconds SIGTERM waits for in-flight associations before closing them.
DIMSE_SHUTDOWN_GRACE = env.float("ISTHMUS_DIMSE_SHUTDOWN_GRACE", 30.0)
HEARTBEAT_INTERVAL = env.float("ISTHMUS_HEARTBEAT_INTERVAL", 10.0, low=0.5)
# A listener whose heartbeat is older than this is reported down by /healthz.
HEARTBEAT_STALE_AFTER = env.float("ISTHMUS_HEARTBEAT_STALE_AFTER", 45.0, low=1.0)
MIN_FREE_BYTES = env.int("ISTHMUS_MIN_FREE_MB", 1024, 0) * 1024 * 1024
# Largest instance accepted over C-STORE or STOW-RS, and most a deflated data set may inflate to:
# room for a 4 GB multi-frame and its header.
MAX_INSTANCE_BYTES = env.int("ISTHMUS_MAX_INSTANCE_MB", 5 * 1024, 1) * 1024 * 1024
# Decoding bombs: a deflated data set may inflate to at most this many times its size
# (zeros deflate ~1000:1; real images far less), judged only once past the floor.
MAX_INFLATE_RATIO = env.int("ISTHMUS_MAX_INFLATE_RATIO", 200, 1)
INFLATE_RATIO_FLOOR_BYTES = env.int("ISTHMUS_INFLATE_RATIO_FLOOR_MB", 64, 0) * 1024 * 1024
# WADO-RS decodes at most this many pixel bytes at once: a transcoded instance, or one frame.
MAX_DECODE_BYTES = env.int("ISTHMUS_MAX_DECODE_MB", 256, 1) * 1024 * 1024
EVENT_RETENTION_DAYS = env.int("ISTHMUS_EVENT_RETENTION_DAYS", 90, 1)
# Where received instances live: <root>/<study>/<series>/<sop>.dcm
STORAGE_DIR = Path(env.str("ISTHMUS_STORAGE_DIR", str(DATA_DIR / "storage"))).expanduser().resolve()
if STORAGE_DIR.is_dir() and not STORAGE_DIR.is_relative_to(DATA_DIR):
    private_files.close_directory(STORAGE_DIR)
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
# --- HL7 listener: who may send, and how much (docs/security.md, "HL7 port") ---
# Messages from an address no registered HL7 sender covers are answered AR (like ISTHMUS_REQUIRE_KNOWN_AE).
REQUIRE_KNOWN_HL7_SENDER = env.bool("ISTHMUS_REQUIRE_KNOWN_HL7_SENDER", True)
# Seconds without a complete message before a connection is closed, and for one frame from its first byte.
HL7_IDLE_TIMEOUT = env.float("ISTHMUS_HL7_IDLE_TIMEOUT", 300.0, low=1.0)
HL7_MESSAGE_TIMEOUT = env.float("ISTHMUS_HL7_MESSAGE_TIMEOUT", 60.0, low=1.0)
HL7_MAX_CONNECTIONS = env.int("ISTHMUS_HL7_MAX_CONNECTIONS", 50, 1, 10_000)
HL7_MAX_CONNECTIONS_PER_SOURCE = env.int("ISTHMUS_HL7_MAX_CONNECTIONS_PER_SOURCE", 10, 1, 10_000)
# Messages per source address per window (0: no limit); past it AR, which the RIS retries.
HL7_RATE_LIMIT = env.int("ISTHMUS_HL7_RATE_LIMIT", 30000, 0)
HL7_RATE_WINDOW = env.float("ISTHMUS_HL7_RATE_WINDOW", 60.0, low=1.0)

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
        return private_files.read_or_create(path, lambda: secrets.token_urlsafe(50))
    except OSError:
        if not any("ISTHMUS_DATA_DIR" in error for error in env.errors):
            env.fail("DJANGO_SECRET_KEY", "", f"a value, or a writable {path}")
        return "unusable"


SECRET_KEY = _secret_key()


def _secrets_key() -> str:
    """ISTHMUS_SECRETS_KEY: the Fernet key of destination secrets; blank: one generated into DATA_DIR/secrets_key."""
    from cryptography.fernet import Fernet

    key = env.str("ISTHMUS_SECRETS_KEY", "")
    if key:
        try:
            Fernet(key)
        except ValueError:
            env.fail("ISTHMUS_SECRETS_KEY", "(hidden)", "a Fernet key: 32 url-safe base64-encoded bytes")
            return ""
    return key


SECRETS_KEY = _secrets_key()

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
        # HTTP Basic only when ISTHMUS_API_BASIC_AUTH is true (read per request).
        "dicomweb.auth.OptionalBasicAuthentication",
    ],
}

# --- DICOMweb and API access -------------------------------------------------
# Bearer tokens (API tokens or JWTs) work on /api/ too; staff sessions still do. An endpoint
# that declares nothing needs admin scope: configuration is the default, not the exception.
REST_FRAMEWORK["DEFAULT_AUTHENTICATION_CLASSES"].append("dicomweb.auth.BearerTokenAuthentication")
REST_FRAMEWORK["DEFAULT_PERMISSION_CLASSES"] = ["dicomweb.auth.AdminScope"]
REST_FRAMEWORK["EXCEPTION_HANDLER"] = "dicomweb.base.exception_handler"
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


def _networks(name: str, default: tuple[str, ...] = ()) -> list:
    """CIDRs from a comma-separated variable; a bad one stops start-up."""
    import ipaddress

    networks = []
    for cidr in env.list(name, list(default)):
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
    "SERVE_PERMISSIONS": ["dicomweb.auth.AnyScope"],
    "PREPROCESSING_HOOKS": ["dicomweb.capabilities.api_endpoints_only"],
}

# --- Web access: login and token limits, HTTPS behind a proxy (issue 11) -------
# HTTP Basic login on /api/ (staff user name and password on every request): off unless asked for.
API_BASIC_AUTH = env.bool("ISTHMUS_API_BASIC_AUTH", False)
# Failures per source (address; for logins also per user name) before it is refused until its
# window (seconds) ends, even with good credentials; a limit of 0 turns it off.
LOGIN_FAILURE_LIMIT = env.int("ISTHMUS_LOGIN_FAILURE_LIMIT", 10, 0)
LOGIN_FAILURE_WINDOW = env.int("ISTHMUS_LOGIN_FAILURE_WINDOW", 900, 1)
TOKEN_FAILURE_LIMIT = env.int("ISTHMUS_TOKEN_FAILURE_LIMIT", 50, 0)
TOKEN_FAILURE_WINDOW = env.int("ISTHMUS_TOKEN_FAILURE_WINDOW", 300, 1)
# TLS ends at nginx/haproxy in front: secure cookies, HSTS, the proxy's scheme and client address
# (X-Forwarded-Proto, X-Forwarded-For from ISTHMUS_TRUSTED_PROXIES only), explicit host names.
BEHIND_HTTPS_PROXY = env.bool("ISTHMUS_BEHIND_HTTPS_PROXY", False)
TRUSTED_PROXIES = _networks("ISTHMUS_TRUSTED_PROXIES", ("127.0.0.1", "::1"))
if BEHIND_HTTPS_PROXY:
    if not ALLOWED_HOSTS or "*" in ALLOWED_HOSTS:
        env.fail("ISTHMUS_ALLOWED_HOSTS", os.environ.get("ISTHMUS_ALLOWED_HOSTS", ""),
                 "the host names clients use, e.g. pacs.example.org (not *), with ISTHMUS_BEHIND_HTTPS_PROXY=true")  # fmt: skip
    if DEBUG:
        env.fail("ISTHMUS_DEBUG", "true", "false with ISTHMUS_BEHIND_HTTPS_PROXY=true (debug pages show secrets)")
    if os.environ.get("DJANGO_SECRET_KEY", "").strip() and (len(SECRET_KEY) < 50 or len(set(SECRET_KEY)) < 5):
        env.fail("DJANGO_SECRET_KEY", "<hidden>", "50 random characters or more, or unset (a key is generated)")
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^metrics$"]  # probes and scrapers may reach gunicorn directly
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.int("ISTHMUS_HSTS_SECONDS", 31_536_000, 0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_PRELOAD = True

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
    # Query strings in any line (a URL in an error) show parameter names, never values (gateway/privacy.py).
    "filters": {"private": {"()": "gateway.privacy.MaskQueryStrings"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["private"]}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Patient data at every level: pynetdicom dumps data sets below WARNING, pydicom's warnings quote
        # invalid values (a birth date), Django's SQL log (ISTHMUS_DEBUG) carries query parameters.
        "pynetdicom": {"level": "WARNING"},
        "pydicom": {"level": "ERROR"},
        "django.db.backends": {"level": "INFO"},
    },
}

if env.errors:
    for line in env.errors:
        sys.stderr.write(f"isthmus: {line}\n")
    raise SystemExit(2)
