"""Redis Streams as the broker between stateless API replicas and adaptation workers.

Uploads go to one of a fixed number of partition streams (`partition_of(cohort)`), so a
cohort's uploads stay in order on one stream. Workers read the streams of the partitions
they hold a lease on (server/leases.py) through one consumer group, and XACK a message
only once a committed version has learnt from it. A worker that takes over a partition
first XAUTOCLAIMs what its previous owner had read but not acknowledged. New versions are
announced on a pub/sub channel, so any API replica can end any device's long poll.

A message names its upload (id, cohort, device, partition: about 130 bytes) and carries no body:
the worker reads the body from the store, where the API wrote it before the 2xx. So a body leaves
an API replica once (to the store), not twice, and Redis holds no image data. Redis is not what
makes an upload durable: a message lost with Redis (a restart without persistence) is found
again by the worker's periodic re-read of the store, and a message for an upload already learnt
is skipped.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque

import redis

from server.queueing import BrokerUnavailable, ControlJob, Job, StoredJob, UploadJob
from server.versions import VersionBoard

log = logging.getLogger("driftsync.broker")
GROUP = "workers"
READ_BATCH = 64


class RedisBroker:
    def __init__(self, url: str, partitions: int, *, max_jobs_per_partition: int = 256, consumer: str = "",
                 prefix: str = "driftsync") -> None:
        self.url, self.partitions, self.consumer = url, partitions, consumer
        self.max_jobs = max_jobs_per_partition
        self._prefix = prefix
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10)
        self._held: set[int] = set()
        self._grouped: set[int] = set()
        self._buffer: deque[Job] = deque()
        self._lock = threading.Lock()
        self._depth_cache = (0.0, 0)
        self._listeners: list[tuple[threading.Event, threading.Thread]] = []

    def _stream(self, partition: int) -> str:
        return f"{self._prefix}:uploads:{partition}"

    @property
    def channel(self) -> str:
        return f"{self._prefix}:versions"

    # -- the API side -----------------------------------------------------------------------

    def offer(self, job: Job) -> bool:
        """False when the partition's stream is full (the front answers 429); raises
        BrokerUnavailable when Redis is away."""
        if isinstance(job, UploadJob):
            raise TypeError("a broker carries uploads by reference: offer a StoredJob")
        stream = self._stream(job.partition)
        try:
            if self._redis.xlen(stream) >= self.max_jobs:
                return False
            self._redis.xadd(stream, _fields(job))
        except redis.RedisError as exc:
            raise BrokerUnavailable(str(exc)) from exc
        return True

    def depth(self) -> int:
        """Messages in every partition stream (not yet learnt from), cached for half a second."""
        at, value = self._depth_cache
        if time.monotonic() - at < 0.5:
            return value
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                for p in range(self.partitions):
                    pipe.xlen(self._stream(p))
                value = int(sum(pipe.execute()))
        except redis.RedisError:
            value = -1
        self._depth_cache = (time.monotonic(), value)
        return value

    def announce(self, cohort: str, version: int) -> None:
        self._publish({"cohort": cohort, "version": version})

    def wake_all(self) -> None:
        self._publish({"wake": True})

    def _publish(self, message: dict) -> None:
        try:
            self._redis.publish(self.channel, json.dumps(message))
        except redis.RedisError as exc:  # long polls still re-read the store every few seconds
            log.warning("could not announce %s: %s", message, exc)

    def listen(self, board: VersionBoard, stop: threading.Event) -> threading.Thread:
        """Feed announcements into this process's board, reconnecting whenever Redis comes back."""

        def run() -> None:
            delay = 0.5
            while not stop.is_set():
                try:
                    pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.channel)
                    delay = 0.5
                    while not stop.is_set():
                        message = pubsub.get_message(timeout=1.0)
                        if message is not None:
                            _deliver(board, message["data"])
                    pubsub.close()
                except Exception as exc:  # a dropped connection, Redis restarting: never let the thread die
                    if stop.is_set():
                        return
                    log.warning("version announcements interrupted (%s); reconnecting in %.1f s", exc, delay)
                    stop.wait(delay)
                    delay = min(delay * 2, 10.0)

        thread = threading.Thread(target=run, name="version-listener", daemon=True)
        thread.start()
        self._listeners.append((stop, thread))
        return thread

    # -- the worker side --------------------------------------------------------------------

    def hold(self, partition: int) -> None:
        """Start reading a partition, beginning with what its previous owner read but never acked."""
        self._ensure_group(partition)
        claimed = self._claim(partition)
        with self._lock:
            self._held.add(partition)
            self._buffer.extendleft(reversed(claimed))
        if claimed:
            log.info("partition %d: reclaimed %d unacknowledged messages", partition, len(claimed))

    def release(self, partition: int) -> None:
        """Stop reading a partition; what was read and not acked stays pending for the next owner."""
        with self._lock:
            self._held.discard(partition)
            self._buffer = deque(job for job in self._buffer if job.partition != partition)

    def take(self, timeout: float) -> Job | None:
        with self._lock:
            if self._buffer:
                return self._buffer.popleft()
            held = sorted(self._held)
        if not held:
            time.sleep(timeout)
            return None
        streams = {self._stream(p): ">" for p in held}
        try:
            block = {"block": max(1, int(timeout * 1000))} if timeout > 0 else {}
            replies = self._redis.xreadgroup(GROUP, self.consumer, streams, count=READ_BATCH, **block)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise BrokerUnavailable(str(exc)) from exc
            for p in held:  # Redis restarted empty: the streams and the group are gone
                self._grouped.discard(p)
                self._ensure_group(p)
            return None
        except redis.RedisError as exc:
            raise BrokerUnavailable(str(exc)) from exc
        jobs = [job for stream, messages in replies or [] for message_id, fields in messages
                if (job := self._parse(stream, message_id, fields)) is not None]
        with self._lock:
            self._buffer.extend(job for job in jobs if job.partition in self._held)
            return self._buffer.popleft() if self._buffer else None

    def ack(self, job: Job) -> None:
        if job.receipt is None:
            return
        stream = self._stream(job.partition)
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.xack(stream, GROUP, job.receipt)
                pipe.xdel(stream, job.receipt)
                pipe.execute()
        except redis.RedisError as exc:  # it stays pending; its upload is learnt, so a redelivery is skipped
            log.warning("could not ack %s on %s: %s", job.receipt, stream, exc)

    def _parse(self, stream: bytes | str, message_id: bytes | str, fields: dict | None) -> Job | None:
        """A message as a job; one that is not ours (or was deleted) is dropped, never stalls a partition."""
        try:
            return _job(message_id, fields or {})
        except (KeyError, ValueError, UnicodeDecodeError, AttributeError) as exc:
            log.error("dropping malformed message %s on %s: %r", message_id, stream, exc)
            self._drop(stream, message_id)
            return None

    def _drop(self, stream: bytes | str, message_id: bytes | str) -> None:
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.xack(stream, GROUP, message_id)
                pipe.xdel(stream, message_id)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not drop %s: %s", message_id, exc)

    def _ensure_group(self, partition: int) -> None:
        if partition in self._grouped:
            return
        try:
            self._redis.xgroup_create(self._stream(partition), GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise BrokerUnavailable(str(exc)) from exc
        except redis.RedisError as exc:
            raise BrokerUnavailable(str(exc)) from exc
        self._grouped.add(partition)

    def _claim(self, partition: int) -> list[Job]:
        stream, start, jobs = self._stream(partition), "0-0", []
        try:
            while True:
                reply = self._redis.xautoclaim(stream, GROUP, self.consumer, min_idle_time=0, start_id=start,
                                               count=256)
                start, messages = reply[0], reply[1]
                jobs += [job for mid, fields in messages if (job := self._parse(stream, mid, fields)) is not None]
                if start in (b"0-0", "0-0"):
                    return jobs
        except redis.RedisError as exc:
            raise BrokerUnavailable(str(exc)) from exc

    def close(self) -> None:
        """Stop the announcement listeners first, so none reads from a closed connection."""
        for stop, thread in self._listeners:
            stop.set()
            thread.join(timeout=5)
        self._redis.close()


def _fields(job: StoredJob | ControlJob) -> dict[str, bytes | str]:
    if isinstance(job, ControlJob):
        return {"kind": "control", "cohort": job.cohort, "action": job.action, "version": str(job.version),
                "partition": str(job.partition)}
    return {"kind": "upload", "upload_id": str(job.upload_id), "cohort": job.cohort, "device_id": job.device_id,
            "received_at": repr(job.received_at), "partition": str(job.partition)}


def _job(message_id: bytes | str, fields: dict[bytes, bytes]) -> Job:
    text = {k.decode(): v for k, v in fields.items()}
    receipt = message_id.decode() if isinstance(message_id, bytes) else message_id
    partition = int(text["partition"])
    if text["kind"] == b"control":
        return ControlJob(text["cohort"].decode(), text["action"].decode(), int(text["version"]), partition, receipt)
    return StoredJob(int(text["upload_id"]), text["cohort"].decode(), text["device_id"].decode(),
                     float(text["received_at"]), partition, receipt)


def _deliver(board: VersionBoard, data: bytes) -> None:
    try:
        message = json.loads(data)
        if message.get("wake"):
            board.wake_all()
        else:
            board.publish(str(message["cohort"]), int(message["version"]))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring a malformed version announcement: %s", exc)
