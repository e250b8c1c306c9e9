"""What a device accepts from its server: enrolments and deltas signed by the key it pinned.

The key is pinned at enrolment (trust on first use) or checked against the fingerprint
the operator gave. A delta must be signed for this device, unexpired, and a cohort
change must be signed as a move from the cohort the device is in, issued after the
delta it holds: a captured delta cannot roll a device back by moving it.
"""
from __future__ import annotations

from shared.protocol import Delta, RegisterResponse, Signature
from shared.signing import (
    SignatureRefused,
    delta_fields,
    enrolment_fields,
    fingerprint,
    verify,
)


def check_key(key: str, expected_fingerprint: str | None) -> str:
    if expected_fingerprint and fingerprint(key) != expected_fingerprint.strip().lower():
        raise SignatureRefused("key_mismatch", f"the server's key {fingerprint(key)[:16]} is not the one "
                                               f"--server-key-fingerprint names ({expected_fingerprint[:16]})")
    return key


def check_enrolment(reply: RegisterResponse, pinned: str | None, expected_fingerprint: str | None,
                    now: float) -> str:
    """The key to pin (or keep): the reply must be signed by it, and it must be the pinned one."""
    if reply.server_key is None:
        raise SignatureRefused("unsigned", "the server sent no signing key")
    key = check_key(reply.server_key, expected_fingerprint)
    if pinned is not None and key != pinned:
        raise SignatureRefused("unknown_key", "the enrolment names another key than the pinned one")
    verify(key, "enrolment", enrolment_fields(reply), reply.signature, now)
    return key


def check_delta(delta: Delta, key: str, device_id: str, cohort: str, held: Signature | None, now: float) -> None:
    """Raise SignatureRefused unless `delta` is signed for this device, unexpired, and, when it
    names another cohort, a signed move from `cohort` issued after the delta held now."""
    verify(key, "delta", delta_fields(delta), delta.signature, now)
    if delta.device_id != device_id:
        raise SignatureRefused("wrong_device", f"signed for device {delta.device_id}, not {device_id}")
    if delta.cohort == cohort:
        return
    if delta.moved_from != cohort:
        raise SignatureRefused("unsigned_move", f"names cohort {delta.cohort} but is not a move from {cohort}")
    if held is not None and delta.signature is not None and delta.signature.issued_at <= held.issued_at:
        raise SignatureRefused("stale", "a move issued before the delta the device holds")
