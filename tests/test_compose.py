"""docker-compose.yml, the Dockerfiles, and `driftsync fleet`'s reading of the compose file."""
from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from driftsync import fleet
from server.tokens import weak_tokens
from tests.conftest import SHARED, missing_shared

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
HOST_OVERRIDE = REPO / "docker-compose.host.yml"
PORTS_OVERRIDE = REPO / "docker-compose.override.yml"  # read by compose itself when no -f is given
SCHEMA = SHARED / "schemas/compose-spec.json"
DOCKERFILES = {name: REPO / "docker" / f"{name}.Dockerfile" for name in ("server", "device")}


@pytest.fixture(scope="module")
def doc() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# ---- the compose file and the Dockerfiles ----------------------------------------------------


@pytest.mark.parametrize("path", [COMPOSE, HOST_OVERRIDE, PORTS_OVERRIDE], ids=["compose", "host", "ports"])
def test_compose_files_match_the_compose_specification(path):
    if reason := missing_shared("schemas/compose-spec.json"):
        pytest.skip(reason)
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra")
    errors = sorted(jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(
        yaml.safe_load(path.read_text())), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_file_avoids_what_docker_compose_1_29_rejects(doc):
    """Debian bookworm's docker-compose 1.29.2 (what scripts/compose_e2e.sh runs) refuses a top-level
    `name:` and `required:` in depends_on; the project name comes from .env instead."""
    assert "name" not in doc
    for name, service in doc["services"].items():
        for condition in (service.get("depends_on") or {}).values():
            assert "required" not in condition, name
    assert fleet.dotenv(COMPOSE.parent / ".env")["COMPOSE_PROJECT_NAME"] == "driftsync"


@pytest.mark.parametrize("files", [[], ["-f", "docker-compose.yml", "-f", "docker-compose.host.yml"]],
                         ids=["with-published-ports", "host-network"])
def test_docker_compose_1_29_accepts_the_files(files):
    """Debian's docker-compose (1.29.2) parses and validates the files as `up` would; with no -f it
    reads docker-compose.override.yml by itself."""
    import shutil

    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; scripts/compose_e2e.sh does)")
    env = {**os.environ, "DRIFTSYNC_ENROLMENT_TOKEN": "e" * 24,
           "DRIFTSYNC_ADMIN_TOKEN": "a" * 24}
    out = subprocess.run(["docker-compose", *files, "config"], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    merged = yaml.safe_load(out.stdout)["services"]
    assert {"server", "device", "gateway"} <= set(merged)  # `config` lists every profile's services
    host = bool(files)
    assert all((spec.get("network_mode") == "host") == host for spec in merged.values())
    assert all(bool(spec.get("ports")) != host for name, spec in merged.items() if name not in ("device", "migrate"))


def test_host_override_puts_every_service_on_the_host_network_on_loopback(doc):
    override = yaml.safe_load(HOST_OVERRIDE.read_text())["services"]
    assert set(override) == set(doc["services"])
    assert all(spec["network_mode"] == "host" for spec in override.values())
    for name, spec in override.items():  # every service name a container dials resolves to loopback
        if name not in ("postgres", "redis"):
            assert {"server:127.0.0.1", "gateway:127.0.0.1", "postgres:127.0.0.1", "redis:127.0.0.1"} <= set(
                spec["extra_hosts"]), name
        if "DRIFTSYNC_HOST" in doc["services"][name].get("environment", {}):
            assert spec["environment"]["DRIFTSYNC_HOST"] == "127.0.0.1", name
    assert "listen_addresses=127.0.0.1" in override["postgres"]["command"]
    assert override["redis"]["command"][1:3] == ["--bind", "127.0.0.1"]
    assert "networks" not in yaml.safe_load(HOST_OVERRIDE.read_text())  # no network is created


def test_stop_grace_periods_outlast_a_clean_shutdown(doc):
    """`docker compose down` sends SIGTERM, then SIGKILL after the grace period (10 s by default):
    every driftsync process gets long enough to answer its long polls, flush and close its store."""
    services = doc["services"]
    for name in ("server", "device", "api-1", "api-2", "worker-1", "worker-2"):
        assert fleet.seconds(services[name]["stop_grace_period"]) >= 30, name


SCALE = {"postgres", "redis", "migrate", "api-1", "api-2", "worker-1", "worker-2", "gateway"}
REQUIRED = "${DRIFTSYNC_ENROLMENT_TOKEN:?set DRIFTSYNC_ENROLMENT_TOKEN to a random token of 16+ characters}"


def test_compose_services_volumes_healthchecks_and_restart(doc):
    services = doc["services"]
    assert set(services) == {"server", "device"} | SCALE
    assert set(doc["volumes"]) == {"server-state", "postgres-data", "redis-data"}
    assert services["server"]["volumes"] == ["server-state:/var/lib/driftsync/server"]
    published = yaml.safe_load(PORTS_OVERRIDE.read_text())["services"]
    assert published["server"]["ports"] == ["8700:8700"] and services["server"]["expose"] == ["8700"]
    # docker-py (compose 1.29) refuses published ports with network_mode: host, and an override cannot
    # remove them: so the base file only exposes, and docker-compose.override.yml publishes
    assert not any("ports" in spec for spec in services.values())
    assert all(f"{target}" in services[name]["expose"] for name, spec in published.items()
               for target in fleet.container_ports(spec["ports"]))
    assert services["device"]["deploy"]["replicas"] == 3
    # a device runs in both profiles and retries until whichever front door its profile starts answers
    assert "depends_on" not in services["device"]
    assert services["device"]["healthcheck"]["test"] == ["CMD", "driftsync", "device", "--health-check"]
    for name, service in services.items():
        if name != "migrate":  # a one-shot job
            assert service["restart"] == "unless-stopped", name
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        test = service.get("healthcheck", {}).get("test", [])
        if test[:2] == ["CMD", "python"]:
            compile(test[-1], f"{name} healthcheck", "exec")  # a valid one-liner
    for name in ("server", "device"):
        assert services[name]["build"]["dockerfile"] == f"docker/{name}.Dockerfile"
    # anything fixed per container would stop `docker compose up --scale device=N`
    # and a volume would outlive the replicas whose state it holds: each keeps its state in its container
    assert not {"container_name", "hostname", "ports", "volumes"} & set(services["device"])
    assert services["server"]["command"] == ["driftsync", "serve"]
    assert services["device"]["command"] == ["driftsync", "device"]


def test_compose_profiles_single_by_default_and_scale(doc):
    services = doc["services"]
    assert services["server"]["profiles"] == ["single"]
    assert services["device"]["profiles"] == ["single", "scale"]
    assert all(services[name]["profiles"] == ["scale"] for name in SCALE)
    assert fleet.dotenv(COMPOSE.parent / ".env")["COMPOSE_PROFILES"] == "single"
    roles = {name: services[name]["command"] for name in ("api-1", "api-2", "worker-1", "worker-2")}
    assert roles == {"api-1": ["driftsync", "serve", "--role", "api"], "api-2": ["driftsync", "serve", "--role", "api"],
                     "worker-1": ["driftsync", "serve", "--role", "worker"],
                     "worker-2": ["driftsync", "serve", "--role", "worker"]}
    store = services["migrate"]["environment"]["DRIFTSYNC_STORE"]
    assert store.startswith("postgresql://") and services["migrate"]["command"] == ["driftsync", "db", "upgrade"]
    for name in ("api-1", "api-2", "worker-1", "worker-2"):
        env = services[name]["environment"]
        assert env["DRIFTSYNC_STORE"] == store and env["DRIFTSYNC_BROKER"].startswith("redis://"), name
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert services["worker-1"]["environment"]["DRIFTSYNC_WORKER_NAME"] != services["worker-2"]["environment"][
        "DRIFTSYNC_WORKER_NAME"]
    gateway = services["gateway"]
    assert gateway["image"].startswith("haproxy") and gateway["expose"] == ["8700"]
    assert yaml.safe_load(PORTS_OVERRIDE.read_text())["services"]["gateway"]["ports"] == ["8700:8700"]
    config = (COMPOSE.parent / "docker" / "haproxy.cfg").read_text()
    assert "server api1 api-1:8701 check" in config and "server api2 api-2:8702 check" in config
    assert "option httpchk GET /healthz" in config


def test_compose_configures_only_through_driftsync_variables(doc):
    for name, service in doc["services"].items():
        if name in ("postgres", "redis", "gateway"):  # third-party images keep their own settings
            continue
        keys = set(service["environment"])
        assert keys and all(re.fullmatch(r"DRIFTSYNC_[A-Z0-9_]+", k) for k in keys), (name, keys)
    server, device = (doc["services"][n]["environment"] for n in ("server", "device"))
    assert server["DRIFTSYNC_HOST"] == "0.0.0.0" and server["DRIFTSYNC_PORT"] == "8700"
    assert server["DRIFTSYNC_STATE_DIR"] == "/var/lib/driftsync/server"
    assert server["DRIFTSYNC_ENROLMENT_TOKEN"] == device["DRIFTSYNC_ENROLMENT_TOKEN"] == REQUIRED
    assert server["DRIFTSYNC_ADMIN_TOKEN"].startswith("${DRIFTSYNC_ADMIN_TOKEN:?")  # no default: none is weak
    for name in ("api-1", "api-2"):
        assert doc["services"][name]["environment"]["DRIFTSYNC_ENROLMENT_TOKEN"] == REQUIRED
    assert server["DRIFTSYNC_DEVICE_EXPIRY_S"] == "600"
    assert device == {
        "DRIFTSYNC_SERVER": "http://server:8700,http://gateway:8700", "DRIFTSYNC_ENROLMENT_TOKEN": REQUIRED,
        "DRIFTSYNC_NAME": "auto", "DRIFTSYNC_SOURCE": "embedded",
        "DRIFTSYNC_DOMAIN_OFFSET": "auto", "DRIFTSYNC_REPEAT": "true", "DRIFTSYNC_FPS": "10", "DRIFTSYNC_SINK": "jsonl:-",
    }


def _instructions(path: Path) -> list[str]:
    """Dockerfile instructions, comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["server", "device"])
def test_dockerfiles_run_as_a_non_root_user(name):
    lines = _instructions(DOCKERFILES[name])
    assert lines[0] == "ARG BASE_IMAGE=python:3.11-slim"
    assert [line for line in lines if line.startswith("FROM ")] == ["FROM ${BASE_IMAGE} AS build", "FROM ${BASE_IMAGE}"]
    runtime = lines[lines.index("FROM ${BASE_IMAGE}"):]  # only the venv crosses over: no source, no pip cache
    assert [line for line in runtime if line.startswith("COPY")] == ["COPY --from=build /opt/venv /opt/venv"]
    assert not any("pip install" in line for line in runtime)
    assert any("PATH=/opt/venv/bin:$PATH" in line for line in runtime)
    users = [line.split(None, 1)[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, users
    assert users[-1].split(":")[0] == "10001"
    assert lines[-1] == f'CMD ["driftsync", "{"serve" if name == "server" else "device"}"]'
    assert any(line.startswith("WORKDIR ") for line in lines)


def test_device_dockerfile_installs_no_torch():
    lines = _instructions(DOCKERFILES["device"])
    installs = [line for line in lines if "pip install" in line]
    assert installs and all('".[device]"' in line or ".[device]" in line for line in installs)
    guard = '! python -c "import torch"'  # the build fails if torch did get in
    assert guard in " ".join(installs) and "pip uninstall -y pip setuptools" in " ".join(installs)
    assert "torch" not in " ".join(lines).replace(guard, "")
    assert "COPY server" not in " ".join(lines)


def test_server_dockerfile_installs_cpu_torch_then_the_server_extra_and_checks_the_shipped_models():
    text = " ".join(_instructions(DOCKERFILES["server"]))
    # torch's pip source is a build argument: its own index by default, a local --find-links offline
    assert "ARG TORCH_SPEC=torch==2.13.0" in text
    assert 'ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"' in text
    torch_at = text.index('pip install ${TORCH_PIP_ARGS} "${TORCH_SPEC}"')
    assert torch_at < text.index('pip install ".[server,scale]"') < text.index("embedded.verify_packaged")
    assert "driftsync train" not in text  # the models ship in the package: no training at build
    assert "DRIFTSYNC_HOME=/var/lib/driftsync/home" in text and "EXPOSE 8700" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ignored.index("!server/models/weights/*.pt") > ignored.index("*.pt")  # the exception comes after


def test_dockerignore_keeps_the_build_context_small():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".git", "tests", "runs", "benchmarks", "**/__pycache__"} <= ignored


# ---- driftsync fleet: reading the compose file -----------------------------------------------


def test_interpolation_follows_compose():
    env = {"SET": "v", "EMPTY": ""}
    cases = {
        "${SET:-d}": "v", "${EMPTY:-d}": "d", "${UNSET:-d}": "d", "${EMPTY-d}": "", "${UNSET-d}": "d",
        "${SET}": "v", "$SET/x": "v/x", "${UNSET}": "", "$$SET": "$SET", "a$${b}": "a${b}",
        "${SET:+alt}": "alt", "${EMPTY:+alt}": "", "${EMPTY+alt}": "alt", "http://${SET:-h}:8700": "http://v:8700",
    }
    for text, expected in cases.items():
        assert fleet.interpolate(text, env) == expected, text
    assert fleet.interpolate({"k": ["${SET}", 3, True, None]}, env) == {"k": ["v", 3, True, None]}
    with pytest.raises(ValueError, match="give me A"):
        fleet.interpolate("${UNSET:?give me A}", env)


def test_environment_list_and_mapping_forms():
    environ = {"FROM_HOST": "h"}
    assert fleet.environment(["A=1", "B=x=y", "FROM_HOST", "MISSING"], environ) == {"A": "1", "B": "x=y", "FROM_HOST": "h"}
    assert fleet.environment({"A": 1, "B": True, "C": None, "FROM_HOST": None}, environ) == {"A": "1", "B": "true", "FROM_HOST": "h"}
    assert fleet.environment(None, environ) == {}


def test_durations_ports_and_the_rewriter():
    assert fleet.seconds("1m30s") == 90 and fleet.seconds("500ms") == 0.5 and fleet.seconds(4) == 4
    with pytest.raises(ValueError):
        fleet.seconds("5 minutes")
    assert fleet.container_ports(["8700:8700", "127.0.0.1:9000:80/tcp", 8080, {"target": 81, "published": 1}]) == [8700, 80, 8080, 81]
    rewrite = fleet.rewriter({"/data": "/tmp/w/volumes/d", "server:8700": "127.0.0.1:5"})
    assert rewrite("http://server:8700/x") == "http://127.0.0.1:5/x"
    assert rewrite("http://myserver:8700 server:87000") == "http://myserver:8700 server:87000"
    assert rewrite("'/data/{name}' /data /database /x/data") == "'/tmp/w/volumes/d/{name}' /tmp/w/volumes/d /database /x/data"


def test_real_compose_maps_volumes_hosts_and_ports(tmp_path):
    services = {s.name: s for s in fleet.load(COMPOSE, tmp_path, port=18700, environ={})}
    assert list(services) == ["server", "device"]
    server, device = services["server"], services["device"]
    assert server.argv == [sys.executable, "-m", "driftsync", "serve"]
    assert device.argv == [sys.executable, "-m", "driftsync", "device"]
    volumes = tmp_path.resolve() / "volumes"
    assert server.volumes == [volumes / "server-state"] and device.volumes == []
    assert server.env["DRIFTSYNC_STATE_DIR"] == str(volumes / "server-state")
    assert "DRIFTSYNC_STATE_DIR" not in device.env  # in the container: DRIFTSYNC_HOME/device/<replica name>
    assert device.replica_env(2)["DRIFTSYNC_STATE_DIR"] == str(tmp_path.resolve() / "state" / "device-2")
    assert server.replica_env(1)["DRIFTSYNC_STATE_DIR"] == str(volumes / "server-state")  # its own is kept
    assert server.env["DRIFTSYNC_PORT"] == "18700" and server.env["DRIFTSYNC_HOST"] == "127.0.0.1"
    assert device.env["DRIFTSYNC_SERVER"] == "http://127.0.0.1:18700,http://gateway:8700"  # no gateway: it fails over
    assert "http://127.0.0.1:18700/healthz" in server.healthcheck[-1]
    assert server.healthcheck[0] == sys.executable
    assert device.healthcheck == [sys.executable, "-m", "driftsync", "device", "--health-check"]
    token = server.env["DRIFTSYNC_ENROLMENT_TOKEN"]  # generated for the run, shared by server and devices
    assert token == device.env["DRIFTSYNC_ENROLMENT_TOKEN"] and weak_tokens({"enrol": token}) == []
    assert weak_tokens({"admin": server.env["DRIFTSYNC_ADMIN_TOKEN"]}) == [] and server.env["DRIFTSYNC_ADMIN_TOKEN"] != token
    assert (server.replicas, device.replicas) == (1, 3)
    assert device.depends_on == {} and server.depends_on == {}
    for service in services.values():
        assert not any("/var/lib/driftsync" in value or "server:8700" in value for value in service.env.values())
        assert all(key.startswith("DRIFTSYNC_") for key in service.env)


def test_real_compose_interpolates_scales_and_overrides(tmp_path):
    services = {s.name: s for s in fleet.load(
        COMPOSE, tmp_path, scale={"device": 5}, overrides={"DRIFTSYNC_REPEAT": "false", "DRIFTSYNC_FPS": "none"},
        environ={"DRIFTSYNC_ENROLMENT_TOKEN": "s3cret", "DRIFTSYNC_ADMIN_TOKEN": "adm"})}  # given ones are kept
    server, device = services["server"], services["device"]
    assert device.replicas == 5
    assert server.env["DRIFTSYNC_ENROLMENT_TOKEN"] == device.env["DRIFTSYNC_ENROLMENT_TOKEN"] == "s3cret"
    assert server.env["DRIFTSYNC_ADMIN_TOKEN"] == "adm"
    assert device.env["DRIFTSYNC_REPEAT"] == server.env["DRIFTSYNC_REPEAT"] == "false"
    assert device.env["DRIFTSYNC_FPS"] == "none"
    port = int(server.env["DRIFTSYNC_PORT"])  # a free one, the same on both sides
    assert port > 0 and device.env["DRIFTSYNC_SERVER"] == f"http://127.0.0.1:{port},http://gateway:8700"
    names = [device.replica_env(i) for i in (1, 2, 3)]
    assert [(e["HOSTNAME"], e["DRIFTSYNC_NAME"]) for e in names] == [(f"device-{i}", f"device-{i}") for i in (1, 2, 3)]
    with pytest.raises(ValueError, match="unknown services"):
        fleet.load(COMPOSE, tmp_path, scale={"devices": 2}, environ={})


def test_real_compose_device_healthcheck_reads_the_replica_status_file(tmp_path):
    (device,) = [s for s in fleet.load(COMPOSE, tmp_path, environ={}) if s.name == "device"]
    status = tmp_path / "state" / "device-2" / "status.json"

    def check(replica: int = 2) -> int:
        env = {**os.environ, **device.replica_env(replica)}
        return subprocess.run(device.healthcheck, check=False, env=env, capture_output=True, timeout=60).returncode

    assert check() != 0  # no status file yet
    status.parent.mkdir(parents=True)
    status.write_text(json.dumps({"state": "running", "updated_at": time.time()}))
    assert check() == 0
    assert check(replica=3) != 0  # another replica's check does not see replica 2's file
    status.write_text(json.dumps({"state": "running", "updated_at": time.time() - 120}))
    assert check() != 0  # stale: the device stopped writing it


def test_real_compose_server_healthcheck_polls_the_local_port(tmp_path):
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        (server,) = [s for s in fleet.load(COMPOSE, tmp_path, port=httpd.server_port, environ={}) if s.name == "server"]
        assert subprocess.run(server.healthcheck, check=False, capture_output=True, timeout=60).returncode == 0
    finally:
        httpd.shutdown()


SMALL = """
services:
  worker:
    command: python -c "import os; assert os.environ['DRIFTSYNC_NAME'].startswith('worker-'); open('/out/' + os.environ['HOSTNAME'], 'w').write(os.environ['DRIFTSYNC_MODE'])"
    environment:
      - DRIFTSYNC_MODE=${MODE:-plain}
      - DRIFTSYNC_DB=http://db:5000
    volumes: [results:/out]
    depends_on:
      db: {condition: service_healthy}
    deploy: {replicas: 2}
  db:
    command: ["python", "-c", "import pathlib, time; pathlib.Path('/state/ready').write_text('1'); time.sleep(120)"]
    ports: ["5000:5000"]
    volumes: ["state:/state", "./bound:/bound"]
    healthcheck:
      test: ["CMD-SHELL", "test -f /state/ready"]
      timeout: 5s
  tool:
    command: ["echo", "hi"]
    depends_on: [worker]
volumes:
  results:
  state:
"""


def _small(tmp_path: Path, text: str = SMALL) -> Path:
    path = tmp_path / "compose.yml"
    path.write_text(text)
    return path


def test_small_compose_order_forms_and_bind_mounts(tmp_path):
    services = fleet.load(_small(tmp_path), tmp_path / "work", port=5999, environ={"MODE": "fast"})
    assert [s.name for s in services] == ["db", "worker", "tool"]
    db, worker, tool = services
    assert db.volumes == [(tmp_path / "work/volumes/state").resolve(), (tmp_path / "bound").resolve()]
    assert db.healthcheck == ["/bin/sh", "-c", f"test -f {(tmp_path / 'work/volumes/state').resolve()}/ready"]
    assert db.check_timeout_s == 5 and db.env == {"DRIFTSYNC_PORT": "5999"}
    assert worker.argv[:2] == [sys.executable, "-c"] and str((tmp_path / "work/volumes/results").resolve()) in worker.argv[2]
    assert worker.env == {"DRIFTSYNC_MODE": "fast", "DRIFTSYNC_DB": "http://127.0.0.1:5999"}
    assert worker.replicas == 2 and worker.depends_on == {"db": "service_healthy"}
    assert tool.argv == ["echo", "hi"] and tool.depends_on == {"worker": "service_started"} and tool.replicas == 1


@pytest.mark.parametrize(("services", "error"), [
    ("a: {command: x, depends_on: [b]}\n  b: {command: x, depends_on: [a]}", "cycle"),
    ("a: {command: x, depends_on: [nope]}", "unknown service"),
    ("a: {image: x}", "no `command`"),
    ("a: {command: x, volumes: [undeclared:/x]}", "not declared"),
])
def test_small_compose_errors(tmp_path, services, error):
    with pytest.raises(ValueError, match=error):
        fleet.load(_small(tmp_path, f"services:\n  {services}\n"), tmp_path / "work", environ={})


def test_start_order_follows_depends_on_then_file_order():
    assert fleet.start_order({"c": {"b": ""}, "a": {}, "b": {"a": ""}, "d": {}}) == ["a", "b", "c", "d"]


def test_runner_starts_in_order_waits_and_stops(tmp_path, capsys):
    work = tmp_path / "work"
    services = fleet.load(_small(tmp_path), work, environ={"MODE": "fast"})
    assert fleet.run(services, work, health_timeout=60) == 0
    assert {p.name: p.read_text() for p in (work / "volumes/results").iterdir()} == {"worker-1": "fast", "worker-2": "fast"}
    assert {p.name for p in (work / "logs").iterdir()} == {"db-1.log", "worker-1.log", "worker-2.log", "tool-1.log"}
    table = capsys.readouterr().out
    assert re.search(r"db-1\s+-?\d+\s+stopped\n", table) and re.search(r"worker-2\s+0\s+exited\n", table)


def test_runner_reports_failures_and_stops_after_duration(tmp_path, capsys):
    text = """
services:
  ok: {command: ["python", "-c", "pass"]}
  bad: {command: ["python", "-c", "raise SystemExit(3)"]}
  slow: {command: ["python", "-c", "import time; time.sleep(120)"]}
"""
    started = time.monotonic()
    assert fleet.run(fleet.load(_small(tmp_path, text), tmp_path / "w", environ={}), tmp_path / "w", duration=2) == 1
    assert time.monotonic() - started < 30
    table = capsys.readouterr().out
    assert re.search(r"bad-1\s+3\s+exited \(failed\)", table) and re.search(r"slow-1\s+-?\d+\s+stopped\n", table)


LONG = """
services:
  db:
    command: ["python", "-c", "import pathlib, time; pathlib.Path('/state/ready').write_text('1'); time.sleep(300)"]
    volumes: ["state:/state"]
    healthcheck: {test: ["CMD-SHELL", "test -f /state/ready"], timeout: 5s}
  worker:
    command: ["python", "-c", "import time; time.sleep(300)"]
    depends_on: {db: {condition: service_healthy}}
    deploy: {replicas: 2}
volumes:
  state:
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_fleet_command_stops_its_children_on_a_signal_and_prints_its_summary(tmp_path, signum):
    from driftsync.processes import cli

    errors = tmp_path / "fleet.err"
    with errors.open("w") as err:
        runner = subprocess.Popen(cli("fleet", "--compose", str(_small(tmp_path, LONG)), "--work", str(tmp_path / "w")),
                                  stdout=subprocess.PIPE, stderr=err, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while len(pids := [int(p) for p in re.findall(r"started \S+ \(pid (\d+)\)", errors.read_text())]) < 3:
            assert runner.poll() is None and time.monotonic() < deadline, errors.read_text()[-2000:]
            time.sleep(0.1)
        runner.send_signal(signum)
        out, _ = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 128 + signum
    assert re.search(r"db-1\s+-?\d+\s+stopped\n", out) and re.search(r"worker-2\s+-?\d+\s+stopped\n", out), out
    assert "Traceback" not in errors.read_text() and "stopping the replicas" in errors.read_text()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
