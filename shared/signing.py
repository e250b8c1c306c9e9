"""What the server signs and how a device checks it: Ed25519 over a canonical encoding.

A statement is a plain dict; its canonical encoding is msgpack with every map's
keys sorted, so signer and verifier agree byte for byte. Each statement names its
kind, the key that signed it and a validity window, so a signature for one thing
(a delta for device A, a model file) can never pass for another, nor be replayed
after it expires. Torch-free: the device imports this, the server signs with it.
"""
from __future__ import annotations

import hashlib
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from shared.protocol import (
    Delta,
    KeyRotation,
    ModelDescriptor,
    RegisterResponse,
    Signature,
)

SIGNATURE_HEADER = "X-DriftSync-Signature"  # a model file's Signature, as JSON


class SignatureRefused(ValueError):
    """reason: unsigned, unknown_key, bad_signature, expired or unsigned_key_change."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_sorted(v) for v in value]
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        return value
    raise TypeError(f"a signed statement holds plain values only, not {type(value).__name__}")


def canonical(statement: dict[str, Any]) -> bytes:
    return msgpack.packb(_sorted(statement), use_bin_type=True)


def fingerprint(public_key_hex: str) -> str:
    """SHA-256 of the raw public key: what an operator compares and `--server-key-fingerprint` takes."""
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()


def public_key_hex(private: Ed25519PrivateKey) -> str:
    return private.public_key().public_bytes_raw().hex()


def sign(private: Ed25519PrivateKey, kind: str, fields: dict[str, Any], issued_at: float, ttl_s: float) -> Signature:
    meta = {"key_id": fingerprint(public_key_hex(private)), "issued_at": float(issued_at),
            "expires_at": float(issued_at + ttl_s)}
    value = private.sign(canonical(fields | meta | {"kind": kind})).hex()
    return Signature(**meta, value=value)


def verify(public_hex: str, kind: str, fields: dict[str, Any], signature: Signature | None,
           now: float | None) -> None:
    """Raise SignatureRefused unless `signature` is the pinned key's over exactly these fields.
    `now=None` skips the expiry check: for what the device verified once and keeps on its disk."""
    if signature is None:
        raise SignatureRefused("unsigned", f"{kind} carries no signature")
    if signature.key_id != fingerprint(public_hex):
        raise SignatureRefused("unknown_key", f"{kind} signed by key {signature.key_id[:12]}, not the pinned one")
    meta = {"key_id": signature.key_id, "issued_at": signature.issued_at, "expires_at": signature.expires_at}
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(
            bytes.fromhex(signature.value), canonical(fields | meta | {"kind": kind}))
    except InvalidSignature:
        raise SignatureRefused("bad_signature", f"{kind} does not match its signature") from None
    if now is not None and not signature.issued_at - 300 <= now < signature.expires_at:  # 5 min of clock skew
        raise SignatureRefused("expired", f"{kind} valid {signature.issued_at:.0f}..{signature.expires_at:.0f}, now {now:.0f}")


# -- the statements ---------------------------------------------------------------------
def delta_fields(delta: Delta) -> dict[str, Any]:
    """Cohort, both versions, the payload digest, the device it is for and, for a move, where from."""
    return delta.model_dump(include={"cohort", "base_version", "new_version", "created_at", "newest_upload_at",
                                     "sha256", "device_id", "moved_from", "protocol_version"})


def descriptor_fields(model: ModelDescriptor) -> dict[str, Any]:
    """The descriptor with its parameters as an ordered list: the norm file is split in that order."""
    dumped = model.model_dump()
    dumped["parameters"] = [[name, list(shape)] for name, shape in model.parameters.items()]
    return dumped


def enrolment_fields(reply: RegisterResponse) -> dict[str, Any]:
    return {"device_id": reply.device_id, "cohort": reply.cohort, "version": reply.version,
            "server_key": reply.server_key, "model": descriptor_fields(reply.model)}


def model_file_fields(part: str, sha256: str) -> dict[str, Any]:
    return {"part": part, "sha256": sha256}


def rotation_fields(old_key: str, new_key: str, issued_at: float) -> dict[str, Any]:
    return {"kind": "key_rotation", "old_key": old_key, "new_key": new_key, "issued_at": float(issued_at)}


def sign_rotation(old: Ed25519PrivateKey, new_key: str, issued_at: float) -> KeyRotation:
    old_key = public_key_hex(old)
    value = old.sign(canonical(rotation_fields(old_key, new_key, issued_at))).hex()
    return KeyRotation(old_key=old_key, new_key=new_key, issued_at=issued_at, signature=value)


def follow_rotations(pinned_hex: str, current_hex: str, rotations: list[KeyRotation]) -> str:
    """The key a device pinned to `pinned_hex` may trust now: `current_hex`, when a chain of
    rotations each signed by the key before it leads there. Anything else is refused."""
    key = pinned_hex
    for rotation in rotations:
        if rotation.old_key != key:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(key)).verify(
                bytes.fromhex(rotation.signature), canonical(rotation_fields(key, rotation.new_key, rotation.issued_at)))
        except InvalidSignature:
            raise SignatureRefused("unsigned_key_change", f"rotation from {fingerprint(key)[:12]} is not signed by it") from None
        key = rotation.new_key
    if key != current_hex:
        raise SignatureRefused("unsigned_key_change",
                               f"no signed rotation leads from the pinned key {fingerprint(pinned_hex)[:12]} "
                               f"to the server's key {fingerprint(current_hex)[:12]}")
    return key
