"""Frame sources: live cameras and streams, and files for tests and replays.

Live and file sources behave differently on purpose. A live source (V4L2
camera, RTSP/HTTP stream) is read by its own thread that keeps only the newest
frame, so analysis always works on "now" and latency stays bounded however slow
the CPU is; when it stops delivering it is *lost* (:class:`SourceLost`), and
the driver reconnects with backoff. A file source (video file, image folder)
gives every frame in order, and its end is not a loss: the source waits for new
material (a replaced video file, new images in the folder). For OpenCV an
ended file and a dropped stream look the same, which is why the two are
separate classes rather than one ``VideoCapture`` loop.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2

from drivers.camera_face.config import CameraFaceConfig, picamera_number
from drivers.camera_face.pipeline import Image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
#: How often an idle file source looks for new material.
_POLL = 0.2


class SourceLost(Exception):
    """The source cannot be opened or stopped delivering: reconnect later."""


@dataclass(frozen=True)
class Frame:
    image: Image
    #: Seconds on a monotonic clock. Video files use their own timeline (start of play
    #: plus media position), so tracks and cooldowns do not depend on decoding speed.
    time: float
    #: ``time.perf_counter()`` when the frame was captured (for latency).
    captured_at: float
    #: Seconds spent reading and decoding this frame.
    capture_seconds: float


def redact(source: str) -> str:
    """The source without a password (``rtsp://user:***@host/...``), for events and logs."""
    return re.sub(r"(://[^/:@]+):[^/@]*@", r"\1:***@", source)


class FrameSource(abc.ABC):
    """Where frames come from. Not thread-safe: one reader."""

    live: bool

    def __init__(self, location: str):
        self.location = location
        self.description = redact(location)
        #: Live sources: frames overwritten before analysis got to them.
        self.dropped = 0

    @abc.abstractmethod
    def open(self) -> None:
        """Open the source or raise :class:`SourceLost` saying why not."""

    @abc.abstractmethod
    def read(self, timeout: float) -> Frame | None:
        """The next frame, None when none came within ``timeout``; :class:`SourceLost` if gone."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Capture(Protocol):
    """What a live source reads from: ``cv2.VideoCapture`` and :class:`PicameraCapture`."""

    def read(self) -> tuple[bool, Image | None]: ...

    def release(self) -> None: ...


class LiveSource(FrameSource):
    """A camera or network stream, read by a grabbing thread that keeps the newest frame.

    ``opener`` opens the device and returns its :class:`Capture`, or raises
    :class:`SourceLost` saying why it cannot. ``release_unblocks``: releasing the
    capture ends a read blocked on it (picamera2), so close releases first.
    """

    live = True

    def __init__(
        self,
        location: str,
        opener: Callable[[], Capture],
        read_timeout: float,
        release_unblocks: bool = False,
    ):
        super().__init__(location)
        self._opener = opener
        self._release_unblocks = release_unblocks
        self._read_timeout = read_timeout
        self._capture: Capture | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._fresh = threading.Condition()
        self._newest: Frame | None = None
        self._last_frame_at = 0.0
        self._ended = ""

    def open(self) -> None:
        self._capture = self._opener()
        self._stopping.clear()
        self._newest = None
        self._ended = ""
        self._last_frame_at = time.monotonic()
        self._thread = threading.Thread(
            target=self._grab, name=f"grab {self.description}", daemon=True
        )
        self._thread.start()

    def _grab(self) -> None:
        capture = self._capture
        assert capture is not None
        while not self._stopping.is_set():
            started = time.perf_counter()
            try:
                ok, image = capture.read()
            except Exception as exc:  # any backend error means the camera is gone
                ok, image, reason = False, None, f"read failed: {exc}"
            else:
                reason = "stream ended or the camera stopped sending"
            if not ok or image is None:
                with self._fresh:
                    self._ended = reason
                    self._fresh.notify_all()
                return
            now = time.perf_counter()
            frame = Frame(image, time.monotonic(), now, now - started)
            with self._fresh:
                if self._newest is not None:
                    self.dropped += 1
                self._newest = frame
                self._last_frame_at = frame.time
                self._fresh.notify_all()

    def read(self, timeout: float) -> Frame | None:
        with self._fresh:
            if self._newest is None and not self._ended:
                self._fresh.wait(timeout)
            frame, self._newest = self._newest, None
            if frame is not None:
                return frame
            if self._ended:
                raise SourceLost(f"{self.description}: {self._ended}")
            silent = time.monotonic() - self._last_frame_at
        if silent > self._read_timeout:
            raise SourceLost(f"{self.description}: no frame for {silent:.1f} s")
        return None

    def close(self) -> None:
        self._stopping.set()
        thread, capture = self._thread, self._capture
        self._thread = self._capture = None
        if self._release_unblocks and capture is not None:
            # picamera2: stopping the camera is what ends a capture waiting for a frame
            # that will never come, and the camera must be released to be opened again.
            capture.release()
            if thread is not None:
                thread.join(self._read_timeout + 1.0)
            return
        if thread is not None:
            thread.join(self._read_timeout + 1.0)
            if thread.is_alive():
                # Releasing under a blocked read() can crash the backend: leave it to finish.
                return
        if capture is not None:
            capture.release()


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class VideoFileSource(FrameSource):
    """A video file played frame by frame, once per version of the file (or looping)."""

    live = False

    def __init__(self, location: str, loop: bool = False):
        super().__init__(location)
        self.path = Path(location)
        self.loop = loop
        self._capture: Any = None
        self._played: tuple[int, int, int] | None = None
        self._timeline_start = 0.0
        self._last_time = 0.0

    def open(self) -> None:
        self._played = None
        self._start()

    def _start(self) -> None:
        identity = _identity(self.path)
        if identity is None:
            raise SourceLost(f"video file {self.path} is missing")
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            capture.release()
            raise SourceLost(f"video file {self.path} cannot be opened (not a video?)")
        self._capture = capture
        self._current = identity
        self._timeline_start = max(time.monotonic(), self._last_time + 1.0)

    def read(self, timeout: float) -> Frame | None:
        if self._capture is None:
            return self._wait_for_new_version(timeout)
        started = time.perf_counter()
        ok, image = self._capture.read()
        if ok and image is not None:
            now = time.perf_counter()
            position = self._capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            self._last_time = self._timeline_start + position
            return Frame(image, self._last_time, now, now - started)
        self._capture.release()
        self._capture = None
        if _identity(self.path) is None:
            raise SourceLost(f"video file {self.path} was removed")
        self._played = self._current
        if self.loop:
            self._start()
        return None

    def _wait_for_new_version(self, timeout: float) -> Frame | None:
        deadline = time.monotonic() + timeout
        while True:
            identity = _identity(self.path)
            if identity is None:
                raise SourceLost(f"video file {self.path} was removed")
            if identity != self._played:
                self._start()
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(_POLL, left))

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


class ImageFolderSource(FrameSource):
    """Every image file in a folder, in name order, then each new or changed one as it comes."""

    live = False

    def __init__(self, location: str, loop: bool = False):
        super().__init__(location)
        self.path = Path(location)
        self.loop = loop
        self._seen: dict[str, tuple[int, int, int]] = {}
        #: Files that exist but could not be decoded (half-written or not images).
        self.unreadable = 0

    def open(self) -> None:
        if not self.path.is_dir():
            raise SourceLost(f"image folder {self.path} is missing")
        self._seen = {}

    def _next_file(self) -> tuple[Path, tuple[int, int, int]] | None:
        try:
            names = sorted(os.listdir(self.path))
        except OSError:
            raise SourceLost(f"image folder {self.path} was removed") from None
        for name in names:
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = self.path / name
            identity = _identity(path)
            if identity is not None and self._seen.get(name) != identity:
                return path, identity
        if self.loop and self._seen:
            self._seen = {}
        return None

    def read(self, timeout: float) -> Frame | None:
        deadline = time.monotonic() + timeout
        while True:
            found = self._next_file()
            if found is not None:
                path, identity = found
                self._seen[path.name] = identity
                started = time.perf_counter()
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                now = time.perf_counter()
                if image is None:
                    self.unreadable += 1
                    continue
                return Frame(image, time.monotonic(), now, now - started)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(_POLL, left))

    def close(self) -> None:
        """Nothing to release: the folder is read file by file."""


def _stream_capture_args(location: str, config: CameraFaceConfig) -> tuple[Any, ...]:
    if location.lower().startswith(("rtsp://", "rtsps://")):
        # TCP and a short probe: RTSP over UDP loses frames on busy networks, and the
        # default probing takes seconds (2.9 s → 0.4 s to open, measured).
        os.environ.setdefault(
            "OPENCV_FFMPEG_CAPTURE_OPTIONS",
            "rtsp_transport;tcp|analyzeduration;200000|probesize;32768",
        )
    # Without explicit timeouts a silent endpoint blocks a read for 30 s.
    timeouts = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        int(config.open_timeout * 1000),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        int(config.read_timeout * 1000),
    ]
    return (location, cv2.CAP_FFMPEG, timeouts)


def source_type(config: CameraFaceConfig) -> str:
    """The kind of source ``config.source`` names (resolving ``auto``)."""
    if config.source_type != "auto":
        return config.source_type
    location = config.source.strip()
    if "://" in location:
        return "stream"
    if location.startswith("picamera"):
        return "picamera"
    if location.isdigit() or location.startswith("/dev/"):
        return "camera"
    if Path(location).is_dir() or location.endswith("/"):
        return "image_folder"
    return "video_file"


def _opencv_opener(
    location: str, capture_args: tuple[Any, ...], properties: dict[int, float]
) -> Callable[[], Capture]:
    def open_capture() -> Capture:
        device = capture_args[0]
        if isinstance(device, str) and device.startswith("/dev/") and not os.path.exists(device):
            raise SourceLost(f"{redact(location)} does not exist (unplugged?)")
        capture = cv2.VideoCapture(*capture_args)
        if not capture.isOpened():
            capture.release()
            raise SourceLost(f"{redact(location)} cannot be opened")
        for prop, value in properties.items():
            capture.set(prop, value)
        opened: Capture = capture
        return opened

    return open_capture


class PicameraCapture:
    """A Raspberry Pi camera module (CSI, libcamera) through picamera2.

    picamera2 comes with Raspberry Pi OS (``apt install python3-picamera2``); the
    agent's virtualenv sees it through ``--system-site-packages``. ``RGB888`` frames
    are laid out B, G, R in memory: OpenCV's order, used as they come.
    """

    def __init__(self, number: int, size: tuple[int, int] | None):
        try:
            picamera2 = importlib.import_module("picamera2")
        except ImportError as exc:
            raise SourceLost(
                f"picamera2 is not installed ({exc}): apt install python3-picamera2"
            ) from None
        picamera_class = picamera2.Picamera2
        cameras = picamera_class.global_camera_info()
        if number >= len(cameras):
            raise SourceLost(f"Pi camera {number} not found ({len(cameras)} connected: unplugged?)")
        try:
            self._camera = picamera_class(number)
            main: dict[str, Any] = {"format": "RGB888"}
            if size:
                main["size"] = size
            # Two buffers: the grabbing thread always takes the newest frame anyway.
            self._camera.configure(
                self._camera.create_video_configuration(main=main, buffer_count=2)
            )
            self._camera.start()
        except Exception as exc:  # libcamera reports a busy or gone camera in many ways
            self.release()
            raise SourceLost(f"Pi camera {number} cannot be started: {exc}") from None

    def read(self) -> tuple[bool, Image | None]:
        image: Image = self._camera.capture_array("main")
        return True, image

    def release(self) -> None:
        camera = getattr(self, "_camera", None)
        if camera is not None:
            with contextlib.suppress(Exception):
                camera.stop()
            with contextlib.suppress(Exception):
                camera.close()


def open_source(config: CameraFaceConfig) -> FrameSource:
    """The (not yet opened) source ``config`` describes."""
    kind = source_type(config)
    location = config.source.strip()
    if kind == "image_folder":
        return ImageFolderSource(location, config.loop)
    if kind == "video_file":
        return VideoFileSource(location, config.loop)
    if kind == "picamera":
        number = picamera_number(location)
        size = (config.width, config.height) if config.width and config.height else None
        return LiveSource(
            location, lambda: PicameraCapture(number, size), config.read_timeout, True
        )
    if kind == "stream":
        return LiveSource(
            location,
            _opencv_opener(location, _stream_capture_args(location, config), {}),
            config.read_timeout,
        )
    properties: dict[int, float] = {cv2.CAP_PROP_BUFFERSIZE: 1}
    if config.width:
        properties[cv2.CAP_PROP_FRAME_WIDTH] = config.width
    if config.height:
        properties[cv2.CAP_PROP_FRAME_HEIGHT] = config.height
    device: int | str = int(location) if location.isdigit() else location
    return LiveSource(
        location, _opencv_opener(location, (device, cv2.CAP_V4L2), properties), config.read_timeout
    )
