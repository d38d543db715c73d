"""Signed commands (Ed25519, expiry, replay protection) and start-up permission checks.

The centre signs each command with its private key (``wardpost keys generate``
makes the pair; ``wardpost command --key`` and ``wardpost monitor --key`` sign
with it). The signature covers the canonical JSON of the command name, the
destination ``site`` and ``device``, and the message's ``id``, ``issued_at``,
``args`` and ``target``, so no field can be altered and a command signed for one
device cannot be re-aimed at another. The device accepts a command only if

* it is signed by one of ``[commands] public_keys`` for this very site/device,
* ``issued_at`` is within ``max_age`` seconds of the device clock (either way), and
* its id has not been accepted before (ids are kept for twice ``max_age`` in
  ``<state_dir>/commands.db``, so a replay after a restart is still refused).

:func:`verifier_for` runs once at start. It also checks the permissions of the
state directory and of the key, password and trust files the config names, and
logs a warning naming any file that other users could read or change.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.commands import AcceptAll, CommandRejected, RejectAll, Verifier
from agent.config import Config, ConfigError

log = logging.getLogger("wardpost.security")

#: Fields of the command message covered by the signature (besides name and destination).
SIGNED_FIELDS = ("id", "issued_at", "args", "target")


def signed_bytes(site: str, device: str, name: str, message: Mapping[str, Any]) -> bytes:
    """The exact bytes signed for command ``name`` sent to ``site``/``device``."""
    body: dict[str, Any] = {"name": name, "site": site, "device": device}
    body.update({k: message.get(k) for k in SIGNED_FIELDS})
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short fingerprint (16 hex digits of SHA-256 of the raw key) to name a key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        message = f"cannot read Ed25519 public key {path!r}: {exc}"
        raise ConfigError(message, "commands.public_keys") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path!r} is not an Ed25519 public key", "commands.public_keys")
    return key


def load_private_key(path: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read Ed25519 private key {path!r}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path!r} is not an Ed25519 private key")
    return key


class Signer:
    """Signs commands with the centre's private key."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.key_id = key_id(private_key.public_key())

    @classmethod
    def from_file(cls, path: str) -> Signer:
        """Load a key written by ``wardpost keys generate`` (warns if others can read it)."""
        for problem in check_paths([path], SECRET):
            log.warning("%s", problem)
        return cls(load_private_key(path))

    def sign(self, site: str, device: str, name: str, message: Mapping[str, Any]) -> dict[str, Any]:
        """Return ``message`` with ``key_id`` and ``signature`` added."""
        signature = self._key.sign(signed_bytes(site, device, name, message))
        return {**message, "key_id": self.key_id, "signature": base64.b64encode(signature).decode()}


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new key pair (private key mode 0600, never overwritten). Returns the key id."""
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_id(private_key.public_key())


class ReplayStore:
    """Command ids seen recently, persisted so a restart does not reopen the window."""

    def __init__(self, path: Path, keep_for: float):
        self.keep_for = keep_for
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._create_table()
        except (OSError, sqlite3.Error) as exc:
            # Commands must keep working: remember ids in memory, loudly.
            log.error(
                "replay store %s unusable (%s); command ids are remembered in memory only",
                path,
                exc,
            )
            self._conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            self._create_table()

    def _create_table(self) -> None:
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL NOT NULL)"
        )

    def check_and_add(self, command_id: str, now: float) -> bool:
        """True if the id is new (and now remembered), False for a replay."""
        with self._lock:
            self._conn.execute("DELETE FROM seen WHERE at < ?", (now - self.keep_for,))
            try:
                self._conn.execute("INSERT INTO seen VALUES (?, ?)", (command_id, now))
            except sqlite3.IntegrityError:
                return False
            return True

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SignatureVerifier:
    """The :class:`~agent.commands.Verifier` used whenever signatures are required.

    Checks, in this order, the signature (so unsigned junk never touches the replay
    store), the age, and finally the id, which is then remembered.
    """

    def __init__(
        self,
        public_keys: Iterable[Ed25519PublicKey],
        max_age: float,
        replay: ReplayStore,
        *,
        site: str,
        device: str,
        clock: Callable[[], float] = time.time,
    ):
        self.keys = {key_id(k): k for k in public_keys}
        self.max_age = max_age
        self.replay = replay
        self.site = site
        self.device = device
        self.clock = clock

    def verify(self, name: str, message: Mapping[str, Any], raw: bytes) -> None:
        if not self.keys:
            raise CommandRejected("no centre public key is configured ([commands] public_keys)")
        signature = message.get("signature")
        if not isinstance(signature, str):
            raise CommandRejected("unsigned command")
        try:
            sig = base64.b64decode(signature, validate=True)
        except ValueError:
            raise CommandRejected("signature is not base64") from None
        named = message.get("key_id")
        keys = [self.keys[named]] if named in self.keys else list(self.keys.values())
        data = signed_bytes(self.site, self.device, name, message)
        if not any(_valid(key, sig, data) for key in keys):
            raise CommandRejected(
                f"bad signature (not made by a configured centre key for {self.site}/{self.device})"
            )
        now = self.clock()
        age = now - float(message["issued_at"])
        if abs(age) > self.max_age:
            raise CommandRejected(
                f"expired: issued {age:.0f}s from the device clock (limit {self.max_age:.0f}s)"
            )
        if not self.replay.check_and_add(str(message["id"]), now):
            raise CommandRejected(f"replayed command id {message['id']!r}")


def _valid(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def verifier_for(config: Config) -> Verifier:
    """Called once when the agent starts: check file permissions, build the verifier."""
    for problem in check_permissions(config):
        log.warning("%s", problem)
    commands = config.commands
    if not commands.enabled:
        log.warning("[commands] enabled = false: every command from the centre is refused")
        return RejectAll()
    if not commands.require_signature:
        log.warning("[commands] require_signature = false: commands are NOT authenticated")
        return AcceptAll()
    keys = [load_public_key(path) for path in commands.public_keys]
    replay = ReplayStore(Path(config.agent.state_dir) / "commands.db", 2 * commands.max_age)
    return SignatureVerifier(
        keys, commands.max_age, replay, site=config.agent.site, device=config.agent.device
    )


# ------------------------------------------------------------------ file permissions


@dataclass(frozen=True)
class Exposure:
    """Which permission bits are too open for one kind of file, and why that matters."""

    forbidden: int
    risk: str
    fix: str


#: Private keys and passwords: other users must not read them, the group must not change them.
SECRET = Exposure(0o027, "a secret that other users can read or change", "chmod 600 (or 640)")
#: Trust anchors (centre public keys, CA certificate): nobody else may replace them.
TRUST = Exposure(0o022, "trusted by the agent but writable by other users", "chmod 644")
#: The state directory (outbox, replay store): private to the agent and its group.
STATE = Exposure(0o027, "open to other users", "chmod 750")


@dataclass(frozen=True)
class PermissionProblem:
    path: str
    mode: int
    exposure: Exposure

    def __str__(self) -> str:
        return (
            f"{self.path} is {self.exposure.risk} (mode {self.mode:04o}); "
            f"fix with: {self.exposure.fix} {self.path}"
        )


def check_paths(paths: Iterable[str], exposure: Exposure) -> list[PermissionProblem]:
    """The paths whose mode has any of ``exposure.forbidden``; missing paths are skipped
    (the config check reports those)."""
    problems = []
    for path in paths:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            continue
        if mode & exposure.forbidden:
            problems.append(PermissionProblem(path, mode, exposure))
    return problems


def check_permissions(config: Config) -> list[PermissionProblem]:
    """Files and directories of ``config`` that other users could read or change."""
    mqtt = config.mqtt
    secrets = [mqtt.password_file] + ([mqtt.tls.key_file] if mqtt.tls.enabled else [])
    trust = list(config.commands.public_keys) + ([mqtt.tls.ca_file] if mqtt.tls.enabled else [])
    return [
        *check_paths([config.agent.state_dir], STATE),
        *check_paths([p for p in secrets if p], SECRET),
        *check_paths([p for p in trust if p], TRUST),
    ]
