"""camera_face end to end: a video of an enrolled person becomes an MQTT event at the centre."""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from agent.testing.agent import DEADLINE, AgentHarness, Recorder, wait_until
from agent.testing.broker import Broker
from drivers.camera_face.models import DEFAULT_EMBEDDER
from drivers.camera_face.pipeline import FacePipeline
from drivers.camera_face.watchlist import FILE_NAME, Watchlist
from tests.drivers.test_camera_face import options, photo, write_video
from tests.support.shared import FACES, MODELS, require


@pytest.fixture(autouse=True)
def _shared_data() -> None:
    require(MODELS / DEFAULT_EMBEDDER, FACES)


def test_enrolled_person_on_video_reaches_the_centre(tmp_path: Path, broker: Broker) -> None:
    video = tmp_path / "door.avi"
    write_video(video, [(None, 3), (photo("Bill_Gates", 3), 8), (None, 3)])
    state = tmp_path / "state" / "drivers" / "door"
    state.mkdir(parents=True)
    config = options(video)
    pipeline = FacePipeline.from_config(config)
    embedding, _ = pipeline.enrolment_embedding(cv2.imread(str(photo("Bill_Gates", 1))))
    assert embedding is not None
    model = config.embedder_file
    watchlist = Watchlist(state / FILE_NAME, model.name, model.sha256, pipeline.embedder.dimension)
    watchlist.add("W-17", "Bill Gates", [embedding], list_name="banned", source="test")
    watchlist.close()

    drivers = {
        "door": {"type": "camera_face", "source": str(video), "models_dir": str(MODELS)},
        # Same driver, no models: it alone fails; the agent and the door camera carry on.
        "lobby": {
            "type": "camera_face",
            "source": str(video),
            "models_dir": str(tmp_path / "none"),
        },
    }
    with Recorder(broker) as centre, AgentHarness(tmp_path, broker, drivers):
        (event,) = centre.wait_events("face.watchlist_match", timeout=30)
        assert event["priority"] == "high" and event["source"] == "door"
        assert event["payload"]["person_id"] == "W-17" and event["payload"]["list"] == "banned"
        assert event["payload"]["score"] >= event["payload"]["threshold"]
        failed = centre.wait_events("agent.driver_failed", timeout=10)
        assert failed[0]["payload"]["driver"] == "lobby"
        assert (
            "mobilefacenet" in failed[0]["payload"]["error"]
            or "yunet" in failed[0]["payload"]["error"]
        )

        def heartbeat_shows_both() -> bool:
            beats = [m.json() for m in centre.on_topic("/heartbeat")]
            return any(
                b["drivers"].get("lobby", {}).get("state") == "failed"
                and b["drivers"].get("door", {}).get("state") == "ok"
                for b in beats
            )

        wait_until(heartbeat_shows_both, DEADLINE, "a heartbeat with lobby failed and door ok")
