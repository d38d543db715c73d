"""Options of ``[drivers.<name>] type = "camera_face"``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.config import ConfigError, check
from drivers.camera_face.models import (
    DEFAULT_DETECTOR,
    DEFAULT_EMBEDDER,
    DEFAULT_MODELS_DIR,
    Normalisation,
    calibrated_threshold,
    manifest_entry,
)

SourceType = Literal["auto", "camera", "picamera", "stream", "video_file", "image_folder"]


def _sha256_text(value: str) -> bool:
    return value == "" or (len(value) == 64 and all(c in "0123456789abcdef" for c in value))


SHA256 = check(_sha256_text, "must be empty (take it from the manifest) or 64 lowercase hex digits")


def picamera_number(location: str) -> int:
    """The camera number of ``picamera``, ``picamera:1`` or ``1`` (ValueError otherwise)."""
    number = location.strip().removeprefix("picamera").lstrip(":") or "0"
    if not number.isdigit():
        raise ValueError(f"{location!r} is not a Pi camera: picamera, picamera:N or N")
    return int(number)


@dataclass(frozen=True)
class ModelFile:
    """A configured model: where it is, which hash it must have, and its input scaling."""

    path: Path
    sha256: str
    normalisation: Normalisation | None
    impostor_tail: tuple[float, float] | None = None

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class CameraFaceConfig:
    """Options of a face-matching camera.

    ``source`` is a V4L2 device (``0`` or ``/dev/video0``), a Raspberry Pi camera
    module (``picamera`` or ``picamera:1``, through picamera2), a network stream
    (``rtsp://``, ``http://``, ``https://``), a video file or a folder of images.
    ``source_type = "auto"`` tells them apart by their form; set it to force
    one (``"stream"`` opens any path through FFmpeg with the stream timeouts).
    """

    source: str = field(metadata=check(lambda v: bool(v.strip()), "must not be empty"))
    source_type: SourceType = "auto"
    #: The camera's name in events (default: the driver instance name).
    camera: str = ""
    #: Requested capture size for V4L2 and Pi cameras (0: the camera's default).
    width: int = field(default=0, metadata=check(minimum=0, maximum=8192))
    height: int = field(default=0, metadata=check(minimum=0, maximum=8192))
    #: Network streams: give up opening / reading after this many seconds.
    open_timeout: float = field(default=5.0, metadata=check(minimum=0.1, maximum=120.0))
    read_timeout: float = field(default=5.0, metadata=check(minimum=0.1, maximum=120.0))
    reconnect_min_delay: float = field(default=1.0, metadata=check(minimum=0.01, maximum=600.0))
    reconnect_max_delay: float = field(default=30.0, metadata=check(minimum=0.01, maximum=3600.0))
    #: Video files: play again from the start at the end (demos); otherwise play once
    #: per version of the file (a replaced file is played again).
    loop: bool = False
    #: At most this many frames per second are analysed (0: as many as the CPU allows).
    max_fps: float = field(default=0.0, metadata=check(minimum=0.0, maximum=240.0))

    models_dir: str = str(DEFAULT_MODELS_DIR)
    #: Model files: a name inside ``models_dir`` or an absolute path.
    detector: str = DEFAULT_DETECTOR
    embedder: str = DEFAULT_EMBEDDER
    #: Expected hashes; empty takes them from the built-in manifest (required for other files).
    detector_sha256: str = field(default="", metadata=SHA256)
    embedder_sha256: str = field(default="", metadata=SHA256)
    #: Embedder input scaling; empty takes it from the manifest.
    normalisation: Literal["", "imagenet", "symmetric"] = ""
    #: Threads for the embedder (the detector uses OpenCV's own setting).
    threads: int = field(default=1, metadata=check(minimum=1, maximum=16))
    #: Frames wider than this are shrunk for detection (alignment uses the full frame,
    #: and small faces get their landmarks from a full-resolution crop).
    detect_max_width: int = field(default=320, metadata=check(minimum=64, maximum=8192))

    #: Quality gates: faces failing them are counted (``quality_low_*``), never matched.
    #: Judged faces count in their track by quality (embedding norm, detector score),
    #: so the defaults set aside only what costs more matches than it saves false
    #: alarms: ``scripts/bench-face`` prints that trade for each gate.
    min_detection_score: float = field(default=0.6, metadata=check(minimum=0.5, maximum=1.0))
    #: Shorter side of the face box in pixels of the captured frame (0: no limit).
    min_face_size: int = field(default=0, metadata=check(minimum=0, maximum=4096))
    #: Variance of the Laplacian of the aligned grey face (lower is blurrier; 0: no limit).
    min_sharpness: float = field(default=0.0, metadata=check(minimum=0.0))
    #: Nose offset from the face's midline as a fraction of eye distance (≈0.5 near 45°;
    #: 2: no limit).
    max_yaw: float = field(default=2.0, metadata=check(minimum=0.0, maximum=2.0))
    #: Nose height between the eye line (0) and mouth line (1), distance from 0.56
    #: (1: no limit).
    max_pitch: float = field(default=1.0, metadata=check(minimum=0.0, maximum=1.0))
    #: The embedding's length before normalisation (low on poor faces; 0: no limit).
    min_embedding_norm: float = field(default=0.0, metadata=check(minimum=0.0))

    #: Cosine similarity at or above which a face track counts as the watchlist person;
    #: 0 calibrates it from ``target_fpir`` and the number of enrolled photos (the
    #: threshold for a given false-alarm rate rises with the list).
    threshold: float = field(default=0.0, metadata=check(minimum=0.0, maximum=1.0))
    #: With ``threshold = 0``: the share of strangers' tracks allowed to raise an alarm.
    target_fpir: float = field(default=0.01, metadata=check(minimum=1e-6, maximum=0.5))
    #: A face track is searched in the watchlist from its n-th judged face on (its
    #: quality-weighted mean embedding), or once when a shorter track ends; it decides once.
    min_frames: int = field(default=3, metadata=check(minimum=1, maximum=100))
    #: Seconds after a match during which the same person gives no new event.
    cooldown: float = field(default=60.0, metadata=check(minimum=0.0, maximum=86400.0))
    #: A face track ends when its face is not seen for this many seconds.
    track_timeout: float = field(default=1.5, metadata=check(minimum=0.05, maximum=600.0))
    #: Attach a small JPEG of the aligned face (112x112) to match events.
    include_crop: bool = False
    crop_quality: int = field(default=80, metadata=check(minimum=10, maximum=100))
    #: Hours a match's face embedding is kept so the centre can reject the match.
    match_memory_hours: float = field(default=24.0, metadata=check(minimum=0.0, maximum=24.0 * 90))

    def __post_init__(self) -> None:
        if self.reconnect_min_delay > self.reconnect_max_delay:
            raise ConfigError("must not exceed reconnect_max_delay", "reconnect_min_delay")
        pi_camera = self.source_type == "picamera" or (
            self.source_type == "auto" and self.source.strip().startswith("picamera")
        )
        if pi_camera:
            try:
                picamera_number(self.source)
            except ValueError as exc:
                raise ConfigError(str(exc), "source") from None
        if self.source_type == "auto" and "://" in self.source:
            scheme = self.source.split("://", 1)[0].lower()
            if scheme not in ("rtsp", "rtsps", "http", "https", "rtmp", "udp", "tcp"):
                raise ConfigError(f"unknown stream scheme {scheme!r}", "source")
        # Resolve the model files now so a bad entry is a config error at load, not at start.
        self.detector_file  # noqa: B018
        if not self.threshold and self.embedder_file.impostor_tail is None:
            raise ConfigError(
                f"no calibration is known for {self.embedder_file.name!r}: set a threshold",
                "threshold",
            )

    def threshold_for(self, templates: int) -> float:
        """The decision threshold for a watchlist holding ``templates`` enrolled photos."""
        if self.threshold:
            return self.threshold
        tail = self.embedder_file.impostor_tail
        assert tail is not None, "checked at load"
        return calibrated_threshold(templates, self.target_fpir, tail)

    def _model(self, kind: str, value: str, sha256: str) -> ModelFile:
        path = Path(value) if Path(value).is_absolute() else Path(self.models_dir) / value
        known = manifest_entry(path.name)
        expected = sha256 or (known.sha256 if known else "")
        if not expected:
            raise ConfigError(
                f"{path.name!r} is not in the built-in model manifest: set {kind}_sha256",
                f"{kind}_sha256",
            )
        if known is not None and known.sha256 == expected:
            return ModelFile(path, expected, known.normalisation, known.impostor_tail)
        return ModelFile(path, expected, known.normalisation if known else None)

    @property
    def detector_file(self) -> ModelFile:
        return self._model("detector", self.detector, self.detector_sha256)

    @property
    def embedder_file(self) -> ModelFile:
        model = self._model("embedder", self.embedder, self.embedder_sha256)
        normalisation = self.normalisation or model.normalisation
        if normalisation is None:
            raise ConfigError(
                f"the input scaling of {model.name!r} is unknown: set normalisation",
                "normalisation",
            )
        return ModelFile(model.path, model.sha256, normalisation, model.impostor_tail)
