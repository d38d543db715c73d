"""Signature checks, the replay store, key files and start-up permission checks (no broker)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cli import main
from agent.commands import CommandRejected
from agent.config import parse_config
from agent.security import (
    ReplayStore,
    SignatureVerifier,
    Signer,
    check_permissions,
    generate_keypair,
    load_public_key,
    signed_bytes,
    verifier_for,
)

SITE, DEVICE = "north", "ward3-pi"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Signer, Path]:
    generate_keypair(tmp_path / "centre.key", tmp_path / "centre.pub")
    return Signer.from_file(str(tmp_path / "centre.key")), tmp_path / "centre.pub"


def make_verifier(
    tmp_path: Path, pub: Path, clock: Clock, max_age: float = 30.0
) -> SignatureVerifier:
    return SignatureVerifier(
        [load_public_key(str(pub))],
        max_age,
        ReplayStore(tmp_path / "state" / "commands.db", 2 * max_age),
        site=SITE,
        device=DEVICE,
        clock=clock,
    )


def command(signer: Signer, clock: Clock, command_id: str = "c-1", **args: Any) -> dict[str, Any]:
    message = {"id": command_id, "issued_at": clock.now, "args": args, "target": None}
    return signer.sign(SITE, DEVICE, "ack", message)


def verify(verifier: SignatureVerifier, message: dict[str, Any]) -> None:
    verifier.verify("ack", message, json.dumps(message).encode())


def test_signed_bytes_are_canonical_and_name_the_destination() -> None:
    a = signed_bytes(
        SITE,
        DEVICE,
        "ack",
        {
            "target": None,
            "args": {"b": 1, "a": 2},
            "id": "x",
            "issued_at": 1.5,
            "signature": "ignored",
        },
    )
    b = signed_bytes(
        SITE, DEVICE, "ack", {"id": "x", "issued_at": 1.5, "args": {"a": 2, "b": 1}, "target": None}
    )
    assert a == b
    assert json.loads(a) == {
        "name": "ack",
        "site": SITE,
        "device": DEVICE,
        "id": "x",
        "issued_at": 1.5,
        "args": {"a": 2, "b": 1},
        "target": None,
    }
    assert signed_bytes(SITE, "other", "ack", {"id": "x"}) != signed_bytes(
        SITE, DEVICE, "ack", {"id": "x"}
    )


def test_valid_command_passes_once_and_the_window_is_both_ways(
    tmp_path: Path, keys: tuple[Signer, Path]
) -> None:
    signer, pub = keys
    clock = Clock()
    verifier = make_verifier(tmp_path, pub, clock)
    verify(verifier, command(signer, clock, "c-1"))
    with pytest.raises(CommandRejected, match="replayed"):
        verify(verifier, command(signer, clock, "c-1"))
    late = command(signer, clock, "c-2")
    clock.now += 31
    with pytest.raises(CommandRejected, match="expired: issued 31s"):
        verify(verifier, late)
    early = command(signer, Clock(clock.now + 31), "c-3")
    with pytest.raises(CommandRejected, match="expired: issued -31s"):
        verify(verifier, early)


def test_an_unknown_key_id_still_finds_the_right_key(
    tmp_path: Path, keys: tuple[Signer, Path]
) -> None:
    signer, pub = keys
    clock = Clock()
    verify(make_verifier(tmp_path, pub, clock), {**command(signer, clock), "key_id": "rotated"})


def test_no_configured_key_rejects_everything(tmp_path: Path, keys: tuple[Signer, Path]) -> None:
    signer, _ = keys
    clock = Clock()
    verifier = SignatureVerifier(
        [], 30.0, ReplayStore(tmp_path / "r.db", 60.0), site=SITE, device=DEVICE, clock=clock
    )
    with pytest.raises(CommandRejected, match="no centre public key"):
        verify(verifier, command(signer, clock))


def test_a_bad_signature_does_not_burn_the_id(tmp_path: Path, keys: tuple[Signer, Path]) -> None:
    """Forged junk must not let an attacker pre-empt a real command's id."""
    signer, pub = keys
    clock = Clock()
    verifier = make_verifier(tmp_path, pub, clock)
    forged = Signer(Ed25519PrivateKey.generate())
    with pytest.raises(CommandRejected, match="bad signature"):
        verify(verifier, command(forged, clock, "c-9"))
    verify(verifier, command(signer, clock, "c-9"))


def test_replay_store_persists_and_forgets_after_its_window(tmp_path: Path) -> None:
    path = tmp_path / "commands.db"
    store = ReplayStore(path, keep_for=60.0)
    assert store.check_and_add("a", 1000.0)
    store.close()
    reopened = ReplayStore(path, keep_for=60.0)
    assert not reopened.check_and_add("a", 1030.0)
    assert reopened.check_and_add("a", 1061.0), "forgotten once older than keep_for"


def test_unusable_replay_store_falls_back_to_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = ReplayStore(blocker / "commands.db", 60.0)  # its parent is a file
    assert store.check_and_add("a", 1.0) and not store.check_and_add("a", 2.0)
    assert "remembered in memory only" in caplog.text


# ------------------------------------------------------------------ permissions


def config_with(tmp_path: Path, **files: Path) -> Any:
    doc: dict[str, Any] = {
        "agent": {
            "site": SITE,
            "device": DEVICE,
            "state_dir": str(files.get("state", tmp_path / "state")),
        }
    }
    if "public" in files:
        doc["commands"] = {"public_keys": [str(files["public"])]}
    if "tls_key" in files:
        doc["mqtt"] = {
            "tls": {
                "enabled": True,
                "cert_file": str(files["tls_cert"]),
                "key_file": str(files["tls_key"]),
            }
        }
    return parse_config(doc)


def test_too_open_files_are_named_with_their_mode(
    tmp_path: Path, keys: tuple[Signer, Path]
) -> None:
    _, pub = keys
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    cert, key = tmp_path / "device.crt", tmp_path / "device.key"
    cert.write_text("cert")
    key.write_text("-----BEGIN PRIVATE KEY----- secret")
    os.chmod(key, 0o640)
    config = config_with(tmp_path, state=state, public=pub, tls_cert=cert, tls_key=key)
    assert check_permissions(config) == [], "0750 state, 0640 key, 0644 public key are fine"

    os.chmod(state, 0o777)
    os.chmod(key, 0o644)
    os.chmod(pub, 0o666)
    problems = [str(p) for p in check_permissions(config)]
    assert problems == [
        f"{state} is open to other users (mode 0777); fix with: chmod 750 {state}",
        f"{key} is a secret that other users can read or change (mode 0644); "
        f"fix with: chmod 600 (or 640) {key}",
        f"{pub} is trusted by the agent but writable by other users (mode 0666); "
        f"fix with: chmod 644 {pub}",
    ]


def test_the_agent_warns_at_start_and_never_logs_the_secret(
    tmp_path: Path, keys: tuple[Signer, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, pub = keys
    cert, key = tmp_path / "device.crt", tmp_path / "device.key"
    cert.write_text("cert")
    key.write_text("TOP-SECRET-KEY-MATERIAL")
    os.chmod(key, 0o604)
    caplog.set_level(logging.WARNING, "wardpost.security")
    verifier_for(config_with(tmp_path, public=pub, tls_cert=cert, tls_key=key))
    assert f"{key} is a secret that other users can read or change (mode 0604)" in caplog.text
    assert "TOP-SECRET" not in caplog.text


# ------------------------------------------------------------------ wardpost keys


def test_keys_generate_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    private, public = tmp_path / "c.key", tmp_path / "c.pub"
    assert main(["keys", "generate", "--private", str(private), "--public", str(public)]) == 0
    assert private.stat().st_mode & 0o777 == 0o600
    key_id = capsys.readouterr().out.rsplit("key id ", 1)[1].strip()
    assert main(["keys", "show", str(public)]) == 0
    assert capsys.readouterr().out.strip() == f"{public}: Ed25519 public key, key id {key_id}"
    assert main(["keys", "show", str(private)]) == 0
    assert f"PRIVATE key, key id {key_id}" in capsys.readouterr().out
    assert main(["keys", "generate", "--private", str(private), "--public", str(public)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_a_signing_key_readable_by_others_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    generate_keypair(tmp_path / "c.key", tmp_path / "c.pub")
    os.chmod(tmp_path / "c.key", 0o644)
    Signer.from_file(str(tmp_path / "c.key"))
    assert f"{tmp_path / 'c.key'} is a secret that other users can read" in caplog.text
