"""camera_face: real models, real photos, real files as camera sources.

Models and photos are read from the shared folder beside the repository
(never copied into it). People: four are enrolled from their photo 1 and
probed with their other photos; four others are strangers.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.config import ConfigError, parse_section
from agent.driver import Command, CommandError
from agent.testing.agent import wait_until
from drivers.camera_face import CameraFaceConfig, CameraFaceDriver
from drivers.camera_face.cli import add_cli
from drivers.camera_face.decision import FaceTracker, WatchlistJudge
from drivers.camera_face.models import (
    DEFAULT_EMBEDDER,
    FOAMLIU_IMPOSTOR_TAIL,
    ModelError,
    calibrated_threshold,
    manifest_entry,
)
from drivers.camera_face.pipeline import Face, FacePipeline, FaceSample, Quality
from drivers.camera_face.watchlist import (
    FILE_NAME,
    Gallery,
    Watchlist,
    WatchlistError,
    encode_embedding,
)
from tests.support.context import RecordingContext
from tests.support.shared import FACES, MODELS, require


@pytest.fixture(autouse=True)
def _shared_data() -> None:
    require(MODELS / DEFAULT_EMBEDDER, FACES)


ENROLLED = ["Abdullah_Gul", "Adrien_Brody", "Ana_Palacio", "Bill_Gates"]
STRANGERS = ["Andy_Roddick", "Ann_Veneman", "Ari_Fleischer", "Ben_Affleck"]
EMBEDDER = manifest_entry(DEFAULT_EMBEDDER)
assert EMBEDDER is not None
EMBEDDER_SHA = EMBEDDER.sha256


def photo(person: str, number: int) -> Path:
    return FACES / person / f"{number}.jpg"


def options(source: str | Path, **overrides: Any) -> CameraFaceConfig:
    table: dict[str, Any] = {
        "source": str(source),
        "models_dir": str(MODELS),
        "reconnect_min_delay": 0.05,
        "reconnect_max_delay": 0.2,
        **overrides,
    }
    return parse_section(CameraFaceConfig, table, "drivers.cam")


def canvas(image: np.ndarray | None = None) -> np.ndarray:
    """A 400x300 grey frame with a 250x250 photo in the middle (or empty)."""
    frame = np.full((300, 400, 3), 110, np.uint8)
    if image is not None:
        frame[25:275, 75:325] = image
    return frame


def write_video(path: Path, scenes: list[tuple[Path | None, int]], fps: float = 5.0) -> int:
    """A video of ``(photo or None for an empty frame, frame count)`` scenes; returns frames."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (400, 300))
    assert writer.isOpened()
    total = 0
    for source, count in scenes:
        frame = canvas(cv2.imread(str(source)) if source else None)
        for _ in range(count):
            writer.write(frame)
            total += 1
    writer.release()
    return total


def drop_image(folder: Path, source: Path, name: str) -> None:
    """Put a photo into a watched folder atomically, as a camera uploader would."""
    partial = folder / f".{name}.part"
    shutil.copyfile(source, partial)
    partial.replace(folder / name)


def counter(driver: CameraFaceDriver, name: str) -> float:
    return driver.health().counters.get(name, 0)


@pytest.fixture(scope="module")
def pipeline() -> FacePipeline:
    return FacePipeline.from_config(options("unused"))


@pytest.fixture(scope="module")
def enrolment(pipeline: FacePipeline) -> dict[str, np.ndarray]:
    result = {}
    for person in ENROLLED:
        vector, faces = pipeline.enrolment_embedding(cv2.imread(str(photo(person, 1))))
        assert vector is not None and faces >= 1
        result[person] = vector
    return result


def enrol_all(state_dir: Path, enrolment: dict[str, np.ndarray]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    watchlist = Watchlist(state_dir / FILE_NAME, DEFAULT_EMBEDDER, EMBEDDER_SHA, 128)
    for person, vector in enrolment.items():
        watchlist.add(
            person, person.replace("_", " "), [vector], list_name="high-risk", source="test"
        )
    watchlist.close()


@pytest.fixture
def run_driver(
    tmp_path: Path,
) -> Iterator[Callable[..., tuple[CameraFaceDriver, RecordingContext]]]:
    started: list[CameraFaceDriver] = []

    def run(
        config: CameraFaceConfig, state: Path | None = None
    ) -> tuple[CameraFaceDriver, RecordingContext]:
        ctx = RecordingContext(state or tmp_path / "state", name="cam")
        ctx.state_dir.mkdir(parents=True, exist_ok=True)
        driver = CameraFaceDriver(ctx, config)
        driver.start()
        started.append(driver)
        return driver, ctx

    yield run
    for driver in started:
        driver.stop()


# -- configuration and models ---------------------------------------------------------------


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"drivers\.cam\.threshold: no calibration is known"):
        options("x", embedder="mobilefacenet-128.tflite")
    with pytest.raises(ConfigError, match=r"drivers\.cam\.embedder_sha256: 'my.tflite' is not in"):
        options("x", embedder="my.tflite")
    with pytest.raises(ConfigError, match=r"drivers\.cam\.normalisation: the input scaling"):
        options("x", embedder="my.tflite", embedder_sha256="0" * 64)
    with pytest.raises(ConfigError, match=r"drivers\.cam\.source: unknown stream scheme 'ftp'"):
        options("ftp://camera/stream")
    sirius = options("x", embedder="mobilefacenet-128.tflite", threshold=0.5)
    assert sirius.embedder_file.normalisation == "symmetric" and sirius.threshold_for(900) == 0.5


def test_calibrated_threshold_rises_with_the_list() -> None:
    config = options("x")
    thresholds = [config.threshold_for(n) for n in (1, 10, 100, 1000, 3000, 10000)]
    assert thresholds == sorted(thresholds) and thresholds[0] == 0.35
    assert 0.52 < config.threshold_for(3000) < 0.6  # 1,000 persons with 3 photos each
    # A stricter target needs a higher threshold for the same list.
    assert calibrated_threshold(300, 1e-3, FOAMLIU_IMPOSTOR_TAIL) > config.threshold_for(300)


def test_missing_model_fails_start_with_file_and_hash(tmp_path: Path) -> None:
    ctx = RecordingContext(tmp_path, name="cam")
    driver = CameraFaceDriver(ctx, options(tmp_path, models_dir=str(tmp_path / "models")))
    with pytest.raises(ModelError) as error:
        driver.start()
    message = str(error.value)
    assert str(tmp_path / "models" / "face_detection_yunet_2023mar.onnx") in message
    assert "is missing" in message and "8f2383e4dd3c" in message and "fetch-models" in message


def test_wrong_model_file_refused(tmp_path: Path) -> None:
    """The sirius-ai file installed under the default's name: the hash check catches it."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "face_detection_yunet_2023mar.onnx").symlink_to(
        MODELS / "face_detection_yunet_2023mar.onnx"
    )
    (models / DEFAULT_EMBEDDER).symlink_to(MODELS / "mobilefacenet-128.tflite")
    driver = CameraFaceDriver(
        RecordingContext(tmp_path, name="cam"), options(tmp_path, models_dir=str(models))
    )
    with pytest.raises(
        ModelError,
        match=rf"{DEFAULT_EMBEDDER} has sha256 1435e94a\w+, expected {EMBEDDER_SHA}",
    ):
        driver.start()


# -- matching --------------------------------------------------------------------------------


def test_enrolled_people_match_and_strangers_do_not(
    tmp_path: Path, pipeline: FacePipeline, enrolment: dict[str, np.ndarray]
) -> None:
    enrol_all(tmp_path, enrolment)
    gallery = Watchlist(tmp_path / FILE_NAME).gallery()
    threshold = options("x").threshold_for(len(gallery))
    right = judged = 0
    for person in ENROLLED:
        for number in range(3, 7):
            samples = [
                s
                for s in pipeline.analyse(cv2.imread(str(photo(person, number))))
                if s.embedding is not None
            ]
            if not samples:
                continue
            judged += 1
            best = max(
                (gallery.best(s.embedding, threshold) for s in samples if s.embedding is not None),
                key=lambda m: m.score if m else -1,
            )
            right += best is not None and best.person_id == person and best.score >= threshold
    assert judged >= 14 and right / judged >= 0.85, (right, judged)
    for person in STRANGERS:
        for number in range(1, 6):
            for sample in pipeline.analyse(cv2.imread(str(photo(person, number)))):
                if sample.embedding is not None:
                    match = gallery.best(sample.embedding, threshold)
                    assert match is not None and match.score < threshold, (person, number, match)


def sample_at(
    box: tuple[float, float, float, float], vector: np.ndarray, norm: float = 18.0
) -> FaceSample:
    """A judged face at ``box`` whose embedding is ``vector`` (made unit length)."""
    face = Face(box, np.zeros((5, 2), np.float32), 0.9)
    unit = (vector / np.linalg.norm(vector)).astype(np.float32)
    return FaceSample(face, None, None, unit, Quality(100.0, 0.0, 0.0, norm))


def test_track_decides_once_from_its_aggregate_and_cooldown_per_person(
    pipeline: FacePipeline,
) -> None:
    person, other = np.eye(4, dtype=np.float32)[0], np.eye(4, dtype=np.float32)[1]
    gallery = Gallery(1, 4, [("p1", "P", "l", person.tobytes())])
    judge = WatchlistJudge(pipeline, gallery, 0.6, FaceTracker(3, 10.0, 1.0))
    here, there = (100.0, 100.0, 80.0, 80.0), (400.0, 100.0, 80.0, 80.0)
    noisy = person + 0.9 * other  # score 0.74 alone
    assert judge.decide([sample_at(here, noisy)], 0.0) == []
    # The face moves 40 px between frames (IoU below 0.3): still the same track.
    moved = (140.0, 100.0, 80.0, 80.0)
    assert judge.decide([sample_at(moved, other)], 0.1) == []
    (decision,) = judge.decide([sample_at(moved, person)], 0.2)
    assert decision.match.person_id == "p1" and decision.frames == 3 and decision.track == 1
    # Decided: the track gives no second event however long the person stays.
    assert judge.decide([sample_at(moved, person)], 0.3) == []
    # The same person on another track within the cooldown: no event, counted.
    for step in range(3):
        assert judge.decide([sample_at(there, person)], 0.4 + step / 10) == []
    assert judge.tracker.cooled_down == 1 and judge.counters.tracks_searched == 2
    # A stranger's track never decides; a poor face counts less than a good one.
    judge = WatchlistJudge(pipeline, gallery, 0.6, FaceTracker(3, 0.0, 1.0))
    for step in range(3):
        assert judge.decide([sample_at(here, other)], step / 10) == []
    assert judge.decide([sample_at(here, person, norm=8.0)] * 1, 0.3) == []
    # A track too short to be ready is decided when it ends (here: 1 frame, then gone).
    judge.decide([sample_at(there, person)], 0.4)
    (late,) = judge.decide([], 2.0)
    assert late.frames == 1 and late.match.person_id == "p1"


def test_video_gives_one_event_per_person_passing(
    tmp_path: Path, enrolment: dict[str, np.ndarray], run_driver: Any
) -> None:
    """Stranger, then Abdullah Gul twice (second time inside the cooldown), then Ana Palacio."""
    video = tmp_path / "entrance.avi"
    frames = write_video(
        video,
        [
            (photo("Andy_Roddick", 2), 6),
            (None, 3),
            (photo("Abdullah_Gul", 3), 6),
            (None, 5),
            (photo("Abdullah_Gul", 4), 6),
            (None, 5),
            (photo("Ana_Palacio", 4), 6),
            (None, 2),
        ],
    )
    enrol_all(tmp_path / "state", enrolment)
    driver, ctx = run_driver(options(video, min_frames=3, cooldown=60.0, track_timeout=0.5))
    wait_until(lambda: counter(driver, "frames") >= frames, what="the whole video")
    matches = [e for e in ctx.events if e.kind == "face.watchlist_match"]
    assert [e.payload["person_id"] for e in matches] == ["Abdullah_Gul", "Ana_Palacio"]
    event = matches[0]
    assert event.priority.label == "high"
    assert event.payload["name"] == "Abdullah Gul" and event.payload["list"] == "high-risk"
    assert (
        event.payload["score"]
        >= event.payload["threshold"]
        == round(options("x").threshold_for(4), 4)
    )
    assert event.payload["camera"] == "cam" and event.payload["frames"] == 3
    assert event.payload["watchlist_version"] == 4
    assert "crop_jpeg" not in event.payload
    health = driver.health()
    assert health.state == "ok"
    assert health.detail.endswith(
        f"4 persons (4 photos), threshold {options('x').threshold_for(4):.3f}"
    )
    assert health.counters["suppressed_cooldown"] >= 1 and health.counters["faces"] >= 20
    assert health.counters["watchlist_entries"] == 4
    assert not [e for e in ctx.events if e.kind.startswith("device.")]


def test_short_cooldown_reports_a_returning_person_again(
    tmp_path: Path, enrolment: dict[str, np.ndarray], run_driver: Any
) -> None:
    video = tmp_path / "entrance.avi"
    frames = write_video(
        video, [(photo("Abdullah_Gul", 3), 5), (None, 10), (photo("Abdullah_Gul", 5), 5)]
    )
    enrol_all(tmp_path / "state", enrolment)
    driver, ctx = run_driver(
        options(video, min_frames=2, cooldown=1.0, track_timeout=0.5, include_crop=True)
    )
    wait_until(lambda: counter(driver, "frames") >= frames, what="the whole video")
    matches = ctx.wait_for("face.watchlist_match", 2)
    assert len(matches) == 2
    crop = cv2.imdecode(
        np.frombuffer(base64.b64decode(matches[0].payload["crop_jpeg"]), np.uint8), cv2.IMREAD_COLOR
    )
    assert crop.shape == (112, 112, 3)


# -- commands from the centre -------------------------------------------------------------------


def jpeg_base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def command(ctx: RecordingContext, kind: str, /, **args: Any) -> Any:
    """Call the handlers of a command from the centre (args may include 'name')."""
    cmd = Command(id=f"c{time.monotonic_ns()}", name=kind, issued_at=time.time(), args=args)
    return [handler(cmd) for handler in ctx.handlers.get(kind, [])]


def test_centre_commands_add_remove_and_reject(
    tmp_path: Path, enrolment: dict[str, np.ndarray], run_driver: Any
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    driver, ctx = run_driver(options(folder, min_frames=1, cooldown=0.0))
    (result,) = command(
        ctx,
        "watchlist.add",
        id="P1",
        name="Bill Gates",
        list="banned",
        images=[
            jpeg_base64(photo("Bill_Gates", 1)),
            base64.b64encode(cv2.imencode(".png", canvas())[1].tobytes()).decode(),
        ],
    )
    assert result == {
        "version": 1,
        "id": "P1",
        "embeddings_added": 1,
        "faces_found": [1, 0],
        "model": DEFAULT_EMBEDDER,
    }
    embedding = encode_embedding(enrolment["Ana_Palacio"])
    with pytest.raises(CommandError, match="must say which model"):
        command(ctx, "watchlist.add", id="P2", name="Ana", embeddings=[embedding])
    with pytest.raises(CommandError, match="embeddings are from a model with sha256 1435e94a"):
        command(
            ctx,
            "watchlist.add",
            id="P2",
            name="Ana",
            embeddings=[embedding],
            model_sha256="1435e94ac27243d35b1282a0dbe858cf24416eaed1accfb3311966f8277a50c2",
        )
    with pytest.raises(CommandError, match="embedding has 12 bytes, expected 512"):
        command(
            ctx,
            "watchlist.add",
            id="P2",
            name="Ana",
            embeddings=["AAAAAAAAAAAAAAAA"],
            model_sha256=EMBEDDER_SHA,
        )
    with pytest.raises(CommandError, match=r"images\[0\] is not a JPEG or PNG image"):
        command(
            ctx,
            "watchlist.add",
            id="P2",
            name="Ana",
            images=[base64.b64encode(b"not an image").decode()],
        )
    (result,) = command(
        ctx,
        "watchlist.add",
        id="P2",
        name="Ana Palacio",
        embeddings=[embedding],
        model_sha256=EMBEDDER_SHA,
    )
    assert result["version"] == 2
    assert command(ctx, "watchlist.remove", id="P2")[0] == {
        "version": 3,
        "id": "P2",
        "removed": True,
    }
    assert command(ctx, "watchlist.remove", id="P2")[0] == {
        "version": 3,
        "id": "P2",
        "removed": False,
    }

    drop_image(folder, photo("Bill_Gates", 3), "001.jpg")
    (event,) = ctx.wait_for("face.watchlist_match")
    assert event.payload["person_id"] == "P1" and event.payload["list"] == "banned"
    assert event.payload["watchlist_version"] == 3
    # The centre: "that was not P1". The same face no longer matches; P1's own photos still would.
    (result,) = command(ctx, "face.reject", event_id=event.id)
    assert result == {"person_id": "P1", "event_id": event.id, "rejections": 1}
    assert command(ctx, "face.reject", event_id="unknown-event") == [None]  # another camera's
    # The same face again once its track has ended (a track decides only once).
    wait_until(lambda: counter(driver, "tracks") == 0, what="the first track to end")
    drop_image(folder, photo("Bill_Gates", 3), "002.jpg")
    wait_until(lambda: counter(driver, "suppressed_rejected") >= 1, what="the rejected face")
    assert len(ctx.wait_for("face.watchlist_match")) == 1
    assert driver.health().counters["watchlist_version"] == 3
    # More photos of P1, several at once, up to 5 in all.
    (result,) = command(
        ctx,
        "watchlist.add",
        id="P1",
        name="Bill Gates",
        list="banned",
        images=[jpeg_base64(photo("Bill_Gates", n)) for n in (2, 4)],
    )
    assert result["embeddings_added"] == 2 and result["version"] == 4
    wait_until(lambda: counter(driver, "watchlist_photos") == 3, what="the new photos in use")
    with pytest.raises(CommandError, match="'P1' would have 6 photos; at most 5 per person"):
        command(
            ctx,
            "watchlist.add",
            id="P1",
            name="Bill Gates",
            images=[jpeg_base64(photo("Bill_Gates", n)) for n in (5, 6, 7)],
        )


def test_watchlist_refuses_another_model(
    tmp_path: Path, enrolment: dict[str, np.ndarray], run_driver: Any
) -> None:
    enrol_all(tmp_path / "state", enrolment)
    with pytest.raises(WatchlistError, match=rf"holds 4 embeddings of model '{DEFAULT_EMBEDDER}'"):
        Watchlist(tmp_path / "state" / FILE_NAME, "mobilefacenet-128.tflite", "1" * 64, 128)
    ctx = RecordingContext(tmp_path / "state", name="cam")
    driver = CameraFaceDriver(
        ctx, options(tmp_path, embedder="mobilefacenet-128.tflite", threshold=0.5)
    )
    with pytest.raises(WatchlistError, match="configure that model, or export the list"):
        driver.start()


# -- sources coming and going ---------------------------------------------------------------------


def test_image_folder_unplugged_and_replugged(
    tmp_path: Path, enrolment: dict[str, np.ndarray], run_driver: Any
) -> None:
    folder = tmp_path / "usb"
    folder.mkdir()
    enrol_all(tmp_path / "state", enrolment)
    driver, ctx = run_driver(options(folder, min_frames=1, source_type="image_folder"))
    drop_image(folder, photo("Adrien_Brody", 3), "a.jpg")
    ctx.wait_for("face.watchlist_match")
    folder.rename(tmp_path / "away")
    (offline,) = ctx.wait_for("device.offline")
    assert offline.payload["camera"] == "cam" and "usb" in offline.payload["reason"]
    wait_until(lambda: driver.health().state == "degraded", what="degraded health")
    assert "camera offline" in driver.health().detail
    (tmp_path / "away").rename(folder)
    ctx.wait_for("device.online")
    drop_image(folder, photo("Bill_Gates", 3), "b.jpg")
    events = ctx.wait_for("face.watchlist_match", 2)
    assert {e.payload["person_id"] for e in events} == {"Adrien_Brody", "Bill_Gates"}
    assert len(ctx.wait_for("device.offline")) == 1 and driver.health().state == "ok"


def test_video_file_removed_and_restored_is_played_again(
    tmp_path: Path, enrolment: dict[str, np.ndarray], run_driver: Any
) -> None:
    video = tmp_path / "replay.avi"
    frames = write_video(video, [(photo("Ana_Palacio", 4), 4), (None, 2)])
    enrol_all(tmp_path / "state", enrolment)
    driver, ctx = run_driver(options(video, min_frames=2, cooldown=0.0))
    ctx.wait_for("face.watchlist_match")
    wait_until(lambda: counter(driver, "frames") >= frames, what="the first play")
    video.rename(tmp_path / "kept.avi")
    ctx.wait_for("device.offline")
    (tmp_path / "kept.avi").rename(video)
    ctx.wait_for("device.online")
    assert len(ctx.wait_for("face.watchlist_match", 2)) == 2
    wait_until(lambda: counter(driver, "frames") >= 2 * frames, what="the second play")


def test_live_stream_that_ends_is_reconnected(tmp_path: Path, run_driver: Any) -> None:
    """A video file opened as a stream (FFmpeg, newest-frame grabbing): its end is a lost stream."""
    video = tmp_path / "stream.avi"
    write_video(video, [(photo("Andy_Roddick", 2), 10)])
    driver, ctx = run_driver(options(video, source_type="stream", read_timeout=2.0))
    offline = ctx.wait_for("device.offline")
    assert "stream ended" in offline[0].payload["reason"]
    ctx.wait_for("device.online")
    assert counter(driver, "frames") >= 1 and counter(driver, "offline") >= 1
    assert not [e for e in ctx.events if e.kind == "face.watchlist_match"]


def test_missing_camera_device_is_offline_not_fatal(tmp_path: Path, run_driver: Any) -> None:
    driver, ctx = run_driver(options("/dev/video-does-not-exist"))
    (event,) = ctx.wait_for("device.offline")
    assert "does not exist" in event.payload["reason"]
    assert driver.health().state == "degraded"


class FakePicamera2:
    """Stands in for ``picamera2.Picamera2`` with one CSI camera that can be unplugged.

    Like the real one: ``global_camera_info()`` lists only connected cameras, a
    started camera returns ``RGB888`` frames (B, G, R in memory) of the configured
    size, and when the ribbon cable comes out ``capture_array`` blocks (libcamera
    waits for a frame that never comes) until the camera is stopped.
    """

    plugged = True
    scene: np.ndarray | None = None
    instances: list[FakePicamera2] = []

    def __init__(self, number: int):
        if not FakePicamera2.plugged:
            raise RuntimeError("Camera __init__ sequence did not complete.")
        self.number = number
        self.size = (640, 480)
        self.started = False
        self.closed = False
        self._stopped = threading.Event()
        FakePicamera2.instances.append(self)

    @staticmethod
    def global_camera_info() -> list[dict[str, Any]]:
        return [{"Model": "imx708", "Num": 0}] if FakePicamera2.plugged else []

    def create_video_configuration(self, main: dict[str, Any], buffer_count: int) -> Any:
        assert main["format"] == "RGB888" and buffer_count >= 1
        return {"main": main}

    def configure(self, config: dict[str, Any]) -> None:
        self.size = config["main"].get("size", self.size)

    def start(self) -> None:
        self.started = True

    def capture_array(self, name: str = "main") -> np.ndarray:
        assert self.started and name == "main"
        if not FakePicamera2.plugged:
            self._stopped.wait()
            raise RuntimeError("Camera frontend has timed out!")
        time.sleep(0.04)  # 25 frames/s
        frame = np.full((self.size[1], self.size[0], 3), 110, np.uint8)
        if FakePicamera2.scene is not None:
            frame[100:350, 150:400] = FakePicamera2.scene
        return frame

    def stop(self) -> None:
        self.started = False
        self._stopped.set()

    def close(self) -> None:
        self.closed = True
        self._stopped.set()


def test_pi_camera_unplugged_and_replugged(
    tmp_path: Path,
    enrolment: dict[str, np.ndarray],
    run_driver: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = types.ModuleType("picamera2")
    module.Picamera2 = FakePicamera2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "picamera2", module)
    monkeypatch.setattr(FakePicamera2, "instances", [])
    monkeypatch.setattr(FakePicamera2, "scene", cv2.imread(str(photo("Adrien_Brody", 3))))
    enrol_all(tmp_path / "state", enrolment)
    config = options("picamera", width=640, height=480, read_timeout=1.0)
    assert config.source_type == "auto"
    driver, ctx = run_driver(config)
    (event,) = ctx.wait_for("face.watchlist_match")
    assert event.payload["person_id"] == "Adrien_Brody" and driver.health().state == "ok"
    assert FakePicamera2.instances[0].size == (640, 480)
    monkeypatch.setattr(FakePicamera2, "plugged", False)
    (offline,) = ctx.wait_for("device.offline")
    assert "no frame for" in offline.payload["reason"]
    wait_until(lambda: driver.health().state == "degraded", what="degraded health")
    # While it is out, reconnecting finds no camera and says so.
    wait_until(lambda: "not found" in driver.health().detail, what="a failed reconnect")
    assert FakePicamera2.instances[0].closed  # the lost camera was released
    monkeypatch.setattr(FakePicamera2, "scene", cv2.imread(str(photo("Bill_Gates", 3))))
    monkeypatch.setattr(FakePicamera2, "plugged", True)
    ctx.wait_for("device.online")
    events = ctx.wait_for("face.watchlist_match", 2)
    assert events[1].payload["person_id"] == "Bill_Gates"
    assert len(ctx.wait_for("device.offline")) == 1 and driver.health().state == "ok"


def test_pi_camera_without_picamera2_is_offline_with_the_fix(
    tmp_path: Path, run_driver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)  # import fails as if not installed
    driver, ctx = run_driver(options("picamera:1"))
    assert driver.health().state in ("starting", "degraded")
    (event,) = ctx.wait_for("device.offline")
    assert "apt install python3-picamera2" in event.payload["reason"]
    with pytest.raises(ConfigError, match=r"drivers\.cam\.source: 'picamera:x' is not a Pi camera"):
        options("picamera:x")


# -- command line ---------------------------------------------------------------------------------


def test_cli_add_list_remove_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "wardpost.toml"
    config.write_text(f"""
[agent]
site = "s"
device = "d"
state_dir = "{tmp_path / "state"}"

[drivers.door]
type = "camera_face"
source = "/dev/video0"
models_dir = "{MODELS}"
""")
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))

    def run(*argv: str) -> int:
        args = parser.parse_args(["watchlist", *argv, "--config", str(config)])
        code: int = args.func(args)
        return code

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), canvas())
    assert (
        run(
            "add",
            "--id",
            "X1",
            "--name",
            "Adrien Brody",
            "--list",
            "vip",
            str(photo("Adrien_Brody", 1)),
            str(photo("Adrien_Brody", 3)),
            str(blank),
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"{photo('Adrien_Brody', 1)}: 1 face found" in out and f"{blank}: 0 faces found" in out
    assert "from 2 of 3 images; watchlist version 1" in out
    assert (tmp_path / "state" / "drivers" / "door" / FILE_NAME).is_file()
    assert run("add", "--id", "X2", "--name", "Nobody", str(blank)) == 1
    assert "no face found" in capsys.readouterr().err
    assert run("list") == 0
    out = capsys.readouterr().out
    assert "watchlist version 1" in out and "X1" in out and "Adrien Brody" in out and "vip" in out
    assert "2 photos; threshold 0.350 (calibrated for FPIR 0.01 with 2 enrolled photos" in out
    assert run("list", "--json") == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == 0.35
    # At most 5 photos per person: 2 held + 4 more is refused, and nothing is added.
    more = [str(photo("Adrien_Brody", n)) for n in (4, 5, 6, 7)]
    assert run("add", "--id", "X1", "--name", "Adrien Brody", *more) == 1
    assert "'X1' would have 6 photos; at most 5 per person" in capsys.readouterr().err
    assert run("export") == 0
    exported = json.loads(capsys.readouterr().out)
    assert (
        exported["model_sha256"] == EMBEDDER_SHA and len(exported["persons"][0]["embeddings"]) == 2
    )
    assert run("remove", "X1") == 0 and "version 2" in capsys.readouterr().out
    assert run("remove", "X1") == 1
    assert run("list", "--driver", "gate") == 1
    assert "no camera_face driver named 'gate' (configured: door)" in capsys.readouterr().err


# -- model installation -----------------------------------------------------------------------

_WITHOUT_OPENCV = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("cv2", "numpy"):
            raise ImportError(name + " is not installed here")
sys.meta_path.insert(0, Block())
sys.argv = ["fetch-models", *sys.argv[1:]]
runpy.run_path("scripts/fetch-models", run_name="__main__")
"""


def test_fetch_models_needs_neither_opencv_nor_numpy(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    dest = tmp_path / "models"
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OPENCV, "--from", str(MODELS), "--dest", str(dest)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"{DEFAULT_EMBEDDER}: installed from" in done.stdout
    assert (dest / "face_detection_yunet_2023mar.onnx").is_file()
    # A damaged copy is refused by its hash, still without OpenCV.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "face_detection_yunet_2023mar.onnx").write_bytes(b"not the model")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _WITHOUT_OPENCV,
            "--from",
            str(damaged),
            "--dest",
            str(tmp_path / "other"),
            "face_detection_yunet_2023mar.onnx",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and "expected 8f2383e4" in done.stderr


def test_command_arguments_follow_the_contract() -> None:
    from contract.commands import ContractError, validate_args

    def valid(name: str, args: dict[str, Any]) -> bool:
        try:
            validate_args(name, args)
        except ContractError:
            return False
        return True

    photo_b64 = jpeg_base64(photo("Bill_Gates", 1))
    assert valid(
        "watchlist.add",
        {"id": "P1", "name": "B", "list": "banned", "images": [photo_b64, photo_b64, photo_b64]},
    )
    assert valid(
        "watchlist.add",
        {"id": "P2", "name": "A", "embeddings": ["AAAA"], "model_sha256": EMBEDDER_SHA},
    )
    assert not valid("watchlist.add", {"id": "P3", "name": "C"})  # neither photos nor embeddings
    assert not valid("watchlist.add", {"id": "P3", "name": "C", "images": [photo_b64] * 6})
    assert valid("watchlist.remove", {"id": "P1"})
    assert valid("face.reject", {"event_id": "e1"})
    assert not valid("face.reject", {"person_id": "P1"})
