"""Device identity for container replicas, and the healthcheck that reads the replica's own status."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from device_client.health import status_problem
from device_client.identity import (
    container_id,
    device_name,
    resolve_name,
    state_dir_for,
)

ID_A = "3f" * 32
ID_B = "a1" * 32


def _mountinfo(cid: str, root: str = "/var/lib/docker") -> str:
    """/proc/self/mountinfo as Docker leaves it in a container (overlay root, three bind-mounted files)."""
    return "\n".join([
        "600 500 0:52 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/x,upperdir=/y,workdir=/z",
        "601 600 0:55 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw",
        f"612 600 254:1 {root}/containers/{cid}/resolv.conf /etc/resolv.conf rw,relatime - ext4 /dev/vda1 rw",
        f"613 600 254:1 {root}/containers/{cid}/hostname /etc/hostname rw,relatime - ext4 /dev/vda1 rw",
        f"614 600 254:1 {root}/containers/{cid}/hosts /etc/hosts rw,relatime - ext4 /dev/vda1 rw",
    ]) + "\n"


def test_the_container_id_comes_from_the_engine_bind_mounts() -> None:
    assert container_id(_mountinfo(ID_A)) == ID_A
    assert container_id(_mountinfo(ID_B, root="/docker")) == ID_B  # /var/lib on its own filesystem
    podman = f"700 600 0:40 /containers/storage/overlay-containers/{ID_B}/userdata/hostname /etc/hostname rw - tmpfs x rw\n"
    assert container_id(podman) == ID_B
    assert container_id("22 1 254:1 / / rw,relatime - ext4 /dev/vda1 rw\n") is None  # not in a container
    # a volume whose path merely mentions containers/ is no evidence
    assert container_id(f"30 1 254:1 /srv/containers/{ID_A}/data /data rw - ext4 /dev/vda1 rw\n") is None


def test_replicas_sharing_a_hostname_get_distinct_names_and_state_dirs() -> None:
    host_net = [device_name("edge-box", cid) for cid in (ID_A, ID_B)]  # network_mode: host
    assert host_net == [f"edge-box-{ID_A[:12]}", f"edge-box-{ID_B[:12]}"]
    assert device_name(ID_A[:12], ID_A) == ID_A[:12]  # a bridge network: the hostname is the short id already
    assert device_name("laptop", None) == "laptop"  # no container: the hostname, as before
    template = "/var/lib/driftsync/devices/{name}"
    assert len({state_dir_for(template, n) for n in host_net}) == 2


def test_resolve_name_keeps_a_given_name_and_reads_the_mount_table_for_auto(tmp_path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(_mountinfo(ID_A))
    assert resolve_name("cam-7", table) == "cam-7"
    assert resolve_name("auto", table).endswith(ID_A[:12])
    assert resolve_name("auto", tmp_path / "missing") == socket.gethostname()  # no table: no container


def _status(path: Path, **fields) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"state": "running", "updated_at": time.time()} | fields))
    return path


def test_status_problems(tmp_path) -> None:
    now = time.time()
    assert status_problem(_status(tmp_path / "ok.json"), now) is None
    assert "no status file" in status_problem(tmp_path / "absent.json", now)
    assert "not updated" in status_problem(_status(tmp_path / "old.json", updated_at=now - 120), now)
    assert "'stopped'" in status_problem(_status(tmp_path / "stopped.json", state="stopped"), now)
    (tmp_path / "bad.json").write_text("{")
    assert "unreadable" in status_problem(tmp_path / "bad.json", now)


def test_the_healthcheck_command_checks_its_own_replica_only(tmp_path) -> None:
    """Two replicas' status files side by side: each name's check sees only its own."""
    env = {**os.environ, "DRIFTSYNC_STATE_DIR": str(tmp_path / "{name}")}
    env.pop("DRIFTSYNC_NAME", None)
    _status(tmp_path / "live" / "status.json")
    _status(tmp_path / "dead" / "status.json", updated_at=time.time() - 600)

    def check(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "driftsync", "device", "--health-check", "--name", name], check=False,
                              env=env, capture_output=True, text=True, timeout=60)

    live, dead, other = check("live"), check("dead"), check("never-started")
    assert (live.returncode, dead.returncode, other.returncode) == (0, 1, 1), (live, dead, other)
    assert "live: healthy" in live.stdout and "not updated" in dead.stdout and "no status file" in other.stdout
