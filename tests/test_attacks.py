"""Issue 11's attacks on the server, each against a real uvicorn server process on loopback.

Each attack asserts a clear 4xx JSON refusal, a small response, a bounded peak RSS of the
server process (sampled from outside while the attack runs) and a /healthz that answers
within 1 s throughout. The same attacks, without the assertions, measure any checkout:

    python tests/test_attacks.py [REPO]    # REPO: a checkout to serve (default: this one)

prints one line per attack (BENCHMARKS.md has the figures before and after issue 11).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgpack
import pytest

REPO = Path(__file__).resolve().parents[1]
ADMIN = "attack-admin-" + "x" * 16
BODY_TIMEOUT_S = 2.0
RSS_BOUND_MB = 64  # growth of the server's RSS over its level before the attack
SMALL_REPLY = 4096

# A real server process (so its RSS is its own) with the small test models: no training, starts in seconds.
SERVER = """
import dataclasses, sys
from pathlib import Path
import uvicorn
from server.app import ServerSettings, create_app
from tests.conftest import build_test_parts
port, state, admin, timeout = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
known = {f.name for f in dataclasses.fields(ServerSettings)}  # an older checkout lacks the newer settings
settings = {k: v for k, v in {"admin_token": admin, "body_timeout_s": timeout}.items() if k in known}
uvicorn.run(create_app(build_test_parts(state, **settings)), host="127.0.0.1", port=port, log_level="warning")
"""


def rss_bytes(pid: int) -> int:
    try:
        import psutil
    except ImportError:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    return psutil.Process(pid).memory_info().rss


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen
    device_token: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid


@contextmanager
def run_server(repo: Path, state: Path, log: Path) -> Iterator[Server]:
    sys.path.insert(0, str(REPO))
    from driftsync.processes import free_port, wait_healthy

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(state), ADMIN, str(BODY_TIMEOUT_S)],
                                   cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", port, process)
    try:
        wait_healthy(server.url, process, timeout=120)
        reply = httpx.post(f"{server.url}/v1/devices", json={"device_name": "attacker"}, timeout=10)
        server.device_token = reply.json()["token"]
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Watch:
    """What the server went through during one attack."""

    baseline: int
    peak: int = 0
    worst_healthz_s: float = 0.0
    healthz_failures: list[str] = field(default_factory=list)

    @property
    def growth_mb(self) -> float:
        return max(0, self.peak - self.baseline) / 2**20


@contextmanager
def watch(server: Server) -> Iterator[Watch]:
    """Sample the server's RSS every 10 ms and time /healthz every 100 ms until the attack ends."""
    w = Watch(baseline=rss_bytes(server.pid))
    w.peak = w.baseline
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.wait(0.01):
            try:
                w.peak = max(w.peak, rss_bytes(server.pid))
            except (OSError, AttributeError):
                return

    def probe_health() -> None:
        with httpx.Client(timeout=5.0) as client:
            while True:
                started = time.monotonic()
                try:
                    ok = client.get(f"{server.url}/healthz").status_code == 200
                except httpx.HTTPError as exc:
                    ok = False
                    w.healthz_failures.append(type(exc).__name__)
                w.worst_healthz_s = max(w.worst_healthz_s, time.monotonic() - started)
                if not ok and not w.healthz_failures:
                    w.healthz_failures.append("not 200")
                if stop.wait(0.1):
                    return

    threads = [threading.Thread(target=sample_rss, daemon=True), threading.Thread(target=probe_health, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        yield w
    finally:
        time.sleep(0.15)  # at least one health probe after the attack
        stop.set()
        for thread in threads:
            thread.join(timeout=10)


@dataclass
class Reply:
    status: int  # 0: no response at all
    headers: dict[str, str]
    body: bytes  # the first SMALL_REPLY * 16 bytes
    size: int  # the whole body's length
    seconds: float


def exchange(port: int, head: bytes, body: Iterable[bytes], *, timeout: float = 60.0) -> Reply:
    """Send a request over a raw socket (a writer thread streams the body) and read the response
    while it is still being sent, as a server that refuses early answers before the body ends."""
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    stop = threading.Event()

    def send() -> None:
        try:
            sock.sendall(head)
            for chunk in body:
                if stop.is_set():
                    return
                sock.sendall(chunk)
        except OSError:
            return

    writer = threading.Thread(target=send, daemon=True)
    writer.start()
    raw, head_end, length, size = b"", -1, None, 0
    try:
        while True:
            part = sock.recv(1 << 16)
            if not part:
                break
            if head_end < 0:
                raw += part
                head_end = raw.find(b"\r\n\r\n")
                if head_end >= 0:
                    match = re.search(rb"(?im)^content-length:\s*(\d+)", raw[:head_end])
                    length = int(match.group(1)) if match else None
                    size = len(raw) - head_end - 4
            else:
                size += len(part)
                if len(raw) < head_end + 4 + SMALL_REPLY * 16:
                    raw += part
            if length is not None and size >= length:
                break
    except OSError:
        pass
    finally:
        stop.set()
        sock.close()
        writer.join(timeout=5)
    if head_end < 0:
        return Reply(0, {}, b"", 0, time.monotonic() - started)
    lines = raw[:head_end].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Reply(int(lines[0].split()[1]), headers, raw[head_end + 4:], size, time.monotonic() - started)


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode()


# ---- the attacks: each returns what the server answered --------------------------------------------

MB = 1 << 20


def json_bomb(server: Server) -> Reply:
    """200 MB of JSON to /v1/devices: one device name, declared up front."""
    size = 200 * MB
    chunk = b"a" * (1 << 16)
    prefix, suffix = b'{"device_name": "', b'"}'
    n = (size - len(prefix) - len(suffix)) // len(chunk)
    head = request_head("POST", "/v1/devices", {"Content-Type": "application/json",
                                                "Content-Length": str(len(prefix) + n * len(chunk) + len(suffix))})
    return exchange(server.port, head, [prefix, *(chunk for _ in range(n)), suffix], timeout=300)


def chunked_json_bomb(server: Server) -> Reply:
    """The same without a Content-Length: chunked, so only counting the bytes can stop it."""
    piece = b"a" * (1 << 16)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    start = b'{"device_name": "'
    head = request_head("POST", "/v1/devices", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    body = [f"{len(start):x}\r\n".encode() + start + b"\r\n", *(chunk for _ in range(200 * 16)), b'2\r\n"}\r\n0\r\n\r\n']
    return exchange(server.port, head, body, timeout=300)


def _upload(server: Server, body: bytes) -> Reply:
    head = request_head("POST", "/v1/uploads", {"Authorization": f"Bearer {server.device_token}",
                                                "Content-Type": "application/msgpack", "Content-Length": str(len(body))})
    return exchange(server.port, head, [body], timeout=300)


def echo_bomb(server: Server) -> Reply:
    """7 MB of msgpack that fails validation as a whole (lengths disagree): its errors carried the input."""
    images = [os.urandom(250_000) for _ in range(28)]
    return _upload(server, msgpack.packb({"device_version": 0, "codec": "raw", "images": images,
                                          "entropy": [0.5], "captured_at": [0.0]}))


def array_bomb(server: Server) -> Reply:
    """4 MB of upload whose entropy and captured_at arrays hold 220,000 floats each."""
    floats = [0.5] * 220_000
    return _upload(server, msgpack.packb({"device_version": 0, "codec": "raw", "images": [b"\0" * 3072],
                                          "entropy": floats, "captured_at": floats}))


def depth_bomb(server: Server) -> Reply:
    """An upload whose norm_stats are arrays nested 1000 deep (msgpack-python itself packs only 512)."""
    fields = msgpack.packb({"device_version": 0, "codec": "raw", "images": [b"\0" * 3072], "entropy": [0.5],
                            "captured_at": [0.0]})
    assert fields[0] == 0x85  # a fixmap of 5: make it 6, the sixth being the bomb
    return _upload(server, b"\x86" + fields[1:] + msgpack.packb("norm_stats") + b"\x91" * 1000 + b"\x90")


def overflow(server: Server) -> Reply:
    """Telemetry whose frame count is 10^400."""
    body = (b'{"version": 0, "window_s": 5, "frames": 1' + b"0" * 400 +
            b', "uploads_sent": 0, "uploads_spooled": 0, "uploads_dropped": 0}')
    head = request_head("POST", "/v1/telemetry", {"Authorization": f"Bearer {server.device_token}",
                                                  "Content-Type": "application/json", "Content-Length": str(len(body))})
    return exchange(server.port, head, [body], timeout=60)


def slowloris(server: Server, connections: int = 8, give_up_s: float = 6 * BODY_TIMEOUT_S) -> list[Reply]:
    """Connections that declare a body and send it one byte a second."""
    head = request_head("POST", "/v1/devices", {"Content-Type": "application/json", "Content-Length": "1000"})

    def drip() -> Iterator[bytes]:
        deadline = time.monotonic() + give_up_s
        while time.monotonic() < deadline:
            yield b" "
            time.sleep(1.0)

    replies: list[Reply] = []
    threads = [threading.Thread(target=lambda: replies.append(exchange(server.port, head, drip(), timeout=give_up_s)))
               for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=give_up_s + 10)
    return replies


MEMORY_ATTACKS: dict[str, Callable[[Server], Reply]] = {
    "json_bomb_200MB": json_bomb, "chunked_json_bomb_200MB": chunked_json_bomb, "echo_bomb_7MB": echo_bomb,
    "array_bomb_4MB": array_bomb, "depth_bomb_1000": depth_bomb, "telemetry_overflow": overflow,
}


# ---- the tests ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("attacks")
    with run_server(REPO, tmp / "state", tmp / "server.log") as live:
        yield live


def assert_refused(reply: Reply, status: int, error: str) -> dict:
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.size <= SMALL_REPLY, f"a {reply.size}-byte error body"
    assert reply.headers.get("content-type", "").startswith("application/json")
    body = json.loads(reply.body)
    assert set(body) == {"error", "detail"} and body["error"] == error, body
    return body


def assert_survived(w: Watch) -> None:
    assert w.growth_mb < RSS_BOUND_MB, f"server RSS grew by {w.growth_mb:.0f} MB"
    assert not w.healthz_failures and w.worst_healthz_s < 1.0, (w.worst_healthz_s, w.healthz_failures)


@pytest.mark.parametrize(("attack", "status", "error"), [
    ("json_bomb_200MB", 413, "body_too_large"),
    ("chunked_json_bomb_200MB", 413, "body_too_large"),
    ("echo_bomb_7MB", 400, "bad_msgpack"),
    ("array_bomb_4MB", 400, "bad_msgpack"),
    ("depth_bomb_1000", 400, "bad_msgpack"),
    ("telemetry_overflow", 422, "invalid_request"),
])
def test_memory_attack_is_refused_small_and_bounded(server, attack, status, error):
    with watch(server) as w:
        reply = MEMORY_ATTACKS[attack](server)
    assert_refused(reply, status, error)
    assert reply.seconds < 10
    assert_survived(w)


def test_error_details_never_echo_the_input(server):
    reply = echo_bomb(server)
    detail = assert_refused(reply, 400, "bad_msgpack")["detail"]
    assert "same length" in detail and "\\x" not in detail and len(detail) <= 1000


def test_slowloris_bodies_time_out_and_healthz_stays_up(server):
    with watch(server) as w:
        started = time.monotonic()
        replies = slowloris(server)
    assert len(replies) == 8
    for reply in replies:
        assert_refused(reply, 408, "body_timeout")
        assert reply.seconds < BODY_TIMEOUT_S + 2.5
    assert time.monotonic() - started < BODY_TIMEOUT_S + 5
    assert_survived(w)


def test_uploads_check_the_token_before_reading_the_body(server):
    """An unauthenticated 8 MB upload is answered 401 at once, though not a byte of its body was sent."""
    head = request_head("POST", "/v1/uploads", {"Authorization": "Bearer wrong", "Content-Length": str(8 * MB - 1)})
    reply = exchange(server.port, head, [], timeout=5)
    assert_refused(reply, 401, "unauthorized")
    assert reply.seconds < 2


def test_private_cohorts_are_reserved(server):
    victim = httpx.post(f"{server.url}/v1/devices", json={"device_name": "victim"}).json()
    assert victim["cohort"].startswith("device-")
    reply = httpx.post(f"{server.url}/v1/devices", json={"device_name": "intruder", "cohort": victim["cohort"]})
    assert reply.status_code == 422 and reply.json()["error"] == "invalid_request"
    assert "reserved" in reply.json()["detail"]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    fleet = httpx.get(f"{server.url}/v1/fleet", headers=admin).json()
    assert [d["name"] for d in fleet["devices"] if d["cohort"] == victim["cohort"]] == ["victim"]
    # an operator may still put a device in a private cohort
    moved = httpx.post(f"{server.url}/v1/devices/{fleet['devices'][0]['device_id']}/cohort",
                       json={"cohort": victim["cohort"]}, headers=admin)
    assert moved.status_code == 200


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/devices", {"device_name": "d", "cohort": "c" * 60_000}),
    ("POST", "/v1/devices", {"device_name": "d", "cohort": "a/b"}),
    ("POST", "/v1/devices/{device}/cohort", {"cohort": "c" * 60_000}),
    ("POST", "/v1/devices/{device}/cohort", {"cohort": "spaces are not allowed"}),
    ("POST", "/v1/cohorts/" + "c" * 8_000 + "/freeze", None),
    ("POST", "/v1/cohorts/bad%20name/unfreeze", None),
    ("POST", "/v1/cohorts/" + "c" * 65 + "/rollback", {"version": 1}),
    ("GET", "/v1/deltas?since=0&cohort=" + "c" * 65, None),
])
def test_cohort_names_are_validated_on_every_route(server, method, path, body):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    fleet = httpx.get(f"{server.url}/v1/fleet", headers=admin).json()
    headers = {"Authorization": f"Bearer {server.device_token}"} if path.startswith("/v1/deltas") else admin
    reply = httpx.request(method, f"{server.url}{path.format(device=fleet['devices'][0]['device_id'])}",
                          json=body, headers=headers)
    assert reply.status_code == 422, reply.text[:300]
    assert reply.json()["error"] == "invalid_request" and len(reply.content) <= SMALL_REPLY
    after = httpx.get(f"{server.url}/v1/fleet", headers=admin).json()
    assert all(len(c["cohort"]) <= 64 for c in after["cohorts"])


def test_weak_tokens_are_refused_unless_insecure_dev(tmp_path):
    from driftsync.processes import cli

    for flag, token in [("--enrolment-token", "change-me"), ("--admin-token", "change-me-admin"),
                        ("--enrolment-token", "none"), ("--admin-token", ""), ("--enrolment-token", "short")]:
        done = subprocess.run(cli("serve", "--state-dir", str(tmp_path), flag, token), capture_output=True, check=False,
                              text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode != 0, (flag, token)
        assert "weak" in done.stderr and "--insecure-dev" in done.stderr, done.stderr[-500:]
        assert "Traceback" not in done.stderr
    # a token from the environment is refused as well, and --help never shows it
    env = {**os.environ, "PYTHONPATH": str(REPO), "DRIFTSYNC_ADMIN_TOKEN": "change-me",
           "DRIFTSYNC_ENROLMENT_TOKEN": "a-real-secret-0123456789abcdef"}
    done = subprocess.run(cli("serve", "--state-dir", str(tmp_path)), capture_output=True, check=False, text=True, timeout=60,
                          cwd=REPO, env=env)
    assert done.returncode != 0 and "DRIFTSYNC_ADMIN_TOKEN" in done.stderr
    shown = subprocess.run(cli("serve", "--help"), capture_output=True, check=False, text=True, timeout=60, cwd=REPO,
                           env=env)
    assert shown.returncode == 0 and "--enrolment-token" in shown.stdout
    assert "a-real-secret" not in shown.stdout and "default change-me" not in shown.stdout
    assert "DRIFTSYNC_ENROLMENT_TOKEN; default set, hidden" in " ".join(shown.stdout.split())


def test_insecure_dev_accepts_a_weak_token_with_a_loud_warning(tmp_path):
    from driftsync.processes import cli

    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(cli("serve", "--state-dir", str(tmp_path / "s"), "--port", "0",
                                       "--enrolment-token", "change-me", "--insecure-dev"),
                                   stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while "INSECURE" not in log.read_text():
            assert process.poll() is None, log.read_text()[-500:]
            assert time.monotonic() < deadline, "no warning logged"
            time.sleep(0.1)
        assert "--enrolment-token" in log.read_text() and "change-me" not in log.read_text()
    finally:
        process.kill()
        process.wait()


def main(argv: list[str]) -> int:
    """Every attack against the server of a checkout; one line each."""
    import tempfile

    repo = Path(argv[0]).resolve() if argv else REPO
    with tempfile.TemporaryDirectory() as tmp, run_server(repo, Path(tmp) / "state", Path(tmp) / "server.log") as live:
        print(f"server of {repo}: RSS {rss_bytes(live.pid) / MB:.0f} MB after start")
        attacks: dict[str, Callable[[Server], object]] = {**MEMORY_ATTACKS, "slowloris_x8": slowloris}
        for name, attack in attacks.items():
            with watch(live) as w:
                result = attack(live)
            replies = result if isinstance(result, list) else [result]
            statuses = sorted({r.status for r in replies})
            print(f"{name:<26} status {statuses} reply {max(r.size for r in replies):>11,} B "
                  f"in {max(r.seconds for r in replies):6.1f} s  peak RSS +{w.growth_mb:5.0f} MB (of {w.peak / MB:.0f} MB)"
                  f"  worst /healthz {w.worst_healthz_s:5.2f} s{' FAILED ' + ','.join(w.healthz_failures[:3]) if w.healthz_failures else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
