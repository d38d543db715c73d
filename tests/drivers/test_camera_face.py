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
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.config import ConfigError, parse_section
from agent.driver import Command, CommandError
from drivers.camera_face import CameraFaceConfig, CameraFaceDriver
from drivers.camera_face.cli import add_cli
from drivers.camera_face.decision import Vote, VoteTracker
from drivers.camera_face.models import ModelError
from drivers.camera_face.pipeline import FacePipeline, FaceSample
from drivers.camera_face.watchlist import (
    FILE_NAME,
    Match,
    Watchlist,
    WatchlistError,
    encode_embedding,
)
from tests.support.context import RecordingContext
from tests.support.shared import FACES, MODELS, require


@pytest.fixture(autouse=True)
def _shared_data() -> None:
    require(MODELS / "mobilefacenet-foamliu-fp32.tflite", FACES)


ENROLLED = ["Abdullah_Gul", "Adrien_Brody", "Ana_Palacio", "Bill_Gates"]
STRANGERS = ["Andy_Roddick", "Ann_Veneman", "Ari_Fleischer", "Ben_Affleck"]
FOAMLIU_SHA = "f6513ddea780f211c8ab490706ad1cb5e5f9e3bf3b6073c64ad815a73bab8a65"


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


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


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
    watchlist = Watchlist(
        state_dir / FILE_NAME, "mobilefacenet-foamliu-fp32.tflite", FOAMLIU_SHA, 128
    )
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
    with pytest.raises(ConfigError, match=r"drivers\.cam\.vote_k: must not exceed vote_n"):
        options("x", vote_k=5, vote_n=3)
    with pytest.raises(ConfigError, match=r"drivers\.cam\.embedder_sha256: 'my.tflite' is not in"):
        options("x", embedder="my.tflite")
    with pytest.raises(ConfigError, match=r"drivers\.cam\.normalisation: the input scaling"):
        options("x", embedder="my.tflite", embedder_sha256="0" * 64)
    with pytest.raises(ConfigError, match=r"drivers\.cam\.source: unknown stream scheme 'ftp'"):
        options("ftp://camera/stream")
    assert (
        options("x", embedder="mobilefacenet-128.tflite").embedder_file.normalisation == "symmetric"
    )


def test_missing_model_fails_start_with_file_and_hash(tmp_path: Path) -> None:
    ctx = RecordingContext(tmp_path, name="cam")
    driver = CameraFaceDriver(ctx, options(tmp_path, models_dir=str(tmp_path / "models")))
    with pytest.raises(ModelError) as error:
        driver.start()
    message = str(error.value)
    assert str(tmp_path / "models" / "face_detection_yunet_2023mar.onnx") in message
    assert "is missing" in message and "8f2383e4dd3c" in message and "fetch-models" in message


def test_wrong_model_file_refused(tmp_path: Path) -> None:
    """The sirius-ai file installed under the foamliu name: the hash check catches it."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "face_detection_yunet_2023mar.onnx").symlink_to(
        MODELS / "face_detection_yunet_2023mar.onnx"
    )
    (models / "mobilefacenet-foamliu-fp32.tflite").symlink_to(MODELS / "mobilefacenet-128.tflite")
    driver = CameraFaceDriver(
        RecordingContext(tmp_path, name="cam"), options(tmp_path, models_dir=str(models))
    )
    with pytest.raises(
        ModelError,
        match=rf"mobilefacenet-foamliu-fp32.tflite has sha256 1435e94a\w+, expected {FOAMLIU_SHA}",
    ):
        driver.start()


# -- matching --------------------------------------------------------------------------------


def test_enrolled_people_match_and_strangers_do_not(
    tmp_path: Path, pipeline: FacePipeline, enrolment: dict[str, np.ndarray]
) -> None:
    enrol_all(tmp_path, enrolment)
    gallery = Watchlist(tmp_path / FILE_NAME).gallery()
    threshold = options("x").threshold
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


def test_vote_needs_k_of_n_per_track_and_cooldown_per_person() -> None:
    sample = FaceSample.__new__(FaceSample)  # votes only carry it along
    hit = Vote(Match("p1", "P", "l", 0.7), sample)
    miss = Vote(None, sample)
    here, there = (100.0, 100.0, 80.0, 80.0), (400.0, 100.0, 80.0, 80.0)
    tracker = VoteTracker(k=2, n=3, cooldown=10.0, track_timeout=1.0)
    assert tracker.update(0.0, [(here, hit)]) == []
    assert tracker.update(0.1, [(here, miss)]) == []
    assert tracker.update(0.2, [(here, miss)]) == []
    assert tracker.update(0.3, [(here, hit)]) == []  # only 1 of the last 3 agree
    decisions = tracker.update(0.4, [(here, hit)])
    assert [(d.match.person_id, d.agreeing, d.judged) for d in decisions] == [("p1", 2, 3)]
    # Same person on another track within the cooldown: no second event.
    assert tracker.update(0.5, [(there, hit)]) == [] and tracker.update(0.6, [(there, hit)]) == []
    assert tracker.cooled_down == 1
    # Two faces of one frame are two tracks: one vote each, so k=2 is not reached at once.
    tracker = VoteTracker(k=2, n=3, cooldown=0.0, track_timeout=1.0)
    assert tracker.update(0.0, [(here, hit), (there, hit)]) == []
    # A track that was not seen for longer than the timeout starts over.
    assert tracker.update(5.0, [(here, hit)]) == []
    assert len(tracker.update(5.1, [(here, hit)])) == 1


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
    driver, ctx = run_driver(options(video, vote_k=2, vote_n=4, cooldown=60.0, track_timeout=0.5))
    wait_until(lambda: counter(driver, "frames") >= frames, what="the whole video")
    matches = [e for e in ctx.events if e.kind == "face.watchlist_match"]
    assert [e.payload["person_id"] for e in matches] == ["Abdullah_Gul", "Ana_Palacio"]
    event = matches[0]
    assert event.priority.label == "high"
    assert event.payload["name"] == "Abdullah Gul" and event.payload["list"] == "high-risk"
    assert event.payload["score"] >= event.payload["threshold"] == 0.45
    assert event.payload["camera"] == "cam" and event.payload["votes"].startswith("2/")
    assert event.payload["watchlist_version"] == 4
    assert "crop_jpeg" not in event.payload
    health = driver.health()
    assert health.state == "ok"
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
        options(video, vote_k=2, vote_n=3, cooldown=1.0, track_timeout=0.5, include_crop=True)
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
    driver, ctx = run_driver(options(folder, vote_k=1, vote_n=1, cooldown=0.0))
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
        "model": "mobilefacenet-foamliu-fp32.tflite",
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
            model_sha256=FOAMLIU_SHA,
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
        model_sha256=FOAMLIU_SHA,
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
    drop_image(folder, photo("Bill_Gates", 3), "002.jpg")
    wait_until(lambda: counter(driver, "suppressed_rejected") >= 1, what="the rejected face")
    assert len(ctx.wait_for("face.watchlist_match")) == 1
    assert driver.health().counters["watchlist_version"] == 3


def test_watchlist_refuses_another_model(
    tmp_path: Path, enrolment: dict[str, np.ndarray], run_driver: Any
) -> None:
    enrol_all(tmp_path / "state", enrolment)
    with pytest.raises(
        WatchlistError, match=r"holds 4 embeddings of model 'mobilefacenet-foamliu-fp32\.tflite'"
    ):
        Watchlist(tmp_path / "state" / FILE_NAME, "mobilefacenet-128.tflite", "1" * 64, 128)
    ctx = RecordingContext(tmp_path / "state", name="cam")
    driver = CameraFaceDriver(ctx, options(tmp_path, embedder="mobilefacenet-128.tflite"))
    with pytest.raises(WatchlistError, match="configure that model, or export the list"):
        driver.start()


# -- sources coming and going ---------------------------------------------------------------------


def test_image_folder_unplugged_and_replugged(
    tmp_path: Path, enrolment: dict[str, np.ndarray], run_driver: Any
) -> None:
    folder = tmp_path / "usb"
    folder.mkdir()
    enrol_all(tmp_path / "state", enrolment)
    driver, ctx = run_driver(options(folder, vote_k=1, vote_n=1, source_type="image_folder"))
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
    driver, ctx = run_driver(options(video, vote_k=2, vote_n=3, cooldown=0.0))
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
    assert run("export") == 0
    exported = json.loads(capsys.readouterr().out)
    assert (
        exported["model_sha256"] == FOAMLIU_SHA and len(exported["persons"][0]["embeddings"]) == 2
    )
    assert run("remove", "X1") == 0 and "version 2" in capsys.readouterr().out
    assert run("remove", "X1") == 1
    assert run("list", "--driver", "gate") == 1
    assert "no camera_face driver named 'gate' (configured: door)" in capsys.readouterr().err
