"""The server's Ed25519 signing key: created on first start, kept in its state, rotatable.

The key and the chain of rotations are one small msgpack blob behind a load/save
pair, so where it lives (a 0600 file today, a shared store for API replicas) is
the caller's choice. A rotation makes a new key and signs it with the old one:
pinned devices follow it, and never an unsigned key change.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.store import Store
from shared.codec import CodecError, pack, unpack
from shared.protocol import KeyRotation, Signature, SigningKeyInfo
from shared.signing import fingerprint, public_key_hex, sign, sign_rotation

log = logging.getLogger("driftsync.server.signing")
KEY_FILE_MODE = 0o600
SIGNING_KEY_BLOB = "signing-key"


class Signer:
    def __init__(self, private: Ed25519PrivateKey, rotations: list[KeyRotation] | None = None) -> None:
        self._private = private
        self.rotations = list(rotations or [])
        self.public_hex = public_key_hex(private)

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, kind: str, fields: dict[str, Any], ttl_s: float) -> Signature:
        return sign(self._private, kind, fields, time.time(), ttl_s)

    def key_info(self) -> SigningKeyInfo:
        return SigningKeyInfo(key=self.public_hex, fingerprint=fingerprint(self.public_hex), rotations=self.rotations)

    def rotated(self) -> Signer:
        """A new key, announced by a rotation that the current key signs."""
        new = Ed25519PrivateKey.generate()
        rotation = sign_rotation(self._private, public_key_hex(new), time.time())
        return Signer(new, self.rotations + [rotation])

    def dump(self) -> bytes:
        return pack({"private_key": self._private.private_bytes_raw(),
                     "rotations": [r.model_dump() for r in self.rotations]})

    @classmethod
    def load(cls, blob: bytes) -> Signer:
        try:
            obj = unpack(blob)
            return cls(Ed25519PrivateKey.from_private_bytes(obj["private_key"]),
                       [KeyRotation.model_validate(r) for r in obj["rotations"]])
        except (CodecError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the stored signing key is unreadable: {exc}") from exc


def load_or_create_signing_key(load: Callable[[], bytes | None], save: Callable[[bytes], None], *,
                               rotate: bool = False, create: Callable[[bytes], None] | None = None) -> Signer:
    """The stored key (made and saved when there is none), rotated first when asked. `create`
    saves a new key only if none is there yet (default: `save`)."""
    blob = load()
    if blob is None:
        (create or save)(Signer.generate().dump())
        signer = Signer.load(load() or b"")  # of replicas creating one at the same moment, the first won
        log.info("created a signing key, fingerprint %s", fingerprint(signer.public_hex))
        return signer
    signer = Signer.load(blob)
    if rotate:
        old = fingerprint(signer.public_hex)
        signer = signer.rotated()
        save(signer.dump())
        log.warning("rotated the signing key %s -> %s; devices follow the signed rotation",
                    old[:16], fingerprint(signer.public_hex)[:16])
    log.info("signing key fingerprint %s", fingerprint(signer.public_hex))
    return signer


def kept_signer(store: Store, state_dir: Path, *, shared: bool, rotate: bool = False) -> Signer:
    """The server's key: a 0600 file beside a single server, the shared store when API replicas
    (behind a broker) must all sign with one key."""
    if shared:
        load, save = store_key(store)
        return load_or_create_signing_key(load, save, rotate=rotate,
                                          create=lambda blob: store.put_blob(SIGNING_KEY_BLOB, blob, replace=False))
    return load_or_create_signing_key(*key_file(state_dir / "signing_key"), rotate=rotate)


def store_key(store: Store) -> tuple[Callable[[], bytes | None], Callable[[bytes], None]]:
    """load/save in the shared store, so every API replica signs with the same key."""
    return (lambda: store.get_blob(SIGNING_KEY_BLOB)), (lambda blob: store.put_blob(SIGNING_KEY_BLOB, blob))


def key_file(path: Path) -> tuple[Callable[[], bytes | None], Callable[[bytes], None]]:
    """load/save for a key kept in a file only its owner can read."""

    def load() -> bytes | None:
        return path.read_bytes() if path.exists() else None

    def save(blob: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, KEY_FILE_MODE)
        os.replace(tmp, path)

    return load, save
