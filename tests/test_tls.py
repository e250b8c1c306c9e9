"""TLS straight from uvicorn: `driftsync serve --ssl-certfile/--ssl-keyfile` with a self-signed
certificate, and a device that trusts it through `--ca-file`."""
from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time

import httpx
import numpy as np
import pytest

from device_client.client import DeviceClient, DeviceConfig
from driftsync.processes import cli, free_port


def _self_signed(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_https_server_with_a_self_signed_certificate(tmp_path):
    cert, key = _self_signed(tmp_path)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    server = subprocess.Popen(
        cli("serve", "--port", str(port), "--state-dir", str(tmp_path / "server"), "--ssl-certfile", str(cert),
            "--ssl-keyfile", str(key), "--step-min-samples", "4", "--step-max-wait-s", "0.3"),
        stdout=(tmp_path / "server.log").open("w"), stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    device = None
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/healthz", verify=ssl.create_default_context(cafile=str(cert)), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "https server not up"
                time.sleep(0.3)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/healthz")  # the system's CAs do not vouch for it
        cfg = DeviceConfig(server=url, state_dir=tmp_path / "device", ca_file=str(cert), e_max_factor=2.0,
                           dynamic_lambda=None, upload_batch=8, upload_flush_s=0.1, poll_wait_s=2.0)
        device = DeviceClient(cfg).start()
        device.predict(np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
        deadline = time.monotonic() + 60
        while device.model.version < 1:
            assert time.monotonic() < deadline, "no delta over https"
            time.sleep(0.05)
        assert device.status()["uploads"]["sent"] == 16
    finally:
        if device is not None:
            device.stop(flush_timeout=2)
        server.terminate()
        server.wait(timeout=30)
