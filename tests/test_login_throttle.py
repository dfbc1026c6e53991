"""Log-in throttling over a real uvicorn server, on SQLite and PostgreSQL: failed attempts
per user name and per client address answer 429 with Retry-After (API and form), the wait
grows, a right password clears the name's count, throttled attempts are audited without
the password, and password hashing runs at most two at a time."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from web_server import PASSWORD, add_users, serve

from dicomnode.web import throttle as throttle_module
from dicomnode.web.app import create_app
from dicomnode.web.throttle import LoginThrottle, login_throttle


@dataclass
class Site:
    url: str
    tokens: dict[str, str]
    clock: list[float]

    def login(self, username: str, password: str) -> httpx.Response:
        body = {"username": username, "password": password}
        return httpx.post(f"{self.url}/api/login", json=body, timeout=30)

    def later(self, seconds: float) -> None:
        self.clock[0] += seconds

    def audit(self) -> list[tuple[str, str, str]]:
        headers = {"Authorization": f"Bearer {self.tokens['boss']}"}
        entries = httpx.get(
            f"{self.url}/api/audit", params={"limit": 1000}, headers=headers, timeout=10
        )
        return [(e["actor"], e["action"], e["detail"]) for e in reversed(entries.json())]


@pytest.fixture
def site(sessions) -> Iterator[Site]:
    tokens = add_users(sessions)
    app = create_app(sessions)
    clock = [1000.0]
    login_throttle(app).clock = lambda: clock[0]
    with serve(app) as url:
        yield Site(url, tokens, clock)


def test_api_login_is_refused_after_five_failures_for_a_name(site: Site) -> None:
    for _ in range(5):
        assert site.login("dr_house", "wrong guess").status_code == 401
    refused = site.login("dr_house", PASSWORD)  # right, but too late
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "60"
    assert "too many failed log-ins" in refused.json()["detail"]
    # Another user from the same address is not held up by dr_house's failures.
    assert site.login("dr_grey", PASSWORD).status_code == 200

    site.later(61)
    assert site.login("dr_house", PASSWORD).status_code == 200
    # The right password cleared the name's count: one more mistake is just a mistake.
    assert site.login("dr_house", "wrong guess").status_code == 401
    assert site.login("dr_house", PASSWORD).status_code == 200

    failures = [entry for entry in site.audit() if entry[1] == "login_failed"]
    assert failures == [("dr_house", "login_failed", "api")] * 5 + [
        ("dr_house", "login_failed", "api, throttled"),
        ("dr_house", "login_failed", "api"),
    ]
    assert not any(PASSWORD in repr(entry) or "wrong guess" in repr(entry) for entry in failures)


def test_the_wait_grows_with_each_further_failure(site: Site) -> None:
    for _ in range(5):
        site.login("dr_house", "wrong guess")
    waits = []
    for _ in range(4):
        refused = site.login("dr_house", "wrong guess")
        assert refused.status_code == 429
        waits.append(int(refused.headers["retry-after"]))
        site.later(waits[-1] + 1)
        assert site.login("dr_house", "wrong guess").status_code == 401
    assert waits == [60, 120, 240, 480]
    # Quiet for the window and past the wait: the name starts afresh.
    site.later(16 * 60)
    assert site.login("dr_house", PASSWORD).status_code == 200


def test_unknown_names_are_throttled_like_real_ones(site: Site) -> None:
    for _ in range(5):
        assert site.login("ghost", "wrong guess").status_code == 401
    refused = site.login("ghost", "wrong guess")
    assert refused.status_code == 429 and refused.headers["retry-after"] == "60"


def test_one_address_trying_many_names_is_throttled(site: Site) -> None:
    for number in range(20):
        assert site.login(f"user{number}", "wrong guess").status_code == 401
    refused = site.login("dr_house", PASSWORD)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) == 60


def test_the_login_form_says_why_it_refuses(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=30) as browser:

        def submit(password: str) -> httpx.Response:
            form = browser.get("/login")
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
            data = {"username": "dr_house", "password": password, "csrf_token": csrf}
            return browser.post("/login", data=data)

        for _ in range(5):
            assert submit("wrong guess").status_code == 401
        refused = submit(PASSWORD)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "60"
        assert "Too many failed log-ins" in refused.text
        assert "try again in 60 seconds" in refused.text
        assert "dicomnode_session" not in browser.cookies
        # The API shares the count: it is the same user name from the same address.
        assert site.login("dr_house", PASSWORD).status_code == 429
    assert ("dr_house", "login_failed", "page, throttled") in site.audit()


def test_password_hashing_runs_at_most_two_at_a_time(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = {"now": 0, "most": 0, "entered": 0}
    lock = threading.Lock()
    real = throttle_module.authenticate
    # The first two hashes meet here, however late the machine lets the second one come: a
    # limit of one keeps the second out and breaks the barrier (the log-in fails).
    first_two = threading.Barrier(2, timeout=10)

    def counting(*args, **kwargs):
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
            running["entered"] += 1
            meets = running["entered"] <= 2
        try:
            if meets:
                first_two.wait()
            time.sleep(0.2)  # the others overlap too: a missing limit lets more than two in
            return real(*args, **kwargs)
        finally:
            with lock:
                running["now"] -= 1

    monkeypatch.setattr(throttle_module, "authenticate", counting)
    names = ["dr_house", "dr_grey", "boss"] * 2
    with ThreadPoolExecutor(len(names)) as pool:
        codes = list(pool.map(lambda name: site.login(name, PASSWORD).status_code, names))
    assert codes == [200] * len(names)
    assert running["most"] == 2


def test_a_login_that_waits_too_long_for_a_hash_slot_is_told_to_retry(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(throttle_module, "HASH_WAIT", 0.2)
    slots = throttle_module._hash_slots
    for _ in range(throttle_module.HASH_SLOTS):
        slots.acquire()
    try:
        busy = site.login("dr_house", PASSWORD)
    finally:
        for _ in range(throttle_module.HASH_SLOTS):
            slots.release()
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
    assert site.login("dr_house", PASSWORD).status_code == 200


def test_the_counts_stay_bounded() -> None:
    now = [0.0]
    throttle = LoginThrottle(clock=lambda: now[0], max_entries=100)
    for number in range(1000):
        throttle.failed(f"10.0.{number // 250}.{number % 250}", f"user{number}")
    assert len(throttle) <= 200
    # IPv6 clients count by their /64, IPv4-mapped ones as the IPv4 address.
    for number in range(20):
        throttle.failed(f"2001:db8::{number:x}", f"v6user{number}")
    assert throttle.retry_after("2001:db8::ffff", "someone") == 60
    assert throttle.retry_after("2001:db8:0:1::1", "someone") == 0
    # Entries whose window and lockout have passed go first.
    now[0] += 2 * 60 * 60
    throttle.failed("192.0.2.1", "late")
    assert throttle.retry_after("2001:db8::ffff", "someone") == 0
    assert len(throttle) == 2
