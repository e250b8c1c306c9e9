"""What a running device tells its operator: a status file, an optional loopback HTTP
endpoint, and periodic label-free telemetry to the server for the fleet dashboard."""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pydantic import ValidationError

from device_client.client import DeviceClient
from device_client.state import atomic_write
from device_client.transport import ServerApi, ServerError
from shared.protocol import Telemetry

log = logging.getLogger("driftsync.device.status")


class StatusReporter:
    def __init__(
        self,
        client: DeviceClient,
        path: Path,
        *,
        every_s: float = 2.0,
        telemetry_every_s: float | None = 5.0,
        port: int | None = None,
    ) -> None:
        self.client, self.path, self.every_s, self.telemetry_every_s = client, Path(path), every_s, telemetry_every_s
        self.telemetry_sent = 0
        self._throughput = 0.0
        self._last = (time.monotonic(), client.frames)
        self._stop = threading.Event()
        self._thread = client.supervisor.thread("status", self._run, self._stop)
        self._http: ThreadingHTTPServer | None = None
        if port is not None:
            self._http = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
            threading.Thread(target=self._http.serve_forever, name="status-http", daemon=True).start()
            log.info("status on http://127.0.0.1:%d/status", self._http.server_address[1])

    @property
    def port(self) -> int | None:
        return self._http.server_address[1] if self._http else None

    def snapshot(self, state: str = "running") -> dict:
        status = self.client.status()
        status["uploads"]["telemetry_reports"] = self.telemetry_sent
        thresholds = status.pop("selection")
        endpoint = {"status_url": f"http://127.0.0.1:{self.port}/status"} if self._http else {}
        return status | {"state": state, "frames_per_s": round(self._throughput, 2), "selection": thresholds,
                         "updated_at": time.time()} | endpoint

    def start(self) -> StatusReporter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._http is not None:
            self._http.shutdown()
        self._write("stopped")

    def _write(self, state: str = "running") -> None:
        atomic_write(self.path, json.dumps(self.snapshot(state), indent=2).encode())

    def _run(self) -> None:
        api = self.client.open_api(timeout=10.0)
        next_telemetry = time.monotonic() + (self.telemetry_every_s or 0)
        while not self._stop.wait(self.every_s):
            now, frames = time.monotonic(), self.client.frames
            self._throughput = (frames - self._last[1]) / max(now - self._last[0], 1e-6)
            self._last = (now, frames)
            self._write()
            if self.telemetry_every_s is not None and now >= next_telemetry:
                next_telemetry = now + self.telemetry_every_s
                self._send_telemetry(api)
        api.close()

    def _send_telemetry(self, api: ServerApi) -> None:
        window = self.client.take_health_window()
        status = self.client.status()
        uploads = status["uploads"]
        try:
            report = Telemetry(
                version=status["version"], window_s=min(max(time.monotonic() - window.started, 1e-3), 3600.0),
                frames=window.frames,
                mean_entropy=window.entropy_sum / window.frames if window.frames else None,
                mean_confidence=min(1.0, window.confidence_sum / window.frames) if window.frames else None,
                uploads_sent=uploads["sent"], uploads_spooled=uploads["spooled"], uploads_dropped=uploads["dropped"],
            )
            api.telemetry(report)
            self.telemetry_sent += 1
        except (ServerError, ValidationError) as exc:  # telemetry is best-effort: the next window carries on
            log.warning("telemetry not sent: %s", str(exc)[:300])

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        reporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] not in ("/status", "/"):
                    self.send_error(404, "only /status is served here")
                    return
                body = json.dumps(reporter.snapshot()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                return

        return Handler
