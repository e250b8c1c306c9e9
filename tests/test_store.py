"""One suite, both backends: the SQLite file and a real throwaway PostgreSQL (tests/postgres_service.py)."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from server.migrations import LATEST
from server.store import (
    Lease,
    LeaseLost,
    StoreError,
    StoreUnavailable,
    VersionConflict,
    VersionRecord,
    hash_token,
    open_store,
    upgrade,
)
from shared.tensors import Tensor, tensors_digest
from tests.test_no_torch import BLOCK_TORCH


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "store.sqlite")
    return request.getfixturevalue("postgres_db")


@pytest.fixture
def store(store_url):
    opened = open_store(store_url, migrate=True)
    yield opened
    opened.close()


def _record(cohort: str, version: int, value: float = 1.0) -> VersionRecord:
    params = {"w": Tensor.from_numpy(np.full(3, value, np.float32))}
    return VersionRecord(cohort, version, time.time(), 0.0, params, tensors_digest(params))


def _race(*calls):
    """Run the calls at the same moment in threads; each one's result or exception."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i, call):
        barrier.wait()
        try:
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 - the race's loser is the point
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_devices_keep_only_the_token_hash(store) -> None:
    record, token = store.add_device("cam-1", "north")
    solo, _ = store.add_device("cam-2", None)
    assert store.device_for_token(token) == record and store.device_for_token(token + "x") is None
    assert [row[0] for row in store._query("SELECT token_hash FROM devices ORDER BY created_at")][0] == hash_token(token)
    assert all(token not in str(row) for row in store._query("SELECT * FROM devices"))
    assert solo.cohort.startswith("device-") and store.devices() == [record, solo]
    assert store.move_device(record.device_id, "south").cohort == "south"
    assert store.set_may_upload(record.device_id, False).may_upload is False
    assert store.device_for_token(token).may_upload is False
    assert store.move_device("nobody", "x") is None and store.device("nobody") is None


def test_devices_unseen_for_too_long_expire_and_their_tokens_stop_working(store) -> None:
    stale, stale_token = store.add_device("replica-gone", None)
    fresh, fresh_token = store.add_device("replica-live", None)
    assert stale.last_seen_at == stale.created_at > 0
    later = time.time() + 100
    store.touch_device(fresh.device_id, later)
    store.touch_device(fresh.device_id, later - 50)  # a racing replica's older time does not move it back
    assert store.device(fresh.device_id).last_seen_at == later
    assert store.expire_devices(later - 10) == [stale.device_id]
    assert store.device_for_token(stale_token) is None and store.device(stale.device_id) is None
    assert [d.device_id for d in store.devices()] == [fresh.device_id]
    assert store.device_for_token(fresh_token).last_seen_at == later
    assert store.expire_devices(later - 10) == []  # nothing left to expire: nothing removed


def test_the_own_cohorts_of_gone_devices_are_removed_once_idle(store) -> None:
    """What an expired device's own cohort holds (state, versions, stored uploads) goes once idle;
    a live device's own cohort (also one the operator moved it out of), a shared cohort and the
    event log stay."""
    gone, _ = store.add_device("gone", None)
    live, _ = store.add_device("live", None)
    member, _ = store.add_device("member", "lab")
    moved, _ = store.add_device("moved", None)
    for record in (gone, live, member, moved):
        upload = store.add_upload(record.cohort, record.device_id, b"body", 4)
        store.commit(record.cohort, _record(record.cohort, 1), b"state", {upload: 1}, learnt=0)
    store.add_event(gone.cohort, "rollback", "to v1")
    later = time.time() + 100
    for record in (live, moved):
        store.touch_device(record.device_id, later)
    store.move_device(moved.device_id, "south")  # its own cohort keeps its state: it may be moved back
    assert store.expire_devices(later - 10) == sorted([gone.device_id, member.device_id])
    assert store.remove_orphaned_cohorts(idle_since=0.0) == []  # a version and an upload since: not idle
    assert store.remove_orphaned_cohorts(idle_since=later) == [gone.cohort]
    assert store.load_state(gone.cohort) is None and store.latest_version(gone.cohort) is None
    assert store.accepted_samples(gone.cohort) == 0 and store.learnt_samples(gone.cohort) == 0
    assert {u.cohort for u in store.pending_uploads()} == {live.cohort, "lab", moved.cohort}
    for cohort in (live.cohort, "lab", moved.cohort):
        assert store.load_state(cohort) == b"state" and store.version_number(cohort) == 1
    assert [(e.cohort, e.kind) for e in store.events()] == [(gone.cohort, "rollback")]
    assert store.remove_orphaned_cohorts(idle_since=later) == []
    store.commit(gone.cohort, _record(gone.cohort, 1), b"late")  # a step that was under way
    assert store.remove_orphaned_cohorts(idle_since=later - 200) == []  # its version is recent
    assert store.remove_orphaned_cohorts(idle_since=later) == [gone.cohort]

def test_a_version_must_be_the_next_one(store) -> None:
    assert store.commit("c", _record("c", 1), b"s1") == 0
    with pytest.raises(VersionConflict):
        store.commit("c", _record("c", 3), b"gap")
    with pytest.raises(VersionConflict):
        store.commit("c", _record("c", 1, 9.0), b"duplicate")
    assert store.version_number("c") == 1 and store.load_state("c") == b"s1"
    store.commit("c", _record("c", 2, 2.0))  # no state: the stored one stays
    latest = store.latest_version("c")
    assert latest.version == 2 and latest.params["w"].to_numpy().tolist() == [2.0] * 3
    assert latest.sha256 == _record("c", 2, 2.0).sha256 and store.load_state("c") == b"s1"
    assert store.version("c", 7) is None and store.latest_version("other") is None


def test_two_publishers_racing_for_the_same_version_exactly_one_wins(store_url) -> None:
    a, b = open_store(store_url, migrate=True), open_store(store_url, migrate=True)
    try:
        for version in range(1, 9):
            results = _race(lambda: a.commit("c", _record("c", version, 1.0)),
                            lambda: b.commit("c", _record("c", version, 2.0)))
            assert sorted(type(r).__name__ for r in results) == ["VersionConflict", "int"], results
        assert a.version_number("c") == b.version_number("c") == 8
    finally:
        a.close()
        b.close()


def test_old_versions_are_pruned(store_url) -> None:
    store = open_store(store_url, migrate=True, keep_versions=2)
    try:
        for version in range(1, 5):
            store.commit("c", _record("c", version))
        assert [store.version("c", v) is not None for v in range(1, 5)] == [False, False, True, True]
    finally:
        store.close()


def test_a_commit_that_raises_writes_nothing(store) -> None:
    upload = store.add_upload("c", "d", b"body", 4)
    store.commit("c", _record("c", 1), b"s1")
    with pytest.raises(VersionConflict):
        store.commit("c", _record("c", 1), b"s2", {upload: 4}, learnt=3)
    assert store.unlearnt_upload(upload) == (4, b"body") and store.learnt_samples("c") == 0
    assert store.load_state("c") == b"s1" and store.version_number("c") == 1


def test_learnt_counts_every_upload_once_even_when_delivered_twice(store) -> None:
    first = store.add_upload("c", "d", b"one", 5)
    second = store.add_upload("c", "d", b"two", 3)
    assert store.accepted_samples("c") == 8 and store.unlearnt_upload(first) == (5, b"one")
    assert store.commit("c", consumed={first: 3}) == 3
    assert store.unlearnt_upload(first) == (2, b"one")  # what a broker message's worker reads
    assert store.commit("c", consumed={first: 3, second: 3}) == 5  # only 2 of `first` were left
    assert store.unlearnt_upload(first) is None and store.unlearnt_upload(second) is None  # learnt: acknowledged only
    assert store.commit("c", consumed={first: 5, second: 3}) == 0  # a duplicate delivery
    assert store.commit("c", consumed={}, learnt=4) == 4  # samples that came with no stored upload
    assert store.learnt_samples("c") == 12 and store.pending_uploads() == []
    third = store.add_upload("c", "d", b"three", 6)
    store.discard_upload(third)  # refused after all: neither accepted nor pending
    assert store.accepted_samples("c") == 8 and store.unlearnt_upload(third) is None
    store.discard_upload(third)  # twice is harmless
    assert store.accepted_samples("c") == 8


def test_pending_uploads_by_partition(store) -> None:
    ids = [store.add_upload(f"c{p}", "d", bytes([p]) * 3, 2, partition=p) for p in (0, 1, 1, 2)]
    assert [u.upload_id for u in store.pending_uploads(1)] == ids[1:3]
    assert [u.partition for u in store.pending_uploads()] == [0, 1, 1, 2]
    [only] = store.pending_uploads(2)
    assert (only.cohort, only.body, only.remaining) == ("c2", b"\x02\x02\x02", 2)
    assert store.pending_uploads(7) == []


def test_pending_uploads_skip_what_a_worker_holds_and_stop_at_its_room(store) -> None:
    ids = [store.add_upload("c", "d", bytes([i]) * 3, 4, partition=1) for i in range(5)]
    assert [u.upload_id for u in store.pending_uploads(1, exclude={ids[0], ids[2]})] == [ids[1], ids[3], ids[4]]
    assert [u.upload_id for u in store.pending_uploads(1, exclude={ids[0]}, max_samples=8)] == [ids[1], ids[2]]
    assert store.pending_uploads(1, max_samples=0) == []


def test_leases_fence_a_worker_that_lost_its_partition(store) -> None:
    upload = store.add_upload("c", "d", b"x", 4, partition=3)
    mine = store.acquire_lease(3, "w1", 1.0)
    assert mine.epoch == 1 and mine.expires_at > time.time() - 5
    assert store.acquire_lease(3, "w2", 30) is None  # held
    again = store.acquire_lease(3, "w1", 1.0)
    assert again.epoch == 1 and again.expires_at >= mine.expires_at  # the holder renews: same epoch
    assert store.commit("c", _record("c", 1), consumed={upload: 1}, lease=again) == 1
    time.sleep(1.2)
    assert store.renew_lease(again, 30) is None  # expired
    theirs = store.acquire_lease(3, "w2", 30)
    assert theirs.epoch == 2  # a takeover bumps the epoch
    with pytest.raises(LeaseLost):
        store.commit("c", _record("c", 2), b"late", {upload: 3}, lease=again)
    assert store.version_number("c") == 1 and store.unlearnt_upload(upload)[0] == 3 and store.load_state("c") is None
    renewed = store.renew_lease(theirs, 60)
    assert renewed.epoch == 2 and renewed.expires_at > theirs.expires_at
    store.release_lease(again)  # not ours any more: nothing happens
    assert store.acquire_lease(3, "w3", 30) is None
    store.release_lease(renewed)
    with pytest.raises(LeaseLost):
        store.commit("c", consumed={upload: 3}, lease=renewed)  # released is lost too
    assert store.acquire_lease(3, "w3", 30).epoch == 3
    store.acquire_lease(5, "w1", 30)
    assert [(lease.partition, lease.owner, lease.epoch) for lease in store.leases()] == [(3, "w3", 3), (5, "w1", 1)]


def test_a_lease_takeover_race_has_one_winner(store_url) -> None:
    a, b = open_store(store_url, migrate=True), open_store(store_url, migrate=True)
    try:
        for partition in range(6):
            results = _race(lambda: a.acquire_lease(partition, "w1", 30), lambda: b.acquire_lease(partition, "w2", 30))
            assert sum(isinstance(r, Lease) for r in results) == 1 and None in results, results
    finally:
        a.close()
        b.close()


def test_heartbeats_name_the_live_workers(store) -> None:
    store.worker_heartbeat("w-b", 30)
    store.worker_heartbeat("w-a", 30)
    store.worker_heartbeat("w-gone", 1.0)
    assert store.live_workers() == ["w-a", "w-b", "w-gone"]
    time.sleep(1.2)
    assert store.live_workers() == ["w-a", "w-b"]
    store.worker_heartbeat("w-gone", 30)  # back
    assert store.live_workers() == ["w-a", "w-b", "w-gone"]


def test_blobs(store) -> None:
    model = np.random.default_rng(0).integers(0, 256, 3 << 20, np.uint8).tobytes()
    assert store.get_blob("model.onnx") is None
    store.put_blob("model.onnx", model)
    assert store.get_blob("model.onnx") == model
    store.put_blob("model.onnx", b"\x00v2")
    assert store.get_blob("model.onnx") == b"\x00v2"
    store.put_blob("key", b"first", replace=False)
    store.put_blob("key", b"second", replace=False)  # a replica that raced the first keeps its key
    assert store.get_blob("key") == b"first"


def test_events_and_frozen_cohorts(store) -> None:
    for i in range(5):
        store.add_event("c", "withheld", f"step {i}")
    events = store.events(limit=3)
    assert [e.detail for e in events] == ["step 4", "step 3", "step 2"] and events[0].at > time.time() - 60
    store.set_frozen("b", True)
    store.set_frozen("a", True)
    store.set_frozen("b", False)
    assert store.frozen_cohorts() == ["a"]


def test_a_fresh_store_is_migrated_once(store_url) -> None:
    first = open_store(store_url, migrate=True)
    assert first.applied_migrations == list(range(1, LATEST + 1)) and first.schema_version() == LATEST
    device, token = first.add_device("d", "c")
    first.close()
    again = open_store(store_url, migrate=True)
    assert again.applied_migrations == [] and again.schema_version() == LATEST
    assert again.device_for_token(token) == device
    again.close()
    assert upgrade(store_url) == (LATEST, [])


def test_two_upgrades_at_once_apply_each_migration_once(store_url) -> None:
    results = _race(lambda: upgrade(store_url), lambda: upgrade(store_url))
    assert all(isinstance(r, tuple) for r in results), results
    assert [r[0] for r in results] == [LATEST, LATEST]
    assert sorted(results[0][1] + results[1][1]) == list(range(1, LATEST + 1))


def test_a_schema_that_is_behind_is_refused_without_migrate(store_url) -> None:
    with pytest.raises(StoreError, match=r"version 0, .* needs %d: run `driftsync db upgrade --store " % LATEST):
        open_store(store_url, migrate=False)
    open_store(store_url, migrate=True).close()
    open_store(store_url, migrate=False).close()


# the schema before migrations existed (the last commit without server/migrations.py), without may_upload
LEGACY_SCHEMA = """
CREATE TABLE devices (device_id TEXT PRIMARY KEY, name TEXT NOT NULL, cohort TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
CREATE TABLE versions (cohort TEXT NOT NULL, version INTEGER NOT NULL, created_at REAL NOT NULL,
    newest_upload_at REAL NOT NULL, params BLOB NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (cohort, version));
CREATE TABLE cohort_state (cohort TEXT PRIMARY KEY, state BLOB, learnt INTEGER NOT NULL DEFAULT 0,
    accepted INTEGER NOT NULL DEFAULT 0, frozen INTEGER NOT NULL DEFAULT 0);
CREATE TABLE events (event_id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, cohort TEXT NOT NULL,
    kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE uploads (upload_id INTEGER PRIMARY KEY AUTOINCREMENT, cohort TEXT NOT NULL, device_id TEXT NOT NULL,
    received_at REAL NOT NULL, remaining INTEGER NOT NULL, body BLOB NOT NULL);
"""


@pytest.mark.parametrize("with_may_upload", [False, True])
def test_a_sqlite_file_from_before_migrations_is_adopted_with_its_rows(tmp_path, with_may_upload) -> None:
    from shared.codec import pack

    path = tmp_path / "state.sqlite"
    legacy = sqlite3.connect(path)
    legacy.executescript(LEGACY_SCHEMA)
    if with_may_upload:
        legacy.execute("ALTER TABLE devices ADD COLUMN may_upload INTEGER NOT NULL DEFAULT 1")
    record = _record("north", 4)
    legacy.execute("INSERT INTO devices (device_id, name, cohort, token_hash, created_at) VALUES (?, ?, ?, ?, ?)",
                   ("dev1", "cam", "north", hash_token("secret"), 1.0))
    legacy.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                   ("north", 4, 2.0, 1.5, pack({k: v.model_dump() for k, v in record.params.items()}), record.sha256))
    legacy.execute("INSERT INTO cohort_state VALUES ('north', x'0102', 40, 45, 1)")
    legacy.execute("INSERT INTO events (at, cohort, kind, detail) VALUES (3.0, 'north', 'frozen', 'by an operator')")
    legacy.execute("INSERT INTO uploads (cohort, device_id, received_at, remaining, body) VALUES ('north', 'dev1', 4.0, 5, x'ff')")
    legacy.commit()
    legacy.close()

    with pytest.raises(StoreError, match="driftsync db upgrade"):
        open_store(str(path), migrate=False)
    store = open_store(f"sqlite:///{path}", migrate=True)
    try:
        assert store.applied_migrations == list(range(1, LATEST + 1))
        assert store.device_for_token("secret").may_upload is True
        assert store.latest_version("north").sha256 == record.sha256 and store.version_number("north") == 4
        assert (store.load_state("north"), store.learnt_samples("north"), store.accepted_samples("north")) == (b"\x01\x02", 40, 45)
        assert store.frozen_cohorts() == ["north"] and store.events()[0].detail == "by an operator"
        [upload] = store.pending_uploads(0)
        assert (upload.remaining, upload.body, upload.partition) == (5, b"\xff", 0)
        assert store.commit("north", _record("north", 5), consumed={upload.upload_id: 5}) == 5
        assert store.add_upload("north", "dev1", b"new", 1) == upload.upload_id + 1
    finally:
        store.close()


def test_db_upgrade_command_prints_one_line_and_imports_no_torch(store_url) -> None:
    code = BLOCK_TORCH + ("from driftsync.cli import main\nraise SystemExit(main(['--log-level', 'warning', 'db', "
                          f"'upgrade', '--store', {store_url!r}]))\n")
    outputs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert outputs == [f"schema at version {LATEST} (applied: {', '.join(map(str, range(1, LATEST + 1)))})\n",
                       f"schema at version {LATEST} (applied: none, already up to date)\n"]


def test_an_unknown_store_url_is_refused(tmp_path) -> None:
    with pytest.raises(StoreError, match="unsupported store URL 'mysql://h/db'"):
        open_store("mysql://h/db", migrate=True)
    with pytest.raises(StoreError, match="cannot open the SQLite store"):
        open_store(str(tmp_path), migrate=True)  # a directory


def test_an_unreachable_postgres_is_refused_at_once_and_without_its_password() -> None:
    from driftsync.processes import free_port

    pytest.importorskip("psycopg", reason="psycopg not installed: pip install 'driftsync[scale]'")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unavailable: .*refused") as refused:
        open_store(f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/db", migrate=True)
    assert time.monotonic() - started < 5 and "hunter2" not in str(refused.value) and ":***@" in str(refused.value)


def test_postgres_keeps_synchronous_commit_on(postgres_db) -> None:
    store = open_store(postgres_db, migrate=True)
    try:
        assert store._query("SHOW synchronous_commit") == [("on",)]
    finally:
        store.close()


def test_postgres_down_is_unavailable_fast_and_a_restart_is_reconnected(postgres_service, postgres_db) -> None:
    store = open_store(postgres_db, migrate=True)
    try:
        device, token = store.add_device("d", "c")
        postgres_service.stop()
        for call in (lambda: store.device_for_token(token), lambda: store.add_upload("c", "d", b"x", 1),
                     lambda: open_store(postgres_db, migrate=False)):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="unavailable"):
                call()
            assert time.monotonic() - started < 10
        postgres_service.start()
        assert store.device_for_token(token) == device  # the pool replaced its dead connections
        assert store.add_upload("c", "d", b"x", 1) > 0
        postgres_service.restart()  # clients disconnected while the pool holds idle connections
        assert [u.body for u in store.pending_uploads()] == [b"x"]
    finally:
        if not postgres_service.running():
            postgres_service.start()
        store.close()
