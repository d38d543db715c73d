"""The ``camera_face`` driver: a camera that reports watchlist persons, and nothing else.

Frames never leave the device. For each frame the driver detects faces,
drops those too poor to judge, embeds the rest and searches the watchlist;
a match becomes a ``face.watchlist_match`` event only when several frames of
the same face agree and the person is not in cooldown. Faces of people not on
the watchlist are neither stored nor published.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from agent.backoff import Backoff
from agent.driver import Command, CommandError, Driver, DriverContext, Health, Timer
from agent.event import Priority
from agent.homeassistant import Entity
from drivers.camera_face.config import CameraFaceConfig
from drivers.camera_face.decision import Decision, FaceTracker, WatchlistJudge
from drivers.camera_face.pipeline import FacePipeline, Image, Vector
from drivers.camera_face.source import Frame, FrameSource, SourceLost, open_source
from drivers.camera_face.watchlist import (
    DEFAULT_LIST,
    FILE_NAME,
    Watchlist,
    WatchlistError,
    decode_embedding,
)

#: Largest accepted base64 photo in a ``watchlist.add`` command.
_MAX_IMAGE_CHARS = 8 * 1024 * 1024
_HOUSEKEEPING_INTERVAL = 2.0
#: Consecutive frames failing with an unexpected error before health says "failed".
_FAILING_FRAMES = 20


def decode_image(text: Any, where: str) -> Image:
    """A BGR image from base64 JPEG/PNG, or :class:`CommandError` naming ``where``."""
    if not isinstance(text, str) or not text:
        raise CommandError(f"{where} must be a base64 string")
    if len(text) > _MAX_IMAGE_CHARS:
        raise CommandError(f"{where} is larger than {_MAX_IMAGE_CHARS} base64 characters")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError(f"{where} is not valid base64") from None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise CommandError(f"{where} is not a JPEG or PNG image")
    decoded: Image = image
    return decoded


def _string_list(args: Mapping[str, Any], key: str) -> list[str]:
    value = args.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CommandError(f"{key} must be a list of base64 strings")
    return value


def _optional_text(args: Mapping[str, Any], key: str) -> str | None:
    value = args.get(key)
    if value is not None and not isinstance(value, str):
        raise CommandError(f"{key} must be a string")
    return value


class CameraFaceDriver(Driver):
    """Matches faces seen by one camera against this device's watchlist.

    Commands from the centre: ``watchlist.add`` (``id``, ``name``, ``list``,
    ``images`` as base64 JPEG and/or ``embeddings`` as base64 float32 with
    ``model_sha256``), ``watchlist.remove`` (``id``), both answering with the
    new ``version``; ``face.reject`` (``event_id``: "that match was wrong").
    """

    config_class = CameraFaceConfig
    summary = "camera with on-device face matching against a watchlist"

    home_assistant = (
        Entity(
            "event",
            "match",
            "watchlist match",
            "face.watchlist_match",
            "'match'",
            attributes=("person_id", "name", "list", "score", "camera"),
            options={"event_types": ["match"], "icon": "mdi:face-recognition"},
        ),
    )

    config: CameraFaceConfig

    def __init__(self, ctx: DriverContext, config: CameraFaceConfig):
        super().__init__(ctx, config)
        self.camera = config.camera or ctx.name
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._housekeeping: Timer | None = None
        self._pipeline_lock = threading.Lock()
        self._judge: WatchlistJudge | None = None
        self._watchlist: Watchlist | None = None
        self._source: FrameSource | None = None
        self._commands_registered = False
        self._online: bool | None = None
        self._offline_reason = ""
        self._failure = ""
        self._errors_in_a_row = 0
        self._counters = {"matches": 0, "offline": 0, "errors": 0}
        self._frame_seconds = 0.0
        self._latency = 0.0
        self._last_frame_time = 0.0
        self._ticks = 0

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Verify and load the models and the watchlist, then start watching.

        A missing or altered model file, or a watchlist of another model, raises
        here with a message naming the file: only this driver fails.
        """
        pipeline = FacePipeline.from_config(self.config)
        model = self.config.embedder_file
        watchlist = Watchlist(
            self.ctx.state_dir / FILE_NAME, model.name, model.sha256, pipeline.embedder.dimension
        )
        config = self.config
        tracker = FaceTracker(config.min_frames, config.cooldown, config.track_timeout)
        self._watchlist = watchlist
        gallery = watchlist.gallery()
        self._judge = WatchlistJudge(pipeline, gallery, config.threshold_for(len(gallery)), tracker)
        if not self._commands_registered:
            self.ctx.on_command("watchlist.add", self._add_command)
            self.ctx.on_command("watchlist.remove", self._remove_command)
            self.ctx.on_command("face.reject", self._reject_command)
            self._commands_registered = True
        self._source = open_source(config)
        self._stopping.clear()
        self._failure = ""
        self._housekeeping = self.ctx.every(_HOUSEKEEPING_INTERVAL, self._tidy)
        self._thread = threading.Thread(
            target=self._run, name=f"camera {self.ctx.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        if self._thread is not None:
            self._thread.join(self.config.read_timeout + 2.0)
            self._thread = None
        if self._watchlist is not None:
            self._watchlist.close()
            self._watchlist = None

    # -- capture loop -------------------------------------------------------------------------

    def _run(self) -> None:
        source = self._source
        assert source is not None
        retry = Backoff(self.config.reconnect_min_delay, self.config.reconnect_max_delay)
        while not self._stopping.is_set():
            try:
                source.open()
            except SourceLost as exc:
                self._lost(str(exc))
                self._stopping.wait(retry.next())
                continue
            self._found()
            retry.reset()
            try:
                self._consume(source)
            except SourceLost as exc:
                self._lost(str(exc))
            except Exception as exc:  # a bug must show in health, not kill the camera silently
                self.ctx.log.exception("camera %s: capture loop failed", self.camera)
                self._failure = f"capture loop failed: {exc}"
            finally:
                source.close()
                self._end_tracks()
            if self._failure:
                return
            self._stopping.wait(retry.next())

    def _consume(self, source: FrameSource) -> None:
        interval = 1.0 / self.config.max_fps if self.config.max_fps else 0.0
        next_frame_at = 0.0
        while not self._stopping.is_set():
            if interval:
                self._stopping.wait(max(0.0, next_frame_at - time.monotonic()))
                next_frame_at = time.monotonic() + interval
            frame = source.read(timeout=0.5)
            if frame is not None:
                self._process(frame)
            else:
                self._idle(source)

    def _end_tracks(self) -> None:
        """The camera is gone: its tracks end (those not yet decided are decided now)."""
        judge = self._judge
        assert judge is not None
        with self._pipeline_lock:
            decisions = judge.finish(self._last_frame_time)
        for decision in decisions:
            self._emit_match(decision)

    def _idle(self, source: FrameSource) -> None:
        """No new frame: close the tracks that ended (all of them when a file ended)."""
        judge = self._judge
        assert judge is not None
        if not source.live:  # the file or folder has no more: its tracks end
            self._end_tracks()
            return
        with self._pipeline_lock:
            decisions = judge.expire(time.monotonic())
        for decision in decisions:
            self._emit_match(decision)

    def _process(self, frame: Frame) -> None:
        judge = self._judge
        assert judge is not None
        started = time.perf_counter()
        try:
            with self._pipeline_lock:
                decisions = judge.judge(frame.image, frame.time)
        except Exception as exc:  # one bad frame must not stop the camera
            self._counters["errors"] += 1
            self._errors_in_a_row += 1
            if self._errors_in_a_row in (1, _FAILING_FRAMES):
                self.ctx.log.exception("camera %s: frame analysis failed", self.camera)
            if self._errors_in_a_row >= _FAILING_FRAMES:
                self._failure = f"frame analysis keeps failing: {exc}"
            return
        self._errors_in_a_row = 0
        self._failure = ""
        self._last_frame_time = frame.time
        for decision in decisions:
            self._emit_match(decision)
        done = time.perf_counter()
        self._frame_seconds = 0.9 * self._frame_seconds + 0.1 * (done - started)
        self._latency = done - frame.captured_at

    def _emit_match(self, decision: Decision) -> None:
        match, sample = decision.match, decision.sample
        judge = self._judge
        assert judge is not None
        payload: dict[str, Any] = {
            "person_id": match.person_id,
            "name": match.name,
            "list": match.list,
            "score": round(match.score, 4),
            "threshold": round(judge.threshold, 4),
            "camera": self.camera,
            "frames": decision.frames,
            "track": decision.track,
            "watchlist_version": judge.gallery.version,
            "model": self.config.embedder_file.name,
        }
        if self.config.include_crop and sample.aligned is not None:
            ok, jpeg = cv2.imencode(
                ".jpg", sample.aligned, [cv2.IMWRITE_JPEG_QUALITY, self.config.crop_quality]
            )
            if ok:
                payload["crop_jpeg"] = base64.b64encode(jpeg.tobytes()).decode("ascii")
        emission = self.ctx.emit("face.watchlist_match", payload, Priority.HIGH)
        self._counters["matches"] += 1
        watchlist = self._watchlist
        if watchlist is not None and self.config.match_memory_hours > 0:
            # After the event is on its way: the centre may later say this match was wrong.
            try:
                watchlist.remember_match(emission.event.id, match.person_id, decision.embedding)
            except Exception:
                self.ctx.log.exception(
                    "camera %s: cannot remember match %s", self.camera, emission.event.id
                )

    def _lost(self, reason: str) -> None:
        self._offline_reason = reason
        if self._online is not False:
            self._online = False
            self._counters["offline"] += 1
            self.ctx.log.warning("camera %s offline: %s", self.camera, reason)
            source = self._source.description if self._source else self.config.source
            self.ctx.emit(
                "device.offline", {"camera": self.camera, "source": source, "reason": reason}
            )

    def _found(self) -> None:
        if self._online is False:
            self.ctx.log.info("camera %s back online", self.camera)
            source = self._source.description if self._source else self.config.source
            self.ctx.emit("device.online", {"camera": self.camera, "source": source})
        self._online = True
        self._offline_reason = ""

    # -- watchlist upkeep ---------------------------------------------------------------------

    def _reload(self) -> None:
        if self._watchlist is not None and self._judge is not None:
            gallery = self._watchlist.gallery()
            self._judge.threshold = self.config.threshold_for(len(gallery))
            self._judge.gallery = gallery

    def _tidy(self) -> None:
        watchlist = self._watchlist
        if watchlist is None:
            return
        if watchlist.changed_elsewhere():
            self._reload()
        self._ticks += 1
        if self._ticks % 300 == 0:  # every 10 minutes: forgetting is not urgent
            watchlist.forget_matches(time.time() - self.config.match_memory_hours * 3600)

    def _mine(self, command: Command) -> bool:
        return command.target in (None, self.ctx.name)

    def _add_command(self, command: Command) -> Mapping[str, Any] | None:
        if not self._mine(command):
            return None
        watchlist, judge = self._watchlist, self._judge
        if watchlist is None or judge is None:
            raise CommandError(f"camera {self.camera} is not running")
        args = command.args
        embeddings = _string_list(args, "embeddings")
        images = _string_list(args, "images")
        if not embeddings and not images:
            raise CommandError("give images (base64 JPEG) and/or embeddings (base64 float32)")
        model = _optional_text(args, "model")
        model_sha256 = _optional_text(args, "model_sha256")
        if embeddings and model is None and model_sha256 is None:
            raise CommandError(
                f"embeddings must say which model made them (model_sha256); this device uses "
                f"{watchlist.model_name} (sha256 {watchlist.model_sha256})"
            )
        try:
            vectors: list[Vector] = [decode_embedding(e, watchlist.dimension) for e in embeddings]
        except WatchlistError as exc:
            raise CommandError(str(exc)) from None
        faces_found = []
        for index, text in enumerate(images):
            image = decode_image(text, f"images[{index}]")
            with self._pipeline_lock:
                embedding, count = judge.pipeline.enrolment_embedding(image)
            faces_found.append(count)
            if embedding is not None:
                vectors.append(embedding)
        if not vectors:
            raise CommandError(f"no face found in any of the {len(images)} images")
        try:
            version = watchlist.add(
                # Watchlist.add checks id and name and says what is wrong with them.
                args.get("id"),  # type: ignore[arg-type]
                args.get("name"),  # type: ignore[arg-type]
                vectors,
                list_name=args.get("list") or DEFAULT_LIST,
                source=f"centre:{command.id}",
                model=model,
                model_sha256=model_sha256,
            )
        except WatchlistError as exc:
            raise CommandError(str(exc)) from None
        self._reload()
        return {
            "version": version,
            "id": args.get("id"),
            "embeddings_added": len(vectors),
            "faces_found": faces_found,
            "model": watchlist.model_name,
        }

    def _remove_command(self, command: Command) -> Mapping[str, Any] | None:
        if not self._mine(command):
            return None
        watchlist = self._watchlist
        if watchlist is None:
            raise CommandError(f"camera {self.camera} is not running")
        try:
            removed, version = watchlist.remove(command.args.get("id"))  # type: ignore[arg-type]
        except WatchlistError as exc:
            raise CommandError(str(exc)) from None
        self._reload()
        return {"version": version, "id": command.args.get("id"), "removed": removed}

    def _reject_command(self, command: Command) -> Mapping[str, Any] | None:
        """``face.reject``: the match with ``event_id`` was not that person.

        Without an ``event_id``, ``person_id`` plus ``embedding`` (base64 float32
        of this device's model) state the same thing directly.
        """
        if not self._mine(command):
            return None
        watchlist = self._watchlist
        if watchlist is None:
            raise CommandError(f"camera {self.camera} is not running")
        args = command.args
        event_id = _optional_text(args, "event_id")
        person_id = _optional_text(args, "person_id")
        embedding: Vector
        if event_id is not None:
            recalled = watchlist.recall_match(event_id)
            if recalled is None:
                if command.target is None:
                    return None  # another camera's match
                raise CommandError(
                    f"event {event_id} is not a match this camera remembers "
                    f"(matches are kept {self.config.match_memory_hours:g} h)"
                )
            if person_id is not None and person_id != recalled[0]:
                raise CommandError(f"event {event_id} matched {recalled[0]!r}, not {person_id!r}")
            person_id, embedding = recalled
        else:
            text = _optional_text(args, "embedding")
            if person_id is None or text is None:
                raise CommandError("give event_id, or person_id and embedding")
            if args.get("model_sha256") != watchlist.model_sha256:
                raise CommandError(
                    f"embedding must come from this device's model: model_sha256 "
                    f"{watchlist.model_sha256}"
                )
            try:
                embedding = decode_embedding(text, watchlist.dimension)
            except WatchlistError as exc:
                raise CommandError(str(exc)) from None
        try:
            count = watchlist.add_rejection(person_id, embedding, f"centre:{command.id}")
        except WatchlistError as exc:
            raise CommandError(str(exc)) from None
        self._reload()
        return {"person_id": person_id, "event_id": event_id, "rejections": count}

    # -- reporting ----------------------------------------------------------------------------

    def health(self) -> Health:
        judge = self._judge
        counters: dict[str, int | float] = dict(self._counters)
        if judge is not None:
            seen = judge.counters
            counters.update(
                frames=seen.frames,
                faces=seen.faces,
                judged=seen.judged,
                suppressed_rejected=seen.suppressed_rejected,
                suppressed_cooldown=judge.tracker.cooled_down,
                quality_low=sum(seen.quality_low.values()),
                watchlist_version=judge.gallery.version,
                watchlist_entries=len(judge.gallery.people),
                watchlist_photos=len(judge.gallery),
                threshold=round(judge.threshold, 4),
                tracks_searched=seen.tracks_searched,
                tracks=judge.tracker.active_tracks,
            )
            for reason, count in seen.quality_low.items():
                counters[f"quality_low_{reason}"] = count
        if self._source is not None:
            counters["dropped_frames"] = self._source.dropped
        if self._frame_seconds:
            counters["frame_ms"] = round(self._frame_seconds * 1000, 1)
            counters["latency_ms"] = round(self._latency * 1000, 1)
        if self._failure:
            return Health("failed", self._failure, counters)
        if self._online is None:
            return Health("starting", f"opening {self.config.source}", counters)
        if not self._online:
            return Health("degraded", f"camera offline: {self._offline_reason}", counters)
        detail = f"watching {self._source.description if self._source else ''}"
        if judge is not None:  # what `wardpost status` shows: the list and its threshold
            detail += (
                f"; {len(judge.gallery.people)} persons ({len(judge.gallery)} photos), "
                f"threshold {judge.threshold:.3f}"
            )
        return Health("ok", detail, counters)
