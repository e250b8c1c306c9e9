"""Scale-out on real redis-server and PostgreSQL: API replicas (run with torch blocked) and
adaptation workers as separate processes, with the faults the issue names.

Every load is bounded in time and runs on loopback.
"""
from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time

import httpx
import pytest

from driftsync.loadtest import LoadOptions, run_load
from driftsync.topology import Topology
from server.queueing import StoredJob, partition_of
from tests.conftest import wait_for

ADMIN = "scale-admin-token-0123456789"
PARTITIONS = 8
# API replicas run with torch (and onnx) blocked: they must serve without them
NO_TORCH = "import sys\nfor m in ('torch', 'onnx'): sys.modules[m] = None\nfrom driftsync.cli import main\nsys.exit(main())\n"


def test_broker_redelivers_what_a_dead_worker_read_but_never_acked(redis_url) -> None:
    from server.broker_redis import RedisBroker

    front = RedisBroker(redis_url, PARTITIONS, max_jobs_per_partition=2)
    first, second = (RedisBroker(redis_url, PARTITIONS, consumer=name) for name in ("w1", "w2"))
    p = partition_of("site", PARTITIONS)
    assert front.offer(StoredJob(1, "site", "dev", 1.0, p))
    assert front.offer(StoredJob(2, "site", "dev", 2.0, p))
    assert not front.offer(StoredJob(3, "site", "dev", 3.0, p))  # the partition is full: the front says 429
    first.hold(p)
    job = first.take(1.0)
    assert job is not None and job.upload_id == 1 and job.cohort == "site" and job.receipt
    import redis as redis_client  # the message names the upload; its body stays in the store
    fields = redis_client.Redis.from_url(redis_url).xrange(f"driftsync:uploads:{p}")[0][1]
    assert set(fields) == {b"kind", b"upload_id", b"cohort", b"device_id", b"received_at", b"partition"}
    # w1 dies without acking; w2 takes the partition over and is handed both messages, in order
    first.release(p)
    second.hold(p)
    again = [second.take(0.5), second.take(0.5)]
    assert [j.upload_id for j in again] == [1, 2] and again[0].receipt == job.receipt
    for j in again:
        second.ack(j)
    assert front.depth() == 0 or (time.sleep(0.6) or front.depth() == 0)
    assert second.take(0.1) is None


def test_announcements_reach_every_replica_board(redis_url) -> None:
    from server.broker_redis import RedisBroker
    from server.versions import VersionBoard

    broker, board, stop = RedisBroker(redis_url, PARTITIONS), VersionBoard(), threading.Event()
    broker.listen(board, stop)
    try:
        wait_for(lambda: broker.announce("north", 3) or board.latest("north") == 3, 10, "announcement")
        broker.announce("north", 2)  # late or repeated: versions never move back
        time.sleep(0.2)
        assert board.latest("north") == 3
    finally:
        stop.set()


@pytest.fixture
def topology(tmp_path, postgres_db, redis_url):
    topo = Topology(postgres_db, redis_url, tmp_path, common=[
        "--admin-token", ADMIN, "--partitions", str(PARTITIONS), "--step-max-wait-s", "0.3", "--step-min-samples", "4",
        "--torch-threads", "1", "--device-samples-per-s", "none",
    ], worker_args=["--lease-ttl-s", "5"], api_launcher=[sys.executable, "-c", NO_TORCH])
    topo.migrate()
    try:
        yield topo
    finally:
        topo.stop()


def _start(topo: Topology, apis: int = 2, workers: int = 2) -> None:
    for i in range(workers):
        topo.start("worker", f"worker-{i}")
    for i in range(apis):
        topo.start("api", f"api-{i}")
    if workers > 1:  # the first worker held every partition; it gives half back to the second
        wait_for(lambda: all(len(topo.partitions_of(w)) == PARTITIONS // workers for w in topo.workers()), 30,
                 "partitions shared evenly")


def _load(topo: Topology, devices: int, seconds: float, result: dict) -> threading.Thread:
    opts = LoadOptions(server=topo.api_urls(), devices=devices, duration_s=seconds, fps=16, batch=4,
                       settle_s=60, admin_token=ADMIN)
    thread = threading.Thread(target=lambda: result.update(asyncio.run(run_load(opts))), daemon=True)
    thread.start()
    return thread


def _versions_contiguous(store_url: str) -> dict[str, tuple[int, int, int]]:
    """Per cohort: lowest and highest stored version and how many there are (contiguous: count = hi - lo + 1)."""
    import psycopg

    with psycopg.connect(store_url) as conn:
        rows = conn.execute("SELECT cohort, MIN(version), MAX(version), COUNT(*) FROM versions GROUP BY cohort").fetchall()
    return {cohort: (lo, hi, n) for cohort, lo, hi, n in rows}


def _assert_nothing_lost(report: dict, devices: int) -> None:
    assert report["acked_samples"] > 0
    assert report["server_errors"] == 0, report
    assert report["accepted_samples_not_learnt"] == 0, report
    assert report["server_accepted_samples"] >= report["acked_samples"], report  # a lost reply may hide an accept
    assert report["converged_devices"] == devices, report


def test_api_replicas_and_workers_learn_every_accepted_sample(topology) -> None:
    _start(topology)
    result: dict = {}
    _load(topology, 8, 10, result).join(timeout=180)
    _assert_nothing_lost(result, 8)
    for lo, hi, n in _versions_contiguous(topology.store).values():
        assert n == hi - lo + 1  # versions advance one by one: never two v+1
    fleet = httpx.get(f"{topology.apis()[0].url}/v1/fleet", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert fleet["server"]["steps_total"] > 0  # the replicas see the workers' figures through the store


def test_kill_9_a_worker_mid_run_moves_its_partitions_and_loses_nothing(topology) -> None:
    _start(topology)
    result: dict = {}
    load = _load(topology, 8, 16, result)
    time.sleep(6)
    victim, survivor = topology.workers()
    topology.kill(victim)
    wait_for(lambda: len(topology.partitions_of(survivor)) == PARTITIONS, 30, "survivor holds every partition")
    load.join(timeout=240)
    _assert_nothing_lost(result, 8)
    for lo, hi, n in _versions_contiguous(topology.store).values():
        assert n == hi - lo + 1


def test_kill_9_an_api_replica_devices_fail_over(topology) -> None:
    _start(topology)
    result: dict = {}
    load = _load(topology, 8, 14, result)
    time.sleep(5)
    topology.kill(topology.apis()[0])
    load.join(timeout=240)
    assert result["failovers"] > 0
    _assert_nothing_lost(result, 8)


def test_postgres_then_redis_restart_under_load(topology, postgres_service, redis_service) -> None:
    _start(topology)
    result: dict = {}
    load = _load(topology, 6, 24, result)
    time.sleep(4)
    postgres_service.restart("immediate")  # a crash: no checkpoint, the WAL is replayed
    time.sleep(6)
    redis_service.restart()  # no persistence: every stream and the consumer group are gone
    load.join(timeout=300)
    _assert_nothing_lost(result, 6)


def test_a_stalled_worker_does_not_hold_up_other_partitions(topology) -> None:
    _start(topology)
    result: dict = {}
    load = _load(topology, 8, 16, result)
    time.sleep(5)
    stalled, running = topology.workers()
    admin = {"Authorization": f"Bearer {ADMIN}"}
    api = topology.apis()[0].url

    def versions() -> dict[str, int]:
        return {c["cohort"]: c["version"] for c in httpx.get(f"{api}/v1/fleet", headers=admin).json()["cohorts"]}

    # on a slow machine the leases may not have spread 5 s in: wait until the running worker owns a cohort
    wait_for(lambda: any(partition_of(c, PARTITIONS) in topology.partitions_of(running) for c in versions()),
             60, "a cohort on the running worker's partitions")
    stalled_parts = set(topology.partitions_of(stalled))
    topology.kill(stalled, signal.SIGSTOP)  # a long step, a GC pause: shorter than the lease
    try:
        before = versions()
        time.sleep(3)
        after = versions()
    finally:
        topology.kill(stalled, signal.SIGCONT)
    moved = {c for c in after if after[c] > before.get(c, 0)}
    others = {c for c in after if partition_of(c, PARTITIONS) not in stalled_parts}
    assert moved & others, "cohorts on the running worker's partitions advanced during the stall"
    assert not moved - others, "nothing published for the stalled worker's partitions"
    load.join(timeout=240)
    _assert_nothing_lost(result, 8)


def test_a_malformed_broker_message_is_dropped_and_the_partition_goes_on(redis_url) -> None:
    import redis as redis_client

    from server.broker_redis import RedisBroker

    front, worker = RedisBroker(redis_url, PARTITIONS), RedisBroker(redis_url, PARTITIONS, consumer="w1")
    p = partition_of("site", PARTITIONS)
    worker.hold(p)
    raw = redis_client.Redis.from_url(redis_url)
    raw.xadd(f"driftsync:uploads:{p}", {"kind": "upload", "upload_id": "not-a-number", "partition": str(p)})
    raw.xadd(f"driftsync:uploads:{p}", {"garbage": b"\xff\xfe"})
    assert front.offer(StoredJob(7, "site", "dev", 1.0, p))
    job = worker.take(1.0)
    assert job is not None and job.upload_id == 7  # the two foreign messages were skipped
    worker.ack(job)
    assert raw.xlen(f"driftsync:uploads:{p}") == 0  # and removed, not left pending
