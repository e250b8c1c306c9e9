"""Which device this process is: its name and state directory, distinct for each container replica.

Replicas of one compose service share their hostname under host networking, and a bridge network
gives each a random one anyway. What each replica does have of its own is its container id, which
the engine's bind mounts of /etc/hostname, /etc/hosts and /etc/resolv.conf name in /proc/self/mountinfo.
Stdlib only: the container healthcheck resolves the same name without loading onnxruntime.
"""
from __future__ import annotations

import re
import socket
from pathlib import Path

AUTO = "auto"
MOUNTINFO = Path("/proc/self/mountinfo")
# Docker: .../containers/<id>/hostname; Podman: .../overlay-containers/<id>/userdata/hostname
_CONTAINER_FILE = re.compile(r"/(?:overlay-)?containers/([0-9a-f]{64})/(?:userdata/)?(?:hostname|hosts|resolv\.conf)\s")


def container_id(mountinfo: str) -> str | None:
    """The id of the container this mount table belongs to; None outside a container."""
    match = _CONTAINER_FILE.search(mountinfo)
    return match.group(1) if match else None


def device_name(hostname: str, container: str | None) -> str:
    """The hostname, plus the container's short id when it is not already the hostname."""
    if container is None or hostname == container[:12]:
        return hostname
    return f"{hostname}-{container[:12]}"


def resolve_name(name: str, mountinfo: Path = MOUNTINFO) -> str:
    """--name as given, or for 'auto' this host's (and container's) name."""
    if name != AUTO:
        return name
    try:
        text = mountinfo.read_text()
    except OSError:
        text = ""
    return device_name(socket.gethostname(), container_id(text))


def state_dir_for(template: str, name: str) -> Path:
    """--state-dir with '{name}' expanded."""
    return Path(template.replace("{name}", name))
