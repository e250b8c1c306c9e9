"""`driftsync fleet`: the services of a compose file, run as local processes, without Docker.

The compose file stays the one description of the topology. Each service's command,
environment, replicas, volumes, published ports, healthcheck and depends_on are read from it
and mapped onto this machine:

- `${VAR:-default}` and the other compose interpolations are resolved from os.environ;
- a named volume mounted at container path P becomes `<work>/volumes/<volume>` (a bind mount,
  its source), and every env value, command word and healthcheck string containing P is
  rewritten to that directory;
- a published or exposed port's container port C of service S gets a free local port L (or `--port`):
  `S:C` becomes `127.0.0.1:L` everywhere, `127.0.0.1:C` and `localhost:C` within S itself,
  S gets DRIFTSYNC_PORT=L, and a DRIFTSYNC_HOST is narrowed to 127.0.0.1;
- a command starting with `driftsync` runs as `python -m driftsync`, a healthcheck's `python`
  as this interpreter;
- replica i of S gets HOSTNAME and DRIFTSYNC_NAME `S-i`, and, unless S sets DRIFTSYNC_STATE_DIR,
  DRIFTSYNC_STATE_DIR `<work>/state/S-i`: what a container keeps in its own filesystem;
- profiles: a service with `profiles` runs only when one of them is active (`--profile`, else
  COMPOSE_PROFILES from the environment or the `.env` beside the compose file, as compose
  reads them); a `depends_on` entry with `required: false` on a service not running is skipped;
- a service whose image is PostgreSQL, Redis or HAProxy runs the local server through
  `python -m driftsync.localservices` on its mapped port, in its volume's directory (HAProxy
  with its configuration file's host:port pairs rewritten like everything else).
- a required `${..._TOKEN:?}` variable that is unset gets a random value for this run.

Processes inherit this environment without its DRIFTSYNC_* variables (DRIFTSYNC_HOME excepted),
as a container would; `--env KEY=VALUE` sets a variable for every service. Images, networks
and restart policies are not used: a replica that fails is reported, not restarted.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driftsync.config import FILE, PORT, POSITIVE, add, optional
from driftsync.localservices import KNOWN_IMAGES
from driftsync.processes import cli, free_port

log = logging.getLogger("driftsync.fleet")

_VAR = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?+])([^}]*))?\}|(\w+))")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
STOP_GRACE_S = 30.0


@dataclass
class Service:
    """One compose service, mapped onto this machine."""

    name: str
    argv: list[str]
    env: dict[str, str]
    replicas: int
    depends_on: dict[str, str] = field(default_factory=dict)  # dependee -> condition
    healthcheck: list[str] | None = None
    check_timeout_s: float = 30.0
    volumes: list[Path] = field(default_factory=list)
    state_root: Path | None = None  # replicas without a DRIFTSYNC_STATE_DIR keep their state in state_root/<name>

    def replica_env(self, index: int) -> dict[str, str]:
        """The service's environment plus the replica's own name (1-based index) and state directory."""
        name = f"{self.name}-{index}"
        own = {"DRIFTSYNC_STATE_DIR": str(self.state_root / name)} if self.state_root else {}
        return {**own, **self.env, "HOSTNAME": name, "DRIFTSYNC_NAME": name}


@dataclass
class Replica:
    service: Service
    index: int
    process: subprocess.Popen
    status: str = "running"

    @property
    def name(self) -> str:
        return f"{self.service.name}-{self.index}"


def interpolate(value: Any, environ: Mapping[str, str]) -> Any:
    """Compose interpolation in every string: $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR:+a}, $$."""
    if isinstance(value, dict):
        return {key: interpolate(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(1):
            return "$"
        name, op, arg = match.group(2) or match.group(5), match.group(3) or "", match.group(4) or ""
        current = environ.get(name)
        is_set = current is not None and (current != "" or not op.startswith(":"))
        if op.endswith("-"):
            return current if is_set else arg  # type: ignore[return-value]
        if op.endswith("?"):
            if not is_set:
                raise ValueError(f"${{{name}}}: {arg or 'required variable is not set'}")
            return current  # type: ignore[return-value]
        if op.endswith("+"):
            return arg if is_set else ""
        return current or ""

    return _VAR.sub(substitute, value)


def environment(spec: Any, environ: Mapping[str, str]) -> dict[str, str]:
    """A service's `environment`, list or mapping form; a bare KEY takes its value from environ."""
    pairs = spec.items() if isinstance(spec, dict) else (
        item.split("=", 1) if "=" in item else (item, None) for item in spec or [])
    out: dict[str, str] = {}
    for key, value in pairs:
        if value is None:
            if key in environ:
                out[key] = environ[key]
        else:
            out[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def seconds(text: str | float) -> float:
    """A compose duration ('1m30s', '500ms', '5s') in seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def container_ports(spec: Any) -> list[int]:
    """The container side of each `ports` entry: '8700:8700', '127.0.0.1:80:8700/tcp', 8700, {target: 8700}."""
    out = []
    for entry in spec or []:
        target = entry["target"] if isinstance(entry, dict) else str(entry).split("/")[0].rsplit(":", 1)[-1]
        out.append(int(target))
    return out


def mounts(spec: Any, declared: Mapping[str, Any], work: Path, base: Path) -> dict[str, Path]:
    """Container path -> local directory: a named volume V is <work>/volumes/V, a bind mount its source."""
    out: dict[str, Path] = {}
    for entry in spec or []:
        if isinstance(entry, dict):
            source, target = entry.get("source"), entry["target"]
        else:
            parts = str(entry).split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
        if not source:
            raise ValueError(f"anonymous volume at {target} is not supported; name it")
        if source in declared:
            out[target] = work / "volumes" / source
        elif source.startswith((".", "/", "~")):
            out[target] = (base / Path(source).expanduser()).resolve()
        else:
            raise ValueError(f"volume {source!r} is not declared under the top-level `volumes`")
    return out


def rewriter(replacements: Mapping[str, str]) -> Callable[[str], str]:
    """Replace each key (a whole path or host:port, not part of a longer word) in one pass."""
    if not replacements:
        return lambda text: text
    keys = sorted(replacements, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w.-])(?:" + "|".join(map(re.escape, keys)) + r")(?![\w.-])")
    return lambda text: pattern.sub(lambda m: replacements[m.group(0)], text)


def local_command(argv: list[str]) -> list[str]:
    """`driftsync ...` as `python -m driftsync ...`, `python` as this interpreter."""
    if argv and argv[0] == "driftsync":
        return cli(*argv[1:])
    if argv and argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    return list(argv)


def healthcheck_argv(spec: Mapping[str, Any] | None) -> list[str] | None:
    """The healthcheck's test as a local command; None when there is none."""
    if not spec or spec.get("disable") in (True, "true"):
        return None
    test = spec.get("test")
    test = ["CMD-SHELL", test] if isinstance(test, str) else test
    if not test or test[0] == "NONE":
        return None
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", " ".join(test[1:])]
    if test[0] == "CMD":
        return local_command(test[1:])
    raise ValueError(f"healthcheck test must start with CMD, CMD-SHELL or NONE, not {test[0]!r}")


def start_order(depends: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Services so that each comes after everything it depends on; file order otherwise."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in depends:
            raise ValueError(f"depends_on names an unknown service {name!r}")
        if name in visiting:
            raise ValueError(f"depends_on cycle through {name!r}")
        visiting.add(name)
        for dependee in depends[name]:
            visit(dependee)
        visiting.discard(name)
        order.append(name)

    for name in depends:
        visit(name)
    return order


def dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose `.env` file (comments and blank lines skipped)."""
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if "=" in line and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip().strip('"').strip("'") for key, value in pairs}


def active_profiles(profiles: list[str] | None, environ: Mapping[str, str]) -> set[str]:
    if profiles:
        return set(profiles)
    return {p.strip() for p in environ.get("COMPOSE_PROFILES", "").split(",") if p.strip()}


def load(
    compose: Path,
    work: Path,
    *,
    scale: Mapping[str, int] | None = None,
    overrides: Mapping[str, str] | None = None,
    port: int = 0,
    environ: Mapping[str, str] | None = None,
    profiles: list[str] | None = None,
) -> list[Service]:
    """The compose file's services mapped onto this machine, in start order."""
    environ = {**dotenv(compose.parent / ".env"), **(os.environ if environ is None else environ)}
    import yaml  # the server extra's; `driftsync device` alone must not need it

    text = compose.read_text()
    if generated := generated_tokens(text, environ):
        log.info("generated random %s for this run", ", ".join(generated))
        environ = {**environ, **generated}
    doc = interpolate(yaml.safe_load(text), environ)
    active = active_profiles(profiles, environ)
    specs: dict[str, dict[str, Any]] = {name: spec for name, spec in (doc.get("services") or {}).items()
                                        if not spec.get("profiles") or active & set(spec["profiles"])}
    if not specs:
        raise ValueError(f"no service runs with profiles {sorted(active) or '(none)'}")
    if unknown := set(scale or {}) - set(specs):
        raise ValueError(f"--scale names unknown services: {sorted(unknown)}")
    work = work.resolve()
    hosts: dict[str, str] = {}  # "server:8700" -> "127.0.0.1:L", for every service
    own: dict[str, dict[str, str]] = {name: {} for name in specs}  # "127.0.0.1:8700" -> ..., within a service
    first_port: dict[str, int] = {}
    for name, spec in specs.items():
        # docker-compose.yml names its ports in `expose` (published in docker-compose.override.yml)
        for target in dict.fromkeys(container_ports([*(spec.get("ports") or []), *(spec.get("expose") or [])])):
            local = port if port and not hosts else free_port()
            hosts[f"{name}:{target}"] = f"127.0.0.1:{local}"
            own[name].update({f"127.0.0.1:{target}": f"127.0.0.1:{local}", f"localhost:{target}": f"127.0.0.1:{local}"})
            first_port.setdefault(name, local)
    depends = {name: {**_depends_on(spec.get("depends_on")),  # required: false entries only if that service runs
                      **{d: c for d, c in _depends_on(spec.get("depends_on"), optional=True).items() if d in specs}}
               for name, spec in specs.items()}
    services = []
    for name in start_order(depends):
        spec = specs[name]
        volumes = mounts(spec.get("volumes"), doc.get("volumes") or {}, work, compose.parent.resolve())
        kind = known_image(spec.get("image"))
        if kind == "haproxy":  # its configuration names other services' host:port: run a rewritten copy
            volumes = local_config(volumes, first_port.get(name), rewriter({**hosts, **own[name]}), work / "config" / name)
        rewrite = rewriter({**hosts, **own[name], **{target: str(path) for target, path in volumes.items()}})
        env = {key: rewrite(value) for key, value in {**environment(spec.get("environment"), environ), **(overrides or {})}.items()}
        if name in first_port:
            env["DRIFTSYNC_PORT"] = str(first_port[name])
            if "DRIFTSYNC_HOST" in env:
                env["DRIFTSYNC_HOST"] = "127.0.0.1"
        command = spec.get("command")
        if command is None:
            raise ValueError(f"service {name!r} has no `command` (an image's CMD is not known locally)")
        argv = shlex.split(command) if isinstance(command, str) else [str(word) for word in command]
        if kind is not None:
            argv = local_service(kind, argv, first_port.get(name), volumes, env, work / "config" / name)
        check = healthcheck_argv(spec.get("healthcheck"))
        replicas = (scale or {}).get(name, (spec.get("deploy") or {}).get("replicas", spec.get("scale", 1)))
        services.append(Service(
            name=name, argv=[rewrite(word) for word in local_command(argv)], env=env, replicas=int(replicas),
            depends_on=depends[name], healthcheck=[rewrite(word) for word in check] if check else None,
            check_timeout_s=seconds((spec.get("healthcheck") or {}).get("timeout", "30s")), volumes=list(volumes.values()),
            state_root=work / "state",
        ))
    return services


def generated_tokens(text: str, environ: Mapping[str, str]) -> dict[str, str]:
    """A random value for each required (`${NAME:?...}`) *_TOKEN variable the environment lacks:
    a local run asks the user for no secret, and never runs on a known one."""
    names = {match.group(2) for match in _VAR.finditer(text)
             if match.group(2) and match.group(2).endswith("_TOKEN") and (match.group(3) or "").endswith("?")}
    return {name: secrets.token_urlsafe(24) for name in sorted(names) if not environ.get(name)}


def _depends_on(spec: Any, optional: bool = False) -> dict[str, str]:
    """dependee -> condition; `required: false` entries only when `optional` (then only those)."""
    if isinstance(spec, dict):
        return {name: (cond or {}).get("condition", "service_started") for name, cond in spec.items()
                if ((cond or {}).get("required", True) is False) == optional}
    return {} if optional else {name: "service_started" for name in spec or []}


def known_image(image: str | None) -> str | None:
    """'postgres', 'redis' or 'haproxy' for an image we can run as a local process."""
    if not image:
        return None
    name = image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    return name if name in KNOWN_IMAGES else None


def local_service(kind: str, argv: list[str], port: int | None, volumes: Mapping[str, Path], env: Mapping[str, str],
                  config_dir: Path) -> list[str]:
    """The local equivalent of a PostgreSQL, Redis or HAProxy container's command."""
    if port is None:
        raise ValueError(f"a {kind} service needs a published port to run locally")
    data = config_dir if kind == "haproxy" else next(iter(volumes.values()), config_dir / "data")
    runner = [sys.executable, "-m", "driftsync.localservices", kind, "--port", str(port), "--data", str(data)]
    if kind == "postgres":
        return [*runner, "--user", env.get("POSTGRES_USER", "postgres"), "--database", env.get("POSTGRES_DB", "")]
    if kind == "redis":
        words = argv[1:] if argv and argv[0] == "redis-server" else argv
        kept = [w for i, w in enumerate(words) if w != "--port" and (i == 0 or words[i - 1] != "--port")]
        return [*runner, *kept]
    config = next(path for target, path in volumes.items() if target.endswith(".cfg"))
    return [*runner, "--config", str(config)]


def local_config(volumes: Mapping[str, Path], port: int | None, rewrite: Callable[[str], str],
                 config_dir: Path) -> dict[str, Path]:
    """The mounts with HAProxy's configuration file replaced by a copy whose host:port pairs are
    this machine's and whose `bind` is the service's local port."""
    out = dict(volumes)
    target = next((t for t in volumes if t.endswith(".cfg")), None)
    if target is None or port is None:
        raise ValueError("a haproxy service needs its configuration file mounted (a .cfg bind mount) and a published port")
    config_dir.mkdir(parents=True, exist_ok=True)
    text = re.sub(r"(?m)^(\s*bind\s+)\S+", lambda m: f"{m.group(1)}127.0.0.1:{port}", rewrite(volumes[target].read_text()))
    out[target] = config_dir / volumes[target].name
    out[target].write_text(text)
    return out


def _base_env() -> dict[str, str]:
    """This environment minus DRIFTSYNC_* (except DRIFTSYNC_HOME), with this interpreter first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTSYNC_") or k == "DRIFTSYNC_HOME"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, "PYTHONUNBUFFERED": "1"}


def _wait_for(dependee: list[Replica], condition: str, base: dict[str, str], timeout: float) -> None:
    """Block until every replica of the dependee meets the depends_on condition."""
    deadline = time.monotonic() + timeout
    for replica in dependee:
        service = replica.service
        if condition == "service_completed_successfully":
            if replica.process.wait() != 0:
                raise RuntimeError(f"{replica.name} exited with code {replica.process.returncode}")
            continue
        if condition != "service_healthy":
            continue
        if service.healthcheck is None:
            raise ValueError(f"{service.name} has no healthcheck to wait for (condition: service_healthy)")
        env = {**base, **service.replica_env(replica.index)}
        while True:
            if replica.process.poll() is not None:
                raise RuntimeError(f"{replica.name} exited with code {replica.process.returncode} before becoming healthy")
            try:
                check = subprocess.run(service.healthcheck, check=False, env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, timeout=service.check_timeout_s)
                if check.returncode == 0:
                    log.info("%s is healthy", replica.name)
                    break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{replica.name} not healthy after {timeout:.0f}s")
            time.sleep(0.5)


def _stop(group: list[Replica]) -> None:
    """SIGTERM every running replica of the group, then wait; SIGKILL after the grace period."""
    running = [r for r in group if r.process.poll() is None]
    for replica in running:
        replica.process.send_signal(signal.SIGTERM)
        replica.status = "stopped"
    deadline = time.monotonic() + STOP_GRACE_S
    for replica in running:
        try:
            replica.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait()
            replica.status = "killed"


def failed(replica: Replica) -> bool:
    """Ran to a non-zero exit, needed SIGKILL, or did not exit cleanly on our SIGTERM."""
    code = replica.process.returncode
    if replica.status == "stopped":
        return code not in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    return replica.status != "exited" or code != 0


class _Stop(Exception):
    """SIGTERM or SIGINT to the runner: stop the replicas in order, then report."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


def run(services: list[Service], work: Path, *, duration: float | None = None, health_timeout: float = 600.0,
        until_exit: list[str] | None = None) -> int:
    """Start the services in order; wait for the workers to exit, for `duration` seconds, or for
    SIGTERM or SIGINT; stop the workers, then the servers (services another waits on with
    `condition: service_healthy`), in reverse start order. Prints one row per replica; returns 1
    if any failed, 128 + the signal's number when a signal stopped the run."""
    logs = work.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = _base_env()
    servers = {name for s in services for name, condition in s.depends_on.items() if condition == "service_healthy"}
    replicas: list[Replica] = []
    error = False
    stopped_by: int | None = None
    handling = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)} if handling else {}
    try:
        for service in services:
            for name, condition in service.depends_on.items():
                _wait_for([r for r in replicas if r.service.name == name], condition, base, health_timeout)
            for path in service.volumes:
                if not path.exists():  # a named volume's directory (a bind-mounted file is already there)
                    path.mkdir(parents=True)
            for index in range(1, service.replicas + 1):
                with (logs / f"{service.name}-{index}.log").open("w") as out:
                    # its own session: a terminal's Ctrl-C reaches the runner alone, which stops replicas in order
                    process = subprocess.Popen(service.argv, env={**base, **service.replica_env(index)},
                                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                replicas.append(Replica(service, index, process))
                log.info("started %s (pid %d)", replicas[-1].name, process.pid)
        workers = [r for r in replicas if (r.service.name in until_exit if until_exit else r.service.name not in servers)]
        deadline = time.monotonic() + duration if duration is not None else math.inf
        while time.monotonic() < deadline:
            if any(r.process.poll() is not None for r in replicas if r.service.name in servers):
                log.error("a server exited; stopping")
                break
            if workers and all(r.process.poll() is not None for r in workers):
                break
            if not workers and duration is None:
                break
            time.sleep(0.5)
    except (RuntimeError, TimeoutError, ValueError) as exc:
        log.error("%s", exc)
        error = True
    except _Stop as stop:
        log.warning("%s: stopping the replicas", stop)
        stopped_by = stop.signum
    finally:
        for sig in previous:  # a second signal must not cut the orderly stop short
            signal.signal(sig, signal.SIG_IGN)
        for replica in replicas:
            if replica.process.poll() is not None:
                replica.status = "exited"
        _stop([r for r in replicas if r.service.name not in servers])
        for service in reversed(services):
            _stop([r for r in replicas if r.service.name == service.name and service.name in servers])
    print(f"{'replica':<20} {'exit':>5}  status")
    for replica in replicas:
        print(f"{replica.name:<20} {replica.process.returncode:>5}  {replica.status}{' (failed)' if failed(replica) else ''}")
    print(f"logs: {logs}", flush=True)
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if stopped_by is not None:
        return 128 + stopped_by
    return 1 if error or any(failed(r) for r in replicas) else 0


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def add_fleet_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The `fleet` subcommand's parser."""
    p = subparsers.add_parser(
        "fleet", help="run a compose file's services as local processes (no Docker)",
        description="Run the services of a compose file (docker-compose.yml: the server roles and their devices) "
        "as local processes: replicas, environment, volumes, published ports, profiles and depends_on conditions.",
        epilog="examples:\n  driftsync fleet --scale device=4 --duration 120\n"
               "  driftsync fleet --env DRIFTSYNC_REPEAT=no --env DRIFTSYNC_SAMPLES_PER_DOMAIN=32",
    )
    add(p, "--compose", "docker-compose.yml", FILE, help="compose file: the topology")
    p.add_argument("--profile", action="append", default=[], metavar="NAME",
                   help="activate a compose profile (repeatable; default: COMPOSE_PROFILES, from the environment or .env)")
    p.add_argument("--scale", action="append", default=[], metavar="SERVICE=N",
                   help="replicas of a service, overriding deploy.replicas (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set an environment variable for every service (repeatable)")
    add(p, "--work", "driftsync-fleet", help="volumes (<work>/volumes) and logs (<work>/logs)")
    add(p, "--duration", None, optional(POSITIVE), help="stop the replicas after this many seconds ('none': when they exit)")
    p.add_argument("--until-exit", action="append", default=[], metavar="SERVICE",
                   help="stop everything once every replica of SERVICE has exited (repeatable; default: every "
                        "service no other waits on as healthy)")
    add(p, "--port", 0, PORT, help="local port for the first published port (0: a free one)")
    add(p, "--health-timeout", 600.0, POSITIVE, help="longest wait for a depends_on condition")
    return p


def run_fleet_command(args: argparse.Namespace) -> int:
    """`driftsync fleet`: load the compose file and run it."""
    import yaml

    try:
        scale = {name: int(n) for name, n in _pairs(args.scale, "--scale").items()}
        services = load(Path(args.compose), Path(args.work), scale=scale,
                        overrides=_pairs(args.env, "--env"), port=args.port, profiles=args.profile)
    except (ValueError, OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"driftsync fleet: {exc}") from exc
    return run(services, Path(args.work), duration=args.duration, health_timeout=args.health_timeout,
               until_exit=args.until_exit)
