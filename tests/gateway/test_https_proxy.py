"""ISTHMUS_BEHIND_HTTPS_PROXY: Django's deployment check is clean, hosts must be named, and behind a real
haproxy terminating TLS (the README's configuration) cookies are secure, HSTS is sent, plain HTTP is
redirected, and limits count the client haproxy saw, not the proxy nor a forged X-Forwarded-For."""

from __future__ import annotations

import datetime
import http.client
import json
import re
import shutil
import ssl
import subprocess
from pathlib import Path
from urllib.parse import urlencode

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from django.contrib.auth.models import User

from dicomweb.models import ApiToken
from tests.conftest import free_port, manage, peer_env, stop_process, wait_for_port

PROXY_MODE = {"ISTHMUS_BEHIND_HTTPS_PROXY": "true", "ISTHMUS_ALLOWED_HOSTS": "localhost,pacs.example.org"}


def settings_env(**overrides: str) -> dict[str, str]:
    """The product's own settings module, as `manage.py` on a server loads it, with no test leftovers."""
    env = {k: v for k, v in peer_env().items() if k not in ("ISTHMUS_ALLOWED_HOSTS", "ISTHMUS_DEBUG")}
    return {**env, "DJANGO_SETTINGS_MODULE": "gateway.settings", **overrides}


def test_check_deploy_is_clean_behind_an_https_proxy():
    plain = manage("check", "--deploy", env=settings_env())
    proxied = manage("check", "--deploy", "--fail-level", "WARNING", env=settings_env(**PROXY_MODE))

    assert "security.W004" in plain.stderr + plain.stdout  # without the setting Django has plenty to say
    assert proxied.returncode == 0, proxied.stdout + proxied.stderr
    assert "System check identified no issues (0 silenced)." in proxied.stdout


@pytest.mark.parametrize("hosts", [None, "*", "pacs.example.org,*"])
def test_start_up_is_refused_without_explicit_hosts(hosts):
    env = settings_env(ISTHMUS_BEHIND_HTTPS_PROXY="true", **({"ISTHMUS_ALLOWED_HOSTS": hosts} if hosts else {}))

    refused = manage("check", env=env)

    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"isthmus: invalid ISTHMUS_ALLOWED_HOSTS={hosts or ''!r}: expected the host names clients use, "
        "e.g. pacs.example.org (not *), with ISTHMUS_BEHIND_HTTPS_PROXY=true"
    ]


@pytest.fixture
def certificate(tmp_path) -> Path:
    """A self-signed certificate for localhost, key and chain in one PEM as haproxy wants it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = tmp_path / "localhost.pem"
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return pem


HAPROXY_CONFIG = """
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 300s
frontend isthmus_https
    bind 127.0.0.1:{https_port} ssl crt {pem}
    http-request set-header X-Forwarded-Proto https
    option forwardfor
    default_backend isthmus_web
backend isthmus_web
    server web1 127.0.0.1:{web_port}
"""


@pytest.fixture
def haproxy(tmp_path, certificate, web_with):
    """gunicorn in proxy mode behind haproxy terminating TLS, as the README configures them."""
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is missing: install the haproxy Debian package (.ci/run does)")
    web = web_with(**PROXY_MODE, ISTHMUS_TRUSTED_PROXIES="127.0.0.1", ISTHMUS_TOKEN_FAILURE_LIMIT="2",
                   ISTHMUS_TOKEN_FAILURE_WINDOW="60")  # fmt: skip
    web_port, https_port = int(web.rsplit(":", 1)[1]), free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(https_port=https_port, pem=certificate, web_port=web_port))
    with open(tmp_path / "haproxy.log", "wb") as log:
        process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(https_port, process=process)
    yield {"https_port": https_port, "web_port": web_port, "pem": certificate}
    stop_process(process)


def request(proxy: dict, path: str, *, source: str = "127.0.0.2", via_tls: bool = True, body: str | None = None,
            **headers: str):  # fmt: skip
    """One request from `source`: through haproxy over TLS, or straight to gunicorn over plain HTTP; POST with a body."""
    if via_tls:
        context = ssl.create_default_context(cafile=str(proxy["pem"]))
        connection = http.client.HTTPSConnection("localhost", proxy["https_port"], context=context, timeout=30,
                                                 source_address=(source, 0))  # fmt: skip
    else:
        connection = http.client.HTTPConnection("127.0.0.1", proxy["web_port"], timeout=30)
    connection.request("GET" if body is None else "POST", path, body=body, headers={"Host": "localhost", **headers})
    response = connection.getresponse()
    response.body = response.read()
    connection.close()
    return response


def cookie(response, name: str) -> set[str]:
    """The attributes of one Set-Cookie of a response (Secure, HttpOnly, SameSite=Lax...)."""
    (header,) = [value for value in response.headers.get_all("Set-Cookie") if value.startswith(f"{name}=")]
    return {attribute.strip() for attribute in header.split(";")[1:]}


def test_behind_haproxy_cookies_are_secure_hsts_is_sent_and_http_is_redirected(haproxy):
    User.objects.create_superuser("admin", "admin@example.org", "right-password-for-tests")
    page = request(haproxy, "/admin/login/")
    csrf_cookie = re.search(r"csrftoken=([^;]+)", page.getheader("Set-Cookie")).group(1)
    csrf_field = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page.body).group(1).decode()
    form = urlencode({"csrfmiddlewaretoken": csrf_field, "username": "admin", "password": "right-password-for-tests"})
    logged_in = request(haproxy, "/admin/login/?next=/admin/", body=form, Cookie=f"csrftoken={csrf_cookie}",
                        Origin="https://localhost", **{"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    plain = request(haproxy, "/admin/login/", via_tls=False)
    health = request(haproxy, "/healthz", via_tls=False)
    other_host = request(haproxy, "/admin/login/", Host="evil.example.org")

    assert page.status == 200
    assert page.getheader("Strict-Transport-Security") == "max-age=31536000; includeSubDomains; preload"
    assert "Secure" in cookie(page, "csrftoken")
    assert logged_in.status == 302 and logged_in.getheader("Location") == "/admin/"  # CSRF passes over the proxy
    assert {"Secure", "HttpOnly"} <= cookie(logged_in, "sessionid")
    assert plain.status == 301 and plain.getheader("Location") == "https://localhost/admin/login/"
    assert health.status in (200, 503) and set(json.loads(health.body)) == {"status"}  # a probe is not redirected
    assert other_host.status == 400


def test_behind_haproxy_limits_count_the_real_client_not_a_forged_address(haproxy):
    _token, good = ApiToken.issue("viewer")
    bad = {"Authorization": "Bearer isth_guess"}

    guesses = [request(haproxy, "/dicomweb/studies", **bad, **{"X-Forwarded-For": "198.51.100.9"}).status
               for _ in range(3)]  # fmt: skip
    forged = request(haproxy, "/dicomweb/studies", Authorization=f"Bearer {good}", **{"X-Forwarded-For": "10.9.9.9"})
    neighbour = request(haproxy, "/dicomweb/studies", source="127.0.0.3", Authorization=f"Bearer {good}")

    assert guesses == [401, 401, 429]
    assert forged.status == 429  # haproxy appends the real source; a forged one to its left is ignored
    assert neighbour.status == 200
