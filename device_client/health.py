"""The container healthcheck of a device: is this replica's own status file fresh and running?
Stdlib only, so the check costs milliseconds every few seconds."""
from __future__ import annotations

import json
from pathlib import Path

STALE_AFTER_S = 60.0  # the status file is rewritten every 2 s while the device runs


def status_problem(path: Path, now: float, max_age_s: float = STALE_AFTER_S) -> str | None:
    """Why the device behind this status file is not healthy; None when it is."""
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        return f"no status file at {path} (not started yet, or another replica's directory)"
    except (OSError, ValueError) as exc:
        return f"unreadable status file {path}: {exc}"
    if not isinstance(status, dict):
        return f"{path} is not a status object"
    if status.get("state") != "running":
        return f"device state is {status.get('state')!r}, not 'running'"
    updated = status.get("updated_at")
    if not isinstance(updated, (int, float)) or now - updated > max_age_s:
        return f"status not updated for {max_age_s:.0f} s or more"
    return None
