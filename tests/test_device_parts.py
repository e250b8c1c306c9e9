"""The daemon's parts on their own: the spool, backoff, sources and sinks."""
from __future__ import annotations

import io
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from device_client.selection import UploadBudget
from device_client.sinks import JsonlSink, WebhookSink, open_sink
from device_client.sources import FolderSource, OpenCvSource, RawStdinSource, parse_size
from device_client.spool import Spool
from device_client.transport import Backoff, ServerApi
from device_client.uploader import Uploader
from driftsync.processes import free_port
from shared.images import UploadEncoding
from shared.codec import decode
from shared.protocol import MAX_SAMPLES_PER_UPLOAD, UploadBatch
from tests.conftest import wait_for


def test_spool_is_bounded_drops_the_oldest_and_survives_a_restart(tmp_path):
    spool = Spool(tmp_path / "spool", max_bytes=1000)
    for i in range(5):
        spool.put(bytes([i]) * 300, samples=i + 1)
    assert len(spool) == 3 and spool.bytes() == 900
    assert spool.dropped_batches == 2 and spool.dropped_samples == 1 + 2
    assert spool.oldest().path.read_bytes() == bytes([2]) * 300
    reopened = Spool(tmp_path / "spool", max_bytes=1000)  # what a restarted device finds
    assert len(reopened) == 3 and reopened.samples() == 3 + 4 + 5
    entry = reopened.oldest()
    reopened.remove(entry)
    reopened.put(b"x" * 10, samples=1)  # numbering continues after the survivors
    names = sorted(p.name for p in (tmp_path / "spool").iterdir())
    assert len(names) == 3 and names[-1].endswith("-1.upload") and names[-1] > names[0]
    (tmp_path / "spool" / "notes.txt").write_text("not ours")
    assert len(Spool(tmp_path / "spool", max_bytes=1000)) == 3


def test_spool_keeps_a_single_batch_larger_than_its_bound(tmp_path):
    spool = Spool(tmp_path, max_bytes=10)
    spool.put(b"y" * 50, samples=4)
    assert len(spool) == 1 and spool.dropped_samples == 0


def test_backoff_grows_with_jitter_is_capped_and_honours_retry_after():
    backoff = Backoff(base_s=0.5, cap_s=4.0, rng=random.Random(0))
    delays = [backoff.next_delay() for _ in range(8)]
    for i, d in enumerate(delays):
        ceiling = min(4.0, 0.5 * 2**i)
        assert ceiling / 2 <= d <= ceiling
    assert max(delays) <= 4.0 and len(set(delays)) == len(delays)  # jittered: no two alike
    spread = [Backoff(rng=random.Random(seed)).next_delay(retry_after=3.0) for seed in range(20)]
    assert all(3.0 <= d <= 3.75 for d in spread) and max(spread) - min(spread) > 0.3  # a fleet does not retry in step
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def _png(path, value: int, size=(48, 40)) -> None:
    Image.new("RGB", size, (value, value, value)).save(path)


def test_folder_source_classifies_new_files_once_and_skips_what_is_not_an_image(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(3):
        _png(inbox / f"a{i}.png", 10 * i)
    (inbox / "broken.jpg").write_bytes(b"not a jpeg")
    (inbox / "readme.txt").write_text("ignored")
    source = FolderSource(inbox, 32, batch=2, poll_s=0.05, settle_s=0.0)
    stop = threading.Event()
    frames = source.frames(stop)
    got = [next(frames), next(frames)]
    assert [f.ids for f in got] == [["a0.png", "a1.png"], ["a2.png"]]  # broken.jpg was logged and skipped
    assert got[0].images.shape == (2, 32, 32, 3) and got[0].images.dtype == np.uint8
    assert got[0].images[1].mean() == pytest.approx(10, abs=1)
    _png(inbox / "b0.png", 200)
    later = next(frames)
    assert later.ids == ["b0.png"]
    stop.set()
    assert list(frames) == []


def test_raw_stdin_source_reads_whole_frames_and_drops_a_torn_one():
    frames = np.stack([np.full((24, 40, 3), v, np.uint8) for v in (5, 50, 150)])
    data = frames.tobytes() + b"\x01" * 100  # then a torn frame
    source = RawStdinSource(parse_size("40x24"), 32, batch=2, stream=io.BytesIO(data))
    got = list(source.frames(threading.Event()))
    assert [f.ids for f in got] == [["frame-0", "frame-1"], ["frame-2"]]
    assert got[1].images.shape == (1, 32, 32, 3) and got[1].images.mean() == pytest.approx(150, abs=1)
    with pytest.raises(ValueError):
        parse_size("40by24")


def test_video_source_reads_a_video_file_through_opencv(tmp_path):
    cv2 = pytest.importorskip("cv2", reason="the video source needs the camera extra (opencv-python-headless)")
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for v in range(7):
        writer.write(np.full((48, 64, 3), 30 * v, np.uint8))
    writer.release()
    got = list(OpenCvSource(str(path), 32, batch=3).frames(threading.Event()))
    assert [len(f.ids) for f in got] == [3, 3, 1] and got[-1].ids == ["frame-6"]
    assert got[0].images.shape == (3, 32, 32, 3)
    assert got[1].images[0].mean() == pytest.approx(90, abs=6)  # frame 3, through MJPG
    with pytest.raises(OSError, match="cannot open"):
        list(OpenCvSource(str(tmp_path / "missing.avi"), 32).frames(threading.Event()))


class _Receiver(BaseHTTPRequestHandler):
    received: list = []
    fail_first = 0

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if _Receiver.fail_first > 0:
            _Receiver.fail_first -= 1
            self.send_response(503)
        else:
            _Receiver.received.extend(body)
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        return


def test_webhook_sink_delivers_in_order_through_failures(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Receiver.received, _Receiver.fail_first = [], 2
    sink = open_sink(f"webhook:http://127.0.0.1:{server.server_address[1]}/hook")
    assert isinstance(sink, WebhookSink)
    for i in range(5):
        sink.write([{"id": f"{i}-{j}"} for j in range(3)])
    sink.close(timeout=15)
    server.shutdown()
    assert [r["id"] for r in _Receiver.received] == [f"{i}-{j}" for i in range(5) for j in range(3)]
    assert sink.sent == 15 and sink.dropped == 0


def test_webhook_sink_bounds_its_queue_when_the_endpoint_is_down():
    sink = WebhookSink("http://127.0.0.1:9/unreachable", max_records=10)
    sink.write([{"id": i} for i in range(25)])
    assert sink.dropped == 15
    sink.close(timeout=1)
    assert sink.dropped == 25 and sink.sent == 0  # what could not be delivered is counted, not hidden


def test_jsonl_sink_appends_one_line_per_record(tmp_path):
    path = tmp_path / "p.jsonl"
    for run in range(2):  # a restarted device appends
        sink = open_sink(f"jsonl:{path}")
        assert isinstance(sink, JsonlSink)
        sink.write([{"id": f"{run}-{i}", "confidence": 0.5} for i in range(2)])
        sink.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["0-0", "0-1", "1-0", "1-1"]
    with pytest.raises(ValueError, match="unknown sink"):
        open_sink("kafka:topic")


def _uploader_before_a_dead_server(spool: Spool, **options) -> Uploader:
    """Nothing can be sent, so every request the encoder makes stays on the spool to be read."""
    return Uploader(ServerApi(f"http://127.0.0.1:{free_port()}", "token", timeout=1.0),
                    UploadBudget.from_rates(None, None), spool, backoff=Backoff(base_s=30.0, cap_s=30.0), **options)


def _spooled_request_sizes(uploader: Uploader, spool: Spool, samples: int) -> list[int]:
    """Start the uploader on what was offered (so the grouping does not depend on timing), wait
    until every sample is spooled, and give each spooled request's sample count in order."""
    uploader.start()
    try:
        wait_for(lambda: spool.samples() == samples, 30, "every offered sample spooled")
    finally:
        uploader.close(flush_timeout=1.0)
    return [int(p.stem.partition("-")[2]) for p in sorted(spool.root.glob("*.upload"))]


@pytest.mark.parametrize("batch_statistics", [True, False])
def test_a_batch_statistics_devices_selection_from_one_batch_goes_out_in_one_request(tmp_path, batch_statistics):
    """The cloud normalises a batch-statistics group by its own statistics: split at 32, a
    batch's 40 uploads stepped as 32 and then 8 alone."""
    spool = Spool(tmp_path / "spool", 1 << 26)
    uploader = _uploader_before_a_dead_server(spool, batch_size=32, flush_s=0.05, batch_statistics=batch_statistics)
    groups = [40, 10, 12, 300, 5]
    for size in groups:
        frames = np.random.default_rng(size).integers(0, 256, (size, 8, 8, 3), dtype=np.uint8)
        uploader.offer(frames, np.full(size, 0.5), np.full(size, 1.0), 0)
    requests = _spooled_request_sizes(uploader, spool, sum(groups))
    if batch_statistics:
        assert requests == [40, 22, MAX_SAMPLES_PER_UPLOAD, 300 - MAX_SAMPLES_PER_UPLOAD, 5]
    else:
        assert requests[:2] == [32, 32] and max(requests) == 32


def test_a_group_with_its_batch_statistics_goes_in_requests_of_its_own_that_carry_them(tmp_path, caplog):
    """The cloud distils a batch-statistics group under the statistics its batch was normalised
    by, so two groups never share a request (one request carries one set). Statistics the server
    would refuse (a variance of 0) stay behind, logged, and their group goes without them."""
    spool = Spool(tmp_path / "spool", 1 << 26)
    uploader = _uploader_before_a_dead_server(spool, batch_size=32, flush_s=0.05, batch_statistics=True)
    stats = [{"bn.running_mean": np.full(4, i, np.float32), "bn.running_var": np.full(4, i, np.float32)} for i in range(3)]
    for size, group_stats in zip([5, 6, 7], stats):  # the first one's variances are 0
        frames = np.random.default_rng(size).integers(0, 256, (size, 8, 8, 3), dtype=np.uint8)
        uploader.offer(frames, np.full(size, 0.5), np.full(size, 1.0), 0, group_stats)
    with caplog.at_level("WARNING", logger="driftsync.device.uploader"):
        assert _spooled_request_sizes(uploader, spool, 18) == [5, 6, 7]
    sent = [decode(p.read_bytes(), UploadBatch) for p in sorted(spool.root.glob("*.upload"))]
    assert sent[0].norm_stats is None and "bn.running_var has non-positive variances" in caplog.text
    for batch, group_stats in zip(sent[1:], stats[1:]):
        assert batch.batch_statistics and {k: v.to_numpy().tolist() for k, v in batch.norm_stats.items()} == {
            k: v.tolist() for k, v in group_stats.items()}


def test_a_whole_group_past_the_request_byte_bound_is_split_not_refused(tmp_path):
    """A group travels whole only while its images fit `max_request_bytes`: a body past the
    server's bound would be refused with 413 and its samples lost."""
    spool = Spool(tmp_path / "spool", 1 << 26)
    image_bytes = 8 * 8 * 3  # raw
    uploader = _uploader_before_a_dead_server(spool, encoding=UploadEncoding.parse("raw"), batch_size=32,
                                              batch_statistics=True, max_request_bytes=10 * image_bytes)
    frames = np.random.default_rng(0).integers(0, 256, (25, 8, 8, 3), dtype=np.uint8)
    uploader.offer(frames, np.full(25, 0.5), np.arange(25, dtype=float), 0)
    requests = _spooled_request_sizes(uploader, spool, 25)
    assert requests == [10, 10, 5] and uploader.stats.dropped_budget == 0
