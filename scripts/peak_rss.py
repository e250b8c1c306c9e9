"""Peak resident memory of a command and every process it starts, by role (issue 12's measurement).

    python scripts/peak_rss.py --json out.json -- driftsync replay ...

Polls /proc every 0.2 s for the command's process tree and keeps each process's VmHWM (the
kernel's own peak-RSS high-water mark, so a peak between two polls is not missed; only the last
0.2 s of a process's life can be). A process's role is its `driftsync` subcommand (replay, serve,
device), else its program name. Linux only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _children() -> dict[int, int]:
    """pid -> parent pid for every process visible now."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(text.rsplit(")", 1)[1].split()[1])
    return parents


def _role(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if "driftsync" in argv:
        rest = argv[argv.index("driftsync") + 1:]
        words = [w for w in rest if not w.startswith("-")]
        return words[0] if words else "driftsync"
    return Path(argv[0]).name if argv and argv[0] else None


def _hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(command: list[str], interval: float = 0.2) -> dict:
    started = time.monotonic()
    process = subprocess.Popen(command)
    peaks: dict[int, tuple[str, int]] = {}
    while True:
        parents = _children()
        tree, frontier = {process.pid}, [process.pid]
        while frontier:
            parent = frontier.pop()
            for pid, ppid in parents.items():
                if ppid == parent and pid not in tree:
                    tree.add(pid)
                    frontier.append(pid)
        for pid in tree:
            hwm, role = _hwm_kb(pid), _role(pid)
            if hwm is not None and role is not None:
                peaks[pid] = (role, max(hwm, peaks.get(pid, (role, 0))[1]))
        if process.poll() is not None:
            break
        time.sleep(interval)
    by_role: dict[str, dict] = {}
    for role, kb in peaks.values():
        entry = by_role.setdefault(role, {"processes": 0, "peak_rss_mb": 0.0})
        entry["processes"] += 1
        entry["peak_rss_mb"] = max(entry["peak_rss_mb"], round(kb / 1024, 1))
    return {"returncode": process.returncode, "seconds": round(time.monotonic() - started, 1), "roles": by_role}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --")
    result = measure(command)
    text = json.dumps(result, indent=1)
    print(text, file=sys.stderr)
    if args.json:
        args.json.write_text(text)
    return result["returncode"]


if __name__ == "__main__":
    raise SystemExit(main())
