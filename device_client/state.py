"""What a device keeps across restarts: identity, the verified model, the last applied delta.

Every write is atomic (temp file + rename), so a kill at any moment leaves
either the old or the new file, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel

from device_client.transport import server_urls
from shared.codec import CodecError, decode, pack
from shared.protocol import Delta, ModelDescriptor


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Identity(BaseModel):
    server: str
    device_id: str
    token: str
    cohort: str
    model: ModelDescriptor
    server_key: str | None = None  # the server's Ed25519 public key (hex), pinned at enrolment


class DeviceStateDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def _identity(self) -> Path:
        return self.root / "identity.json"

    @property
    def _delta(self) -> Path:
        return self.root / "applied_delta.msgpack"

    def load_identity(self, server: str) -> Identity | None:
        """An identity for another server is ignored: the device re-registers."""
        if not self._identity.exists():
            return None
        identity = Identity.model_validate_json(self._identity.read_text())
        return identity if identity.server == ",".join(server_urls(server)) else None

    def save_identity(self, identity: Identity) -> None:
        atomic_write(self._identity, identity.model_dump_json(indent=2).encode())

    def model_file(self, part: str) -> Path:
        return self.root / "model" / part

    def save_model_file(self, part: str, data: bytes) -> None:
        atomic_write(self.model_file(part), data)

    def load_delta(self) -> Delta | None:
        if not self._delta.exists():
            return None
        try:
            return decode(self._delta.read_bytes(), Delta)
        except CodecError:
            return None

    def save_delta(self, delta: Delta) -> None:
        atomic_write(self._delta, pack(delta))

    def write_json(self, name: str, obj: dict) -> None:
        atomic_write(self.root / name, json.dumps(obj, indent=2).encode())
