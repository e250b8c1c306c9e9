"""Where a running device's frames come from: a watched folder, a video or camera, raw stdin.

Each source yields `Frames` until it is exhausted or `stop` is set. Frames are
resized and centre-cropped to the model's square input (`fit_image`), as uint8 RGB.
The labelled replay sources used for evaluation live in `driftsync.data.streams`.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
from PIL import Image

from device_client.state import atomic_write
from shared.images import fit_image

log = logging.getLogger("driftsync.device.sources")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm")


@dataclass(frozen=True)
class Frames:
    images: np.ndarray  # uint8 N x H x W x 3, at the model's input size
    ids: list[str]  # what each frame is: a file name, a frame index


class Source(Protocol):
    def frames(self, stop: threading.Event) -> Iterator[Frames]: ...


class SeenFiles:
    """Names of processed files, bounded (the oldest forgotten first) and, with a `path`, kept
    across restarts as an append-only list that is compacted when it doubles."""

    def __init__(self, path: Path | None = None, max_names: int = 100_000) -> None:
        self.path, self.max_names = path, max_names
        self._names: OrderedDict[str, None] = OrderedDict()
        self._lines = 0
        if path is not None and path.exists():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            self._lines = len(lines)
            for name in lines[-max_names:]:
                self._names[name] = None

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def add(self, names: list[str]) -> None:
        for name in names:
            self._names[name] = None
            self._names.move_to_end(name)
        while len(self._names) > self.max_names:
            self._names.popitem(last=False)
        if self.path is None or not names:
            return
        if self._lines + len(names) > 2 * self.max_names:
            atomic_write(self.path, "".join(f"{n}\n" for n in self._names).encode())
            self._lines = len(self._names)
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(f"{n}\n" for n in names))
        self._lines += len(names)


class FolderSource:
    """Classify image files as they appear in a folder (and, first, those already there).

    A file that cannot be read yet (still being written, truncated) is tried again after
    `retry_s`, `attempts` times in all, before it is given up. With `seen_path`, processed
    files are remembered across restarts, so a restart does not classify and upload them again.
    """

    def __init__(self, folder: Path, size: int, batch: int = 16, poll_s: float = 0.25,
                 settle_s: float = 0.2, *, seen_path: Path | None = None, attempts: int = 4,
                 retry_s: float = 1.0) -> None:
        self.folder, self.size, self.batch, self.poll_s, self.settle_s = Path(folder), size, batch, poll_s, settle_s
        self.attempts, self.retry_s = attempts, retry_s
        self._seen = SeenFiles(seen_path)
        self._failures: dict[str, tuple[int, float]] = {}  # name -> (failed reads, when to try again)
        self.given_up = 0

    def _new_files(self) -> list[Path]:
        """Files whose size has not changed for `settle_s`: a half-written file is not read."""
        now = time.time()
        found = []
        for path in sorted(self.folder.iterdir()):
            if path.name in self._seen or path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
                continue
            if path.name in self._failures and self._failures[path.name][1] > time.monotonic():
                continue
            try:
                if now - path.stat().st_mtime >= self.settle_s:
                    found.append(path)
            except FileNotFoundError:
                continue
        return found

    def _read(self, path: Path) -> np.ndarray | None:
        """The image, or None: then it is retried later, or given up (and remembered) for good."""
        try:
            with Image.open(path) as pil:
                image = fit_image(pil, self.size)
            self._failures.pop(path.name, None)
            return image
        except Exception as exc:  # noqa: BLE001 (mid-write, truncated or not an image: retry, then skip)
            failures = self._failures.get(path.name, (0, 0.0))[0] + 1
            if failures >= self.attempts:
                self._failures.pop(path.name, None)
                self._seen.add([path.name])
                self.given_up += 1
                log.warning("giving up %s after %d reads: %s", path.name, failures, exc)
            else:
                self._failures[path.name] = (failures, time.monotonic() + self.retry_s)
                log.info("cannot read %s yet (%s); trying again in %.1fs", path.name, exc, self.retry_s)
            return None

    def frames(self, stop: threading.Event) -> Iterator[Frames]:
        self.folder.mkdir(parents=True, exist_ok=True)
        while not stop.is_set():
            paths = self._new_files()
            for start in range(0, len(paths), self.batch):
                images, ids = [], []
                for path in paths[start:start + self.batch]:
                    image = self._read(path)
                    if image is not None:
                        images.append(image)
                        ids.append(path.name)
                if images:
                    yield Frames(np.stack(images), ids)
                    self._seen.add(ids)  # processed: the consumer came back for more
            if not paths:
                stop.wait(self.poll_s)


class OpenCvSource:
    """A video file, an RTSP/HTTP stream or a camera index, through OpenCV (`driftsync[camera]`)."""

    def __init__(self, uri: str, size: int, batch: int = 1, reconnect_s: float | None = None) -> None:
        try:
            import cv2
        except ImportError as exc:
            raise SystemExit("video and camera sources need OpenCV: pip install 'driftsync[camera]'") from exc
        self._cv2 = cv2
        self.uri, self.size, self.batch, self.reconnect_s = uri, size, batch, reconnect_s

    def _open(self):
        target = int(self.uri) if self.uri.isdigit() else self.uri
        capture = self._cv2.VideoCapture(target)
        if not capture.isOpened():
            raise OSError(f"cannot open video source {self.uri!r}")
        return capture

    def frames(self, stop: threading.Event) -> Iterator[Frames]:
        index = 0
        capture = self._open()
        try:
            while not stop.is_set():
                images, ids = [], []
                while len(images) < self.batch:
                    ok, bgr = capture.read()
                    if not ok:
                        break
                    images.append(fit_image(Image.fromarray(self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB)), self.size))
                    ids.append(f"frame-{index}")
                    index += 1
                if images:
                    yield Frames(np.stack(images), ids)
                if len(images) < self.batch:  # end of file, or a dropped stream
                    if self.reconnect_s is None:
                        return
                    log.warning("video source %s ended; reopening in %.0fs", self.uri, self.reconnect_s)
                    capture.release()
                    if stop.wait(self.reconnect_s):
                        return
                    capture = self._open()
        finally:
            capture.release()


class RawStdinSource:
    """Raw RGB24 frames of a fixed size on stdin, e.g. from
    `ffmpeg -i cam.mp4 -f rawvideo -pix_fmt rgb24 -s 640x480 -`."""

    def __init__(self, frame_size: tuple[int, int], size: int, batch: int = 1,
                 stream: BinaryIO | None = None) -> None:
        self.frame_size, self.size, self.batch = frame_size, size, batch
        self.stream = stream if stream is not None else sys.stdin.buffer

    def frames(self, stop: threading.Event) -> Iterator[Frames]:
        height, width = self.frame_size
        frame_bytes = height * width * 3
        index = 0
        while not stop.is_set():
            images, ids = [], []
            while len(images) < self.batch:
                data = self.stream.read(frame_bytes)
                if len(data) < frame_bytes:
                    if data:
                        log.warning("stdin ended inside a frame (%d of %d bytes); dropped it", len(data), frame_bytes)
                    break
                images.append(fit_image(Image.fromarray(np.frombuffer(data, np.uint8).reshape(height, width, 3)), self.size))
                ids.append(f"frame-{index}")
                index += 1
            if images:
                yield Frames(np.stack(images), ids)
            if len(images) < self.batch:
                return


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (height, width), ffmpeg's order on the command line."""
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise ValueError(f"expected WIDTHxHEIGHT, got {text!r}")
    return int(height), int(width)
