"""The console in Debian's chromium against a real broker, receiver and simulated devices.

Each test waits for what the operator would see (generous deadlines, no sleeps
for timing) and saves screenshots of the pages it visits under its temp dir.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import cv2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from agent.security import generate_keypair, signed_bytes
from agent.testing.agent import wait_until
from tests.console.conftest import PASSWORD, PLAN, Centre, login
from tests.support.shared import FACES, require


def test_panic_press_ack_confirmation_resolve_and_audit(
    make_centre: Any, browser: Any, screenshots: Path
) -> None:
    centre: Centre = make_centre()
    device = centre.device("er-desk-1", heartbeat_interval=1.0)
    page = login(browser, centre, "olga")
    page.wait_for_selector("#no-alarms")
    page.evaluate("window.sameDocument = true")

    alarm_id = device.event("panic.pressed", "critical", {"location": "ER bay 3", "zone": 3})
    row = page.locator(f'tr.alarm[data-id="{alarm_id}"]')
    row.wait_for()  # live, over the event stream
    assert page.evaluate("window.sameDocument") is True, "the page reloaded"
    assert "ER bay 3" in row.inner_text()
    assert row.locator(".state").inner_text() == "new"
    page.screenshot(path=screenshots / "queue-new.png")

    page.keyboard.press("a")  # the first row is selected: one key acknowledges it
    page.locator(f'tr.alarm[data-id="{alarm_id}"] .state.acknowledged').wait_for()
    confirmation = page.locator(f'tr.alarm[data-id="{alarm_id}"] [data-command="ack"]')
    confirmation.filter(has_text="ack confirmed by device").wait_for()
    assert next(c for c in device.commands if c[0] == "ack")[1]["args"] == {
        "alarm": alarm_id,
        "by": "olga",
    }
    page.keyboard.press("s")  # silence the sirens of the selected alarm
    silenced = page.locator(f'tr.alarm[data-id="{alarm_id}"] [data-command="silence"]')
    silenced.filter(has_text="silence confirmed by device").wait_for()
    assert next(c for c in device.commands if c[0] == "silence")[1]["args"] == {
        "alarm": alarm_id,
        "by": "olga",
    }
    page.screenshot(path=screenshots / "queue-acknowledged.png")

    page.keyboard.press("Enter")
    page.wait_for_selector("#timeline")
    assert page.inner_text("#plan") == PLAN
    page.fill("#resolve-note", "False alarm: elbow on the button")
    page.click("#resolve")
    page.locator("#alarm-state", has_text="resolved").wait_for()
    timeline = page.inner_text("#timeline")
    for expected in ("raised", "acknowledged", "ack confirmed by device", "resolved", "elbow"):
        assert expected in timeline, expected
    page.screenshot(path=screenshots / "alarm-detail.png", full_page=True)

    supervisor = login(browser, centre, "sam")
    supervisor.goto(f"{centre.url}/audit")
    audit = supervisor.inner_text("#audit")
    assert "olga" in audit and "acknowledged" in audit and "resolved" in audit
    assert "False alarm: elbow on the button" in audit
    supervisor.screenshot(path=screenshots / "audit.png")
    csv_text = supervisor.request.get(f"{centre.url}/reports/audit.csv").text()
    assert "olga,resolved" in csv_text
    supervisor.goto(f"{centre.url}/reports")
    assert "panic.pressed" in supervisor.inner_text("#timings")
    supervisor.screenshot(path=screenshots / "reports.png", full_page=True)


def _face_crop() -> str:
    require(FACES)
    photos = sorted(FACES.glob("*/*.jpg"))
    assert photos, f"no face photos under {FACES}"
    image = cv2.imread(str(photos[0]))
    ok, jpeg = cv2.imencode(".jpg", cv2.resize(image[60:190, 60:190], (112, 112)))
    assert ok
    return base64.b64encode(jpeg.tobytes()).decode("ascii")


def test_face_match_card_with_crop_and_signed_reject(
    make_centre: Any, browser: Any, screenshots: Path, tmp_path: Path
) -> None:
    generate_keypair(tmp_path / "centre.key", tmp_path / "centre.pub")
    centre: Centre = make_centre(
        sections={"commands": {"signing_key": str(tmp_path / "centre.key")}}
    )
    camera = centre.device("er-cam-2", heartbeat_interval=1.0)
    page = login(browser, centre, "olga")
    alarm_id = camera.event(
        "face.watchlist_match",
        "high",
        {
            "person_id": "p-17",
            "name": "John Doe",
            "list": "banned",
            "reason": "assaulted staff 2026-03",
            "score": 0.71,
            "threshold": 0.55,
            "camera": "er-entrance",
            "frames": 5,
            "track": 3,
            "crop_jpeg": _face_crop(),
        },
    )
    page.locator(f'tr.alarm[data-id="{alarm_id}"]').click()
    page.keyboard.press("Enter")
    card = page.locator("#face-card")
    card.wait_for()
    assert "John Doe" in card.inner_text() and "0.71 (threshold 0.55)" in card.inner_text()
    assert page.evaluate("document.getElementById('face-crop').naturalWidth") == 112
    page.screenshot(path=screenshots / "face-match.png")

    page.click("#face-reject")
    page.locator("#alarm-state", has_text="resolved").wait_for()
    reject = wait_until(
        lambda: [body for name, body in camera.commands if name == "face.reject"], 30, "face.reject"
    )[0]
    assert reject["args"] == {"event_id": alarm_id, "by": "olga"}
    key = load_pem_private_key((tmp_path / "centre.key").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    key.public_key().verify(
        base64.b64decode(reject["signature"]),
        signed_bytes("er", "er-cam-2", "face.reject", reject),
    )
    page.locator("#timeline", has_text="face.reject confirmed by device").wait_for()


def test_device_lost_and_restored_live(make_centre: Any, browser: Any, screenshots: Path) -> None:
    centre: Centre = make_centre()
    centre.device("ward-4-panic", heartbeat_interval=1.0)
    silent = centre.device("ward-5-panic", heartbeat_interval=0.5)
    page = login(browser, centre, "olga", width=1366, height=768)  # a laptop
    page.goto(f"{centre.url}/devices")
    row = page.locator("#device-er-ward-5-panic")
    row.locator(".status.online").wait_for()

    silent.stop(clean=False)  # the cable is cut: heartbeats stop
    page.locator('#device-er-ward-5-panic[data-status="lost"]').wait_for()
    page.screenshot(path=screenshots / "devices-lost.png", full_page=True)
    page.goto(f"{centre.url}/")
    lost = page.locator('tr.alarm[data-kind="device.lost"]')
    lost.wait_for()
    assert "ward-5-panic" in lost.inner_text()

    page.goto(f"{centre.url}/devices")
    centre.device("ward-5-panic", heartbeat_interval=0.5, boot=2)  # power back, new boot
    page.locator('#device-er-ward-5-panic[data-status="online"]').wait_for()
    assert page.inner_text("#device-er-ward-5-panic").split("\t")[5].strip() == "2"
    page.screenshot(path=screenshots / "devices.png", full_page=True)


def test_refusals_wrong_password_expired_session_csrf_and_roles(
    make_centre: Any, browser: Any
) -> None:
    centre: Centre = make_centre(session_idle=2.0)
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{centre.url}/login")
    page.fill("#name", "olga")
    page.fill("#password", "wrong password")
    page.click("button[type=submit]")
    assert page.inner_text("#login-error") == "Wrong name or password."
    assert context.cookies() and all(c["name"] != "wardpost_session" for c in context.cookies())

    # A login form posted from elsewhere (no token of ours) is refused.
    forged = context.request.post(
        f"{centre.url}/login", form={"name": "olga", "password": PASSWORD}
    )
    assert forged.status == 403

    page.fill("#name", "olga")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("#operator")

    # A POST without the session's CSRF token, or with a wrong one, changes nothing.
    device = centre.device("er-desk-9", heartbeat_interval=1.0)
    alarm_id = device.event("panic.pressed", "critical", {"location": "triage"})
    page.locator(f'tr.alarm[data-id="{alarm_id}"]').wait_for()
    for headers in ({}, {"X-CSRF-Token": "guess"}):
        response = context.request.post(
            f"{centre.url}/alarms/{alarm_id}/acknowledge", headers=headers, form={"note": "x"}
        )
        assert response.status == 403
        assert "CSRF" in response.text()
    alarm = centre.receiver.store.alarm(alarm_id)
    assert alarm is not None and alarm.state == "new"

    # An operator is not an admin or a supervisor.
    for path in ("/admin/operators", "/reports", "/audit"):
        page.goto(f"{centre.url}{path}")
        assert "for the" in page.inner_text("#refused"), path
    refused = context.request.post(
        f"{centre.url}/admin/operators",
        headers={"X-CSRF-Token": page.get_attribute('meta[name="csrf"]', "content") or ""},
        form={"name": "mallory", "role": "admin", "password": "12345678x"},
    )
    assert refused.status == 403
    assert centre.server.console.tables.operator("mallory") is None

    # Idle for longer than session_idle: the next page asks for the password again.
    time.sleep(2.5)
    page.goto(f"{centre.url}/devices")
    page.wait_for_selector("#expired")
    assert "/login" in page.url
    entries = centre.server.console.tables.audit_log()
    assert {"login failed", "logged in", "refused"} <= {e.action for e in entries}
    assert json.dumps([e.operator for e in entries if e.action == "refused"]).count("olga") >= 3


def test_unacknowledged_alarm_escalates_visibly_and_audibly(
    make_centre: Any, browser: Any, screenshots: Path
) -> None:
    centre: Centre = make_centre(escalate_after=1.0)
    device = centre.device("er-desk-3", heartbeat_interval=1.0)
    page = login(browser, centre, "olga")
    alarm_id = device.event("duress.pressed", "critical", {"location": "pharmacy"})
    page.locator(f'tr.alarm.escalated[data-id="{alarm_id}"]').wait_for()
    page.wait_for_selector("#escalation-banner")
    page.wait_for_selector('body[data-tone="on"]')
    page.screenshot(path=screenshots / "queue-escalated.png")
    escalated = wait_until(
        lambda: centre.receiver.store.events(kind="alarm.escalated"), 30, "alarm.escalated event"
    )
    assert escalated[0].payload["alarm"] == alarm_id
    page.keyboard.press("m")  # mute: the row still blinks, the tone stops
    page.wait_for_selector('body[data-tone="off"]')
    page.keyboard.press("a")
    page.locator(f'tr.alarm[data-id="{alarm_id}"] .state.acknowledged').wait_for()
    assert page.locator("#escalation-banner").count() == 0


def test_supervisor_pings_a_device_and_admin_adds_an_operator(
    make_centre: Any, browser: Any, screenshots: Path
) -> None:
    centre: Centre = make_centre()
    device = centre.device("er-desk-5", heartbeat_interval=1.0)
    supervisor = login(browser, centre, "sam")
    supervisor.goto(f"{centre.url}/devices")
    supervisor.locator("#device-er-er-desk-5 button", has_text="ping").click()
    ping = wait_until(lambda: [b for n, b in device.commands if n == "ping"], 30, "ping")[0]
    assert ping["args"] == {"by": "sam"}
    assert "command ping" in {e.action for e in centre.server.console.tables.audit_log()}

    admin = login(browser, centre, "ada")
    admin.goto(f"{centre.url}/admin/operators")
    admin.fill('#add-operator input[name="name"]', "ben")
    admin.select_option('select[name="role"]', "operator")
    admin.fill('#add-operator input[name="password"]', "ben's long password")
    admin.click("#add-operator button")
    admin.locator("#operators", has_text="ben").wait_for()
    admin.screenshot(path=screenshots / "operators.png")
    ben = browser.new_context().new_page()
    ben.goto(f"{centre.url}/login")
    ben.fill("#name", "ben")
    ben.fill("#password", "ben's long password")
    ben.click("button[type=submit]")
    assert ben.inner_text("#operator") == "ben · operator"
