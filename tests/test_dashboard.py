"""The fleet dashboard (server/dashboard.html) in a real headless Chromium, against a real server
that real HTTP requests filled: two registered devices, their telemetry, one upload and the
adaptation step it causes. Chromium is driven by its command line only (--dump-dom, --screenshot);
--virtual-time-budget lets the page's 2 s setInterval fire several times in about a second of
wall time, and Chromium holds virtual time while a fetch is pending, so each tick's fetch completes."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import httpx
import numpy as np
import pytest

from shared.codec import pack
from shared.images import encode_image
from shared.protocol import RegisterRequest, Telemetry, UploadBatch
from tests.conftest import REPO, build_test_parts, serve_in_thread

ADMIN = "t0k"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
VIRTUAL_MS = 8000  # four 2 s refresh ticks after the first load


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no headless browser on PATH (looked for {', '.join(BROWSERS)}); "
                "install Debian's chromium (apt-get install chromium), as .ci/run does")


def _headless(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    """One Chromium run with a fresh profile (so no sessionStorage carries over)."""
    profile = tmp / f"profile-{time.monotonic_ns()}"
    command = [
        _browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", f"--virtual-time-budget={VIRTUAL_MS}",
        *args, url,
    ]
    try:
        out = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, cwd=tmp)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"Chromium did not finish in 120 s: {command}\n{str(exc.stderr)[-3000:]}")
    assert out.returncode == 0, f"Chromium failed ({out.returncode}): {out.stderr[-3000:]}"
    return out


# A small DOM of Chromium's --dump-dom output: stdlib only, enough to query by id, class, attribute.
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass(eq=False)
class Node:
    tag: str
    attrs: dict[str, str]
    children: list = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children if not
                       (isinstance(c, Node) and c.tag in ("script", "style", "title")))

    def walk(self):
        for child in self.children:
            if isinstance(child, Node):
                yield child
                yield from child.walk()

    def all(self, tag: str | None = None, cls: str | None = None, attr: str | None = None) -> list[Node]:
        return [n for n in self.walk() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)
                and (attr is None or attr in n.attrs)]

    def one(self, tag: str | None = None, cls: str | None = None) -> Node:
        found = self.all(tag, cls)
        assert len(found) == 1, f"expected one <{tag} class={cls}>, found {len(found)}"
        return found[0]

    def by_id(self, id_: str) -> Node:
        found = [n for n in self.walk() if n.attrs.get("id") == id_]
        assert len(found) == 1, f"expected one #{id_}, found {len(found)}"
        return found[0]


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    builder = _Builder()
    builder.feed(html)
    builder.close()
    return builder.root


def dump_dom(tmp: Path, url: str) -> Node:
    return parse(_headless(tmp, url, "--dump-dom").stdout)


@dataclass
class Fleet:
    url: str
    devices: dict[str, dict]  # name -> RegisterResponse JSON
    fleet_requests: dict[str, int]  # "ok" / "denied": GET /v1/fleet as the server saw them


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    _browser()  # skip before building a server when there is no browser
    from server.app import create_app

    parts = build_test_parts(tmp_path_factory.mktemp("dashboard") / "server", admin_token=ADMIN)
    app = create_app(parts)
    requests = {"ok": 0, "denied": 0}
    probe: dict[str, str] = {}

    @app.middleware("http")
    async def live_probe(request, call_next):
        """Count the page's fleet requests as the server sees them; before each authorised one,
        cam-b reports a window of 100 * n frames/s, so the page's numbers tell which fetch they
        came from."""
        if request.url.path == "/v1/fleet":
            if request.headers.get("authorization") == f"Bearer {ADMIN}":
                requests["ok"] += 1
                if probe:
                    n = requests["ok"]
                    parts.fleet.report(probe["cam-b"], Telemetry(
                        version=0, window_s=1.0, frames=100 * n, mean_entropy=1.0 + 0.01 * n, mean_confidence=0.5,
                        uploads_sent=100 + 2 * n, uploads_spooled=0, uploads_dropped=0))
            else:
                requests["denied"] += 1
        return await call_next(request)

    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        devices = {}
        for name, cohort in (("cam-a", "north"), ("cam-b", "south")):
            r = http.post("/v1/devices", json=RegisterRequest(device_name=name, cohort=cohort).model_dump())
            assert r.status_code == 201, r.text
            devices[name] = r.json()
        for i in range(4):  # a telemetry window each, as device_client.status sends them
            for j, (name, device) in enumerate(devices.items()):
                report = Telemetry(version=0, window_s=1.0, frames=20 + 5 * i + j, mean_entropy=0.8 + 0.1 * i + j,
                                   mean_confidence=0.9 - 0.05 * i, uploads_sent=8 * i, uploads_spooled=0,
                                   uploads_dropped=0)
                r = http.post("/v1/telemetry", json=report.model_dump(), headers=_auth(device["token"]))
                assert r.status_code == 204, r.text
        # one upload from cam-a: the adaptation step it causes moves cohort north to v1, cam-a still runs v0
        images = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
        batch = UploadBatch(device_version=0, codec="png", images=[encode_image(x, "png") for x in images],
                            entropy=[1.5] * 8, captured_at=[time.time()] * 8)
        r = http.post("/v1/uploads", content=pack(batch), headers=_auth(devices["cam-a"]["token"]))
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 60
        while parts.board.latest("north") < 1:
            assert time.monotonic() < deadline, "no adaptation step for cohort north in 60 s"
            time.sleep(0.05)
        probe["cam-b"] = devices["cam-b"]["device_id"]
        yield Fleet(url, devices, requests)


def _row(dom: Node, device_id: str) -> Node:
    rows = [r for r in dom.by_id("devices").all("tr") if r.attrs.get("data-device-id") == device_id]
    assert len(rows) == 1, f"expected one row for {device_id}, found {len(rows)}"
    return rows[0]


def _cell(row: Node, cls: str) -> str:
    return row.one("td", cls).text().strip()


def test_dashboard_shows_the_fleet_and_refreshes_live(fleet, tmp_path):
    fleet.fleet_requests.update(ok=0, denied=0)
    started = time.monotonic()
    dom = dump_dom(tmp_path, f"{fleet.url}/dashboard#token={ADMIN}")
    wall_s = time.monotonic() - started

    assert "visible" not in dom.by_id("error").classes, dom.by_id("error").text()
    assert "visible" not in dom.by_id("token-form").classes
    # live refresh: the counter counts successful fetches; the server saw each of them; cam-b's
    # frames/s is the value the probe set for the page's latest fetch, so the table was redrawn
    refreshes = int(dom.by_id("refresh-count").text())
    assert refreshes >= 2, f"only {refreshes} refresh(es) in {VIRTUAL_MS} ms of virtual time"
    assert fleet.fleet_requests["ok"] in (refreshes, refreshes + 1), (fleet.fleet_requests, refreshes)
    assert fleet.fleet_requests["denied"] == 0
    assert re.fullmatch(r"updated \d\d:\d\d:\d\d", dom.by_id("updated").text().strip())

    # server summary
    assert re.fullmatch(r"\d+", dom.by_id("queue-depth").text().strip())
    assert re.fullmatch(r"\d+", dom.by_id("pending-samples").text().strip())
    assert re.fullmatch(r"\d+\.\d\d", dom.by_id("steps-per-s").text().strip())
    assert re.fullmatch(r"\d+\.\d", dom.by_id("samples-per-s").text().strip())
    assert int(dom.by_id("steps-total").text()) >= 1
    assert re.fullmatch(r"(\d+m )?\d+s", dom.by_id("uptime").text().strip())

    cohorts = {r.attrs["data-cohort"]: r for r in dom.by_id("cohorts").all("tr", attr="data-cohort")}
    assert sorted(cohorts) == ["north", "south"]
    assert _cell(cohorts["north"], "version") == "v1" and _cell(cohorts["north"], "count") == "1"
    assert _cell(cohorts["south"], "version") == "v0" and _cell(cohorts["south"], "count") == "1"

    rows = dom.by_id("devices").all("tr", attr="data-device-id")
    assert sorted(r.attrs["data-device-id"] for r in rows) == sorted(d["device_id"] for d in fleet.devices.values())
    a, b = _row(dom, fleet.devices["cam-a"]["device_id"]), _row(dom, fleet.devices["cam-b"]["device_id"])
    assert (_cell(a, "name"), _cell(a, "cohort")) == ("cam-a", "north")
    assert (_cell(b, "name"), _cell(b, "cohort")) == ("cam-b", "south")
    assert _cell(a, "device-id") == fleet.devices["cam-a"]["device_id"][:8]
    assert _cell(a, "version") == "v0 / v1" and "behind" in a.one("td", "version").classes
    assert _cell(b, "version") == "v0 / v0" and "behind" not in b.one("td", "version").classes
    for row in (a, b):
        assert re.fullmatch(r"\d+ s ago", _cell(row, "last-seen")), _cell(row, "last-seen")
        assert "stale" not in row.one("td", "last-seen").classes
        assert re.fullmatch(r"\d+\.\d{3}", _cell(row, "entropy"))
        assert re.fullmatch(r"\d+\.\d{3}", _cell(row, "confidence"))
        sparklines = row.all("svg", cls="sparkline")
        assert {next(iter(s.classes - {"sparkline"})) for s in sparklines} == {"entropy", "confidence", "uploads"}
        assert all(s.all("polyline") for s in sparklines), "each trend has at least two points"
    # cam-a: its own telemetry, the last window 35 frames/s and 8 uploads/s; 8 samples uploaded
    assert (_cell(a, "uploaded"), _cell(a, "fps"), _cell(a, "upload-rate")) == ("8", "35.0", "8.00")
    assert (_cell(a, "entropy"), _cell(a, "confidence")) == ("1.100", "0.750")
    assert _cell(b, "fps") == f"{100 * refreshes:.1f}", "the devices table shows the latest fetch"
    assert _cell(b, "upload-rate") == "2.00"
    print(f"dashboard: {refreshes} refreshes in {wall_s:.1f} s wall time")


def test_dashboard_screenshot(fleet, tmp_path):
    from PIL import Image

    shot = tmp_path / "dashboard.png"
    _headless(tmp_path, f"{fleet.url}/dashboard#token={ADMIN}", f"--screenshot={shot}", "--window-size=1400,900")
    assert shot.is_file(), "Chromium wrote no screenshot"
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copyfile(shot, artifacts / "dashboard.png")
    with Image.open(artifacts / "dashboard.png") as image:
        assert image.format == "PNG"
        assert image.width >= 1000, image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 16, "the screenshot looks blank"


@pytest.mark.parametrize("fragment", ["", "#token=wrong"], ids=["no-token", "wrong-token"])
def test_dashboard_without_the_admin_token_shows_401_and_keeps_retrying(fleet, tmp_path, fragment):
    fleet.fleet_requests.update(ok=0, denied=0)
    dom = dump_dom(tmp_path, f"{fleet.url}/dashboard{fragment}")
    error = dom.by_id("error")
    assert "visible" in error.classes and "401" in error.text(), error.text()
    assert "visible" in dom.by_id("token-form").classes
    assert dom.by_id("refresh-count").text() == "0"
    assert not dom.by_id("devices").all("tr", attr="data-device-id")
    assert fleet.fleet_requests["ok"] == 0 and fleet.fleet_requests["denied"] >= 2, fleet.fleet_requests
