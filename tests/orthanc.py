"""Debian's Orthanc (with the DICOMweb plugin) as a real peer: its own config, ports and storage.

    peer = Orthanc(tmp_path / "orthanc")   # picks free loopback ports
    peer.start()                           # waits until REST answers
    peer.url, peer.dicomweb_url, peer.dicom_port, peer.ae_title
    peer.instances()                       # SOP Instance UIDs in its index
    peer.instance_file(uid)                # the stored bytes, via REST
    peer.stop(); peer.start()              # same ports, same storage (an outage)
    peer.close()                           # stop for good

Or the `orthanc` fixture of tests/routing/conftest.py. Orthanc is never
given Debian's default ports (4242, 8042), which its system service may hold.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import requests

from tests.conftest import free_port, peer_env, stop_process, wait_for_port

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """One Orthanc process that can be stopped and started again on the same ports and storage."""

    def __init__(self, workdir: Path, *, ae_title: str = "ORTHANC", modalities: dict | None = None) -> None:
        if not ORTHANC.exists() or not DICOMWEB_PLUGIN.exists():
            raise RuntimeError("install Debian's orthanc and orthanc-dicomweb packages")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.dicom_port, self.http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.config = self.workdir / "orthanc.json"
        self.config.write_text(json.dumps(self._config(modalities or {}), indent=2))
        self.process: subprocess.Popen | None = None
        self.session = requests.Session()
        self.session.headers["Accept-Encoding"] = "identity"

    def _config(self, modalities: dict) -> dict:
        return {
            "Name": f"isthmus-test-{self.ae_title}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomModalities": modalities,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
            "StableAge": 1,
            "HttpTimeout": 60,
            "ConcurrentJobs": 2,
        }

    def start(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(
            [str(ORTHANC), str(self.config)], env=peer_env(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        log.close()
        wait_for_port(self.http_port, timeout=timeout, process=self.process)
        wait_for_port(self.dicom_port, timeout=timeout, process=self.process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.session.get(f"{self.url}/system", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"Orthanc's REST API did not answer within {timeout} s")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=15)
            self.process = None

    close = stop

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- REST --------------------------------------------------------------------------------

    def get(self, path: str, **kwargs) -> requests.Response:
        response = self.session.get(f"{self.url}{path}", timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def statistics(self) -> dict:
        return self.get("/statistics").json()

    def instances(self) -> list[str]:
        """SOP Instance UIDs of every instance in Orthanc's index (one per instance: a resend overwrites)."""
        found = self.session.post(
            f"{self.url}/tools/find",
            json={"Level": "Instance", "Query": {}, "Expand": True},
            timeout=30,
        )
        found.raise_for_status()
        return [entry["MainDicomTags"]["SOPInstanceUID"] for entry in found.json()]

    def instance_file(self, sop_instance_uid: str) -> bytes:
        """The Part 10 file Orthanc stored for this SOP Instance UID."""
        ids = self.session.post(f"{self.url}/tools/lookup", data=sop_instance_uid, timeout=30).json()
        orthanc_id = next(entry["ID"] for entry in ids if entry["Type"] == "Instance")
        return self.get(f"/instances/{orthanc_id}/file").content

    def wait_for_instances(self, count: int, timeout: float = 30.0) -> list[str]:
        """Poll until at least `count` instances are indexed; returns their UIDs (fewer on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            uids = self.instances()
            if len(uids) >= count or time.monotonic() > deadline:
                return uids
            time.sleep(0.2)
