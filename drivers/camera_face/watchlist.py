"""The watchlist: enrolled persons and their face embeddings, in one SQLite file.

A watchlist belongs to one embedding model. Embeddings of different models
live in different spaces and comparing them gives meaningless scores, so the
file records the model's name and sha256 and refuses embeddings from any
other. Every change bumps ``version``, which the centre reads back to know
which list a device holds.

The file also keeps, apart from the list itself:

* *rejections*: "this face is not person X" pairs sent by the centre, used to
  suppress that false pairing from then on;
* *recent matches*: the embedding behind each recent match event, for at most
  ``match_memory_hours``, so the centre can reject a match by its event id.

No other face is ever stored.
"""

from __future__ import annotations

import base64
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlite_utils

from drivers.camera_face.pipeline import Vector, unit

FILE_NAME = "watchlist.db"
DEFAULT_LIST = "watchlist"
#: Enrolment photos kept per person: each is one template and the best-matching counts.
#: Three lift TAR at FAR 1e-3 from 97.4 to 99.1 % (lfw_dev) and 75.7 to 89.2 %
#: (celeba_dev) over one; beyond five, each photo mostly adds false-alarm chances.
MAX_PHOTOS = 5
_MAX_TEXT = 200


class WatchlistError(Exception):
    """A refused change (wrong model, bad id, malformed embedding) or an unusable file."""


def encode_embedding(vector: Vector) -> str:
    """Base64 of the little-endian float32 values: the form the centre exchanges."""
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")


def decode_embedding(text: str, dimension: int) -> Vector:
    """A unit vector from base64 float32, or :class:`WatchlistError` saying what is wrong."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise WatchlistError("embedding is not valid base64") from None
    if len(raw) != dimension * 4:
        raise WatchlistError(
            f"embedding has {len(raw)} bytes, expected {dimension * 4} ({dimension} float32 values)"
        )
    vector = np.frombuffer(raw, "<f4").astype(np.float32)
    try:
        return unit(vector)
    except ValueError as exc:
        raise WatchlistError(str(exc)) from None


def _text(value: Any, what: str, *, required: bool = True) -> str:
    if not isinstance(value, str) or (required and not value.strip()):
        raise WatchlistError(f"{what} must be a non-empty string")
    if len(value) > _MAX_TEXT or any(ord(c) < 32 for c in value):
        raise WatchlistError(f"{what} must be at most {_MAX_TEXT} printable characters")
    return value.strip()


@dataclass(frozen=True)
class Match:
    """The best watchlist candidate for one face."""

    person_id: str
    name: str
    list: str
    score: float
    #: The face looks more like someone the centre said is not this person.
    rejected: bool = False


class Gallery:
    """An in-memory snapshot of the watchlist, for fast 1:N search.

    All embeddings form one matrix, so a search is one matrix-vector product
    (10,000 entries x 128 dimensions ≈ 1.3 M multiply-adds, well under a
    millisecond) followed by an argmax.
    """

    def __init__(
        self,
        version: int,
        dimension: int,
        rows: Iterable[tuple[str, str, str, bytes]],
        rejections: Iterable[tuple[str, bytes]] = (),
    ):
        self.version = version
        self.dimension = dimension
        owners: list[str] = []
        vectors: list[npt.NDArray[np.float32]] = []
        self.people: dict[str, tuple[str, str]] = {}
        for person_id, name, list_name, blob in rows:
            owners.append(person_id)
            vectors.append(np.frombuffer(blob, "<f4"))
            self.people[person_id] = (name, list_name)
        self._owners = owners
        self._matrix = (
            np.vstack(vectors).astype(np.float32)
            if vectors
            else np.zeros((0, dimension), np.float32)
        )
        grouped: dict[str, list[npt.NDArray[np.float32]]] = {}
        for person_id, blob in rejections:
            grouped.setdefault(person_id, []).append(np.frombuffer(blob, "<f4"))
        self._rejections = {p: np.vstack(v).astype(np.float32) for p, v in grouped.items()}

    def __len__(self) -> int:
        return len(self._owners)

    def best(self, embedding: Vector, threshold: float) -> Match | None:
        """The most similar person, or None when the watchlist is empty."""
        if not self._owners:
            return None
        scores = self._matrix @ embedding
        row = int(np.argmax(scores))
        score = float(scores[row])
        person_id = self._owners[row]
        name, list_name = self.people[person_id]
        rejected = False
        rejections = self._rejections.get(person_id)
        if rejections is not None and score >= threshold:
            # Suppress only when the face is at least as much like a face the centre
            # said is *not* this person as it is like the person: a real match of a
            # look-alike person still gets through.
            closest_rejection = float(np.max(rejections @ embedding))
            rejected = closest_rejection >= threshold and closest_rejection >= score
        return Match(person_id, name, list_name, score, rejected)


class Watchlist:
    """The SQLite file of one camera driver instance (``<state_dir>/watchlist.db``).

    Safe to use from several threads, and from the ``wardpost watchlist`` CLI in
    another process while the agent runs (the driver notices the new version).
    """

    def __init__(
        self,
        path: Path,
        model_name: str | None = None,
        model_sha256: str | None = None,
        dimension: int | None = None,
    ):
        """Open (creating if needed) the file at ``path`` for the given embedding model.

        Without a model, the file's own model is used and not checked: for
        listing, exporting and removing, which must work even after the
        configured model changed.
        """
        self.path = path
        self._lock = threading.RLock()
        try:
            connection = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=10.0
            )
            self._db = sqlite_utils.Database(connection)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._create()
        except sqlite3.Error as exc:
            raise WatchlistError(f"watchlist file {path} cannot be used: {exc}") from None
        self.model_name = model_name or self._meta("model")
        self.model_sha256 = model_sha256 or self._meta("model_sha256")
        self.dimension = dimension or int(self._meta("dimension", "0"))
        if model_sha256 is not None:
            self._check_model()
        self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]

    def _create(self) -> None:
        with self._db.atomic():
            self._db.table("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
            self._db.table("persons").create(
                {"id": str, "name": str, "list": str, "added_at": float, "source": str},
                pk="id",
                if_not_exists=True,
            )
            self._db.table("embeddings").create(
                {
                    "id": int,
                    "person_id": str,
                    "vector": bytes,
                    "model": str,
                    "model_sha256": str,
                    "added_at": float,
                    "source": str,
                },
                pk="id",
                foreign_keys=[("person_id", "persons", "id")],
                if_not_exists=True,
            )
            self._db.table("rejections").create(
                {"id": int, "person_id": str, "vector": bytes, "added_at": float, "source": str},
                pk="id",
                if_not_exists=True,
            )
            self._db.table("recent_matches").create(
                {"event_id": str, "person_id": str, "vector": bytes, "time": float},
                pk="event_id",
                if_not_exists=True,
            )

    def _meta(self, key: str, default: str = "") -> str:
        rows = list(self._db.query("select value from meta where key = ?", [key]))
        return str(rows[0]["value"]) if rows else default

    def _set_meta(self, key: str, value: str) -> None:
        self._db.table("meta").upsert({"key": key, "value": value}, pk="key")

    def _check_model(self) -> None:
        with self._lock, self._db.atomic():
            stored_sha = self._meta("model_sha256")
            count = self._db.table("embeddings").count
            if stored_sha and stored_sha != self.model_sha256 and count:
                raise WatchlistError(
                    f"watchlist file {self.path} holds {count} embeddings of model "
                    f"{self._meta('model')!r} (sha256 {stored_sha}), not of the configured "
                    f"{self.model_name!r} (sha256 {self.model_sha256}); configure that model, "
                    "or export the list, remove the file and enrol again from photos"
                )
            if stored_sha != self.model_sha256:
                # An empty list simply adopts the model in use; rejections belong to the old one.
                self._db.execute("delete from rejections")
                self._db.execute("delete from recent_matches")
                self._set_meta("model", self.model_name)
                self._set_meta("model_sha256", self.model_sha256)
                self._set_meta("dimension", str(self.dimension))

    @property
    def version(self) -> int:
        with self._lock:
            return int(self._meta("version", "0"))

    def changed_elsewhere(self) -> bool:
        """True once after another connection (the CLI) committed a change."""
        with self._lock:
            marker = self._db.execute("PRAGMA data_version").fetchone()[0]
            changed = marker != self._data_version
            self._data_version = marker
            return bool(changed)

    def add(
        self,
        person_id: str,
        name: str,
        embeddings: list[Vector],
        *,
        list_name: str = DEFAULT_LIST,
        source: str = "",
        model: str | None = None,
        model_sha256: str | None = None,
    ) -> int:
        """Add a person (or more embeddings of a known one); returns the new version.

        ``model``/``model_sha256`` describe where the embeddings come from; when
        given they must be this list's model.
        """
        person_id = _text(person_id, "id")
        name = _text(name, "name")
        list_name = _text(list_name or DEFAULT_LIST, "list")
        self._check_origin(model, model_sha256)
        if not embeddings:
            raise WatchlistError(f"no embedding to add for {person_id!r}")
        vectors = []
        for vector in embeddings:
            if vector.shape != (self.dimension,):
                raise WatchlistError(
                    f"embedding has {vector.size} values, this model gives {self.dimension}"
                )
            vectors.append(unit(vector.astype(np.float32)))
        now = time.time()
        with self._lock, self._db.atomic():
            held = self._db.table("embeddings").count_where("person_id = ?", [person_id])
            if held + len(vectors) > MAX_PHOTOS:
                raise WatchlistError(
                    f"{person_id!r} would have {held + len(vectors)} photos; at most "
                    f"{MAX_PHOTOS} per person (remove the person and enrol the best ones again)"
                )
            self._db.table("persons").upsert(
                {
                    "id": person_id,
                    "name": name,
                    "list": list_name,
                    "added_at": now,
                    "source": source,
                },
                pk="id",
            )
            self._db.table("embeddings").insert_all(
                {
                    "person_id": person_id,
                    "vector": v.astype("<f4").tobytes(),
                    "model": self.model_name,
                    "model_sha256": self.model_sha256,
                    "added_at": now,
                    "source": source,
                }
                for v in vectors
            )
            return self._bump()

    def _check_origin(self, model: str | None, model_sha256: str | None) -> None:
        if model_sha256 is not None and model_sha256 != self.model_sha256:
            raise WatchlistError(
                f"embeddings are from a model with sha256 {model_sha256}; this watchlist holds "
                f"{self.model_name!r} (sha256 {self.model_sha256}): send photos instead"
            )
        if model is not None and model != self.model_name:
            raise WatchlistError(
                f"embeddings are from model {model!r}; this watchlist holds {self.model_name!r} "
                f"(sha256 {self.model_sha256}): send photos instead"
            )

    def remove(self, person_id: str) -> tuple[bool, int]:
        """Remove a person, their embeddings and rejections: (whether it existed, version)."""
        person_id = _text(person_id, "id")
        with self._lock, self._db.atomic():
            cursor = self._db.execute("delete from persons where id = ?", [person_id])
            if cursor.rowcount == 0:
                return False, int(self._meta("version", "0"))
            for table in ("embeddings", "rejections", "recent_matches"):
                self._db.execute(f"delete from {table} where person_id = ?", [person_id])  # noqa: S608
            return True, self._bump()

    def _bump(self) -> int:
        version = int(self._meta("version", "0")) + 1
        self._set_meta("version", str(version))
        return version

    def persons(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(
                self._db.query(
                    "select p.id, p.name, p.list, p.added_at, p.source, count(e.id) as embeddings "
                    "from persons p left join embeddings e on e.person_id = p.id "
                    "group by p.id order by p.id"
                )
            )

    def gallery(self) -> Gallery:
        with self._lock, self._db.atomic():
            rows = [
                (r["person_id"], r["name"], r["list"], r["vector"])
                for r in self._db.query(
                    "select e.person_id, p.name, p.list, e.vector from embeddings e "
                    "join persons p on p.id = e.person_id order by e.id"
                )
            ]
            rejections = [
                (r["person_id"], r["vector"])
                for r in self._db.query("select person_id, vector from rejections")
            ]
            return Gallery(int(self._meta("version", "0")), self.dimension, rows, rejections)

    def export(self) -> dict[str, Any]:
        """The whole list with base64 embeddings (the form ``watchlist.add`` accepts)."""
        with self._lock, self._db.atomic():
            persons = []
            for person in self.persons():
                vectors = self._db.query(
                    "select vector from embeddings where person_id = ? order by id", [person["id"]]
                )
                persons.append(
                    {
                        "id": person["id"],
                        "name": person["name"],
                        "list": person["list"],
                        "added_at": person["added_at"],
                        "source": person["source"],
                        "embeddings": [
                            base64.b64encode(v["vector"]).decode("ascii") for v in vectors
                        ],
                    }
                )
            return {
                "version": self.version,
                "model": self.model_name,
                "model_sha256": self.model_sha256,
                "dimension": self.dimension,
                "persons": persons,
            }

    def remember_match(self, event_id: str, person_id: str, embedding: Vector) -> None:
        with self._lock:
            self._db.table("recent_matches").insert(
                {
                    "event_id": event_id,
                    "person_id": person_id,
                    "vector": embedding.astype("<f4").tobytes(),
                    "time": time.time(),
                },
                pk="event_id",
                replace=True,
            )

    def recall_match(self, event_id: str) -> tuple[str, Vector] | None:
        with self._lock:
            rows = list(
                self._db.query(
                    "select person_id, vector from recent_matches where event_id = ?", [event_id]
                )
            )
        if not rows:
            return None
        return str(rows[0]["person_id"]), np.frombuffer(rows[0]["vector"], "<f4").copy()

    def forget_matches(self, older_than: float) -> None:
        with self._lock:
            self._db.execute("delete from recent_matches where time < ?", [older_than])

    def add_rejection(self, person_id: str, embedding: Vector, source: str) -> int:
        """Store "this face is not ``person_id``"; returns that person's rejection count."""
        with self._lock, self._db.atomic():
            if not self._db.table("persons").count_where("id = ?", [person_id]):
                raise WatchlistError(f"person {person_id!r} is not on this watchlist")
            self._db.table("rejections").insert(
                {
                    "person_id": person_id,
                    "vector": unit(embedding).astype("<f4").tobytes(),
                    "added_at": time.time(),
                    "source": source,
                }
            )
            return int(self._db.table("rejections").count_where("person_id = ?", [person_id]))

    def summary(self) -> Mapping[str, Any]:
        with self._lock:
            return {
                "version": self.version,
                "persons": self._db.table("persons").count,
                "embeddings": self._db.table("embeddings").count,
                "model": self.model_name,
                "model_sha256": self.model_sha256,
            }

    def close(self) -> None:
        with self._lock:
            self._db.close()
