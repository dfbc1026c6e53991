"""REST API and log-in over a real uvicorn server, on SQLite and PostgreSQL: authentication,
roles, CSRF, worklist filters and paging, study actions, result download, audit, schema."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from conftest import add_user as add_cli_user
from conftest import write_config
from web_server import PASSWORD, add_users, serve
from worklist_seed import add_results_job, add_study

from dicomnode.config import WorklistSettings
from dicomnode.db.session import utcnow
from dicomnode.users import issue_token
from dicomnode.web.app import create_app


@dataclass
class Site:
    url: str
    sessions: object
    tokens: dict[str, str]

    def client(self, user: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def seed(self, accession: str, **kwargs) -> str:
        with self.sessions() as session:
            return add_study(session, accession, now=utcnow(), **kwargs)


@pytest.fixture
def site(sessions) -> Iterator[Site]:
    tokens = add_users(sessions)
    with serve(create_app(sessions)) as url:
        yield Site(url, sessions, tokens)


def test_an_override_through_the_api_is_due_by_the_sites_max_wait(sessions) -> None:
    """The app gets the site's [worklist] settings as they are at each request (a reload
    may change them), not the built-in defaults."""
    tokens = add_users(sessions)
    current = {"settings": WorklistSettings()}
    with serve(create_app(sessions, lambda: current["settings"])) as url:
        with sessions() as session:
            uid = add_study(session, "ACC", now=utcnow(), probability=0.1)
        headers = {"Authorization": f"Bearer {tokens['dr_house']}"}
        with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
            waits = {}
            for urgent_minutes in (240, 480):  # the default, then a site's after a reload
                current["settings"] = WorklistSettings(
                    max_wait_minutes={"urgent": urgent_minutes, "routine": 2880}
                )
                row = client.post(
                    f"/api/studies/{uid}/override", json={"tier": "urgent", "reason": "ED called"}
                ).json()
                received, due = (datetime.fromisoformat(row[k]) for k in ("received_at", "due_at"))
                waits[urgent_minutes] = due - received
    assert waits == {m: timedelta(minutes=m) for m in (240, 480)}


def _browser_login(site: Site, user: str = "dr_house") -> tuple[httpx.Client, str]:
    """Log in through the form like a browser; returns the client and the page's CSRF token."""
    client = httpx.Client(base_url=site.url, timeout=10, follow_redirects=True)
    form = client.get("/login")
    login_csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    response = client.post(
        "/login", data={"username": user, "password": PASSWORD, "csrf_token": login_csrf}
    )
    assert response.status_code == 200 and response.url.path == "/worklist"
    page_csrf = re.search(r'name="csrf-token" content="([^"]+)"', response.text).group(1)
    return client, page_csrf


PROTECTED = [
    ("GET", "/api/worklist"),
    ("GET", "/api/me"),
    ("GET", "/api/studies/1.2.3"),
    ("POST", "/api/studies/1.2.3/claim"),
    ("POST", "/api/studies/1.2.3/release"),
    ("POST", "/api/studies/1.2.3/complete"),
    ("POST", "/api/studies/1.2.3/reopen"),
    ("POST", "/api/studies/1.2.3/override"),
    ("GET", "/api/results/1.2.3.4"),
    ("GET", "/api/audit"),
]


def test_api_refuses_requests_without_a_valid_token(site: Site) -> None:
    with site.client() as anonymous:
        for method, path in PROTECTED:
            response = anonymous.request(method, path)
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"] == "Bearer"
        forged = anonymous.get("/api/worklist", headers={"Authorization": "Bearer dn_forged"})
        assert forged.status_code == 401
        # The page sends people to the log-in form instead.
        page = anonymous.get("/worklist", follow_redirects=False)
        assert page.status_code == 303
        assert page.headers["location"] == "/login?next=/worklist"
        assert anonymous.get("/healthz").json() == {"status": "ok"}


def test_login_gives_a_bearer_token_and_failures_are_audited(site: Site) -> None:
    with site.client() as anonymous:
        wrong = anonymous.post("/api/login", json={"username": "dr_house", "password": "nope"})
        assert wrong.status_code == 401
        nobody = anonymous.post("/api/login", json={"username": "ghost", "password": PASSWORD})
        assert nobody.status_code == 401
        assert nobody.json()["detail"] == wrong.json()["detail"]
        login = anonymous.post("/api/login", json={"username": "dr_house", "password": PASSWORD})
        assert login.status_code == 200
        token = login.json()["token"]
        me = anonymous.get("/api/me", headers={"Authorization": f"Bearer {token}"})
        assert me.json() == {"username": "dr_house", "role": "radiologist"}
        anonymous.post("/api/logout", headers={"Authorization": f"Bearer {token}"})
        revoked = anonymous.get("/api/me", headers={"Authorization": f"Bearer {token}"})
        assert revoked.status_code == 401
    with site.client("boss") as admin:
        actions = [(e["actor"], e["action"]) for e in admin.get("/api/audit").json()]
    assert ("dr_house", "login_failed") in actions
    assert ("ghost", "login_failed") in actions
    assert ("dr_house", "login") in actions
    assert ("dr_house", "logout") in actions


def test_expired_cli_token_is_refused(site: Site) -> None:
    with site.sessions() as session:
        expired = issue_token(
            session, "dr_house", utcnow() - timedelta(days=2), lifetime=timedelta(days=1)
        )
        session.commit()
    response = httpx.get(
        f"{site.url}/api/me", headers={"Authorization": f"Bearer {expired}"}, timeout=10
    )
    assert response.status_code == 401


def test_only_admins_read_the_audit_log(site: Site) -> None:
    uid = site.seed("ACC", probability=0.9)
    with site.client("dr_house") as radiologist:
        assert radiologist.post(f"/api/studies/{uid}/claim").status_code == 200
        assert radiologist.get("/api/audit").status_code == 403
    with site.client("boss") as admin:
        entries = admin.get("/api/audit", params={"study_instance_uid": uid}).json()
    assert [(e["actor"], e["action"]) for e in entries] == [("dr_house", "claim")]
    assert entries[0]["at"]


def test_cookie_session_needs_the_csrf_token_for_changes(site: Site) -> None:
    uid = site.seed("ACC", probability=0.9)
    browser, csrf = _browser_login(site)
    with closing(browser):
        assert browser.get("/api/worklist").status_code == 200
        refused = browser.post(f"/api/studies/{uid}/claim")
        assert refused.status_code == 403
        assert "CSRF" in refused.json()["detail"]
        forged = browser.post(f"/api/studies/{uid}/claim", headers={"X-CSRF-Token": "x" * 64})
        assert forged.status_code == 403
        claimed = browser.post(f"/api/studies/{uid}/claim", headers={"X-CSRF-Token": csrf})
        assert claimed.status_code == 200
        assert claimed.json()["claimed_by"] == "dr_house"
        browser.post("/logout", data={"csrf_token": csrf})
        assert browser.get("/api/me").status_code == 401
    # A bearer token is not sent by browsers on their own, so it needs no CSRF token.
    with site.client("dr_grey") as api:
        assert api.post(f"/api/studies/{uid}/release").status_code == 409


def test_login_form_needs_its_csrf_cookie(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=10) as browser:
        response = browser.post(
            "/login", data={"username": "dr_house", "password": PASSWORD, "csrf_token": "x"}
        )
        assert response.status_code == 403
        assert "dicomnode_session" not in browser.cookies
        form = browser.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        wrong = browser.post(
            "/login", data={"username": "dr_house", "password": "wrong", "csrf_token": csrf}
        )
        assert wrong.status_code == 401
        assert "Wrong user name or password" in wrong.text
        # Only same-site paths are followed after log-in.
        form = browser.get("/login", params={"next": "//evil.example/"})
        assert 'name="next" value="/worklist"' in form.text


def test_worklist_filters_paging_and_study_actions(site: Site) -> None:
    site.seed("ROUTINE", minutes_ago=30, probability=0.1)
    critical = site.seed("CRITICAL", minutes_ago=2, probability=0.92)
    ct = site.seed("CT", minutes_ago=20, probability=0.1, modality="CT")
    with site.client("dr_house") as house, site.client("dr_grey") as grey:
        listing = house.get("/api/worklist").json()
        assert [r["accession_number"] for r in listing["rows"]] == ["CRITICAL", "ROUTINE", "CT"]
        assert listing["total"] == 3
        assert "not for clinical use" in listing["notice"].lower()
        top = listing["rows"][0]
        assert top["priority"] == "critical"
        assert "Pneumothorax 92%" in top["reason"]
        assert top["url"] == f"/api/studies/{critical}"

        def accessions(**params) -> list[str]:
            response = house.get("/api/worklist", params=params)
            assert response.status_code == 200, response.text
            return [r["accession_number"] for r in response.json()["rows"]]

        assert accessions(modality="CT") == ["CT"]
        assert accessions(tier="critical") == ["CRITICAL"]
        assert accessions(tier=["critical", "routine"], limit=1, offset=1) == ["ROUTINE"]
        assert house.get("/api/worklist", params={"tier": "asap"}).status_code == 422

        claimed = house.post(f"/api/studies/{critical}/claim").json()
        assert (claimed["status"], claimed["claimed_by"]) == ("in_progress", "dr_house")
        assert accessions(status="in_progress") == ["CRITICAL"]
        conflict = grey.post(f"/api/studies/{critical}/claim")
        assert conflict.status_code == 409
        assert "being read by dr_house" in conflict.json()["detail"]
        assert grey.post(f"/api/studies/{critical}/complete").status_code == 409
        done = house.post(f"/api/studies/{critical}/complete").json()
        assert (done["status"], done["reported_by"]) == ("reported", "dr_house")
        assert accessions() == ["ROUTINE", "CT"]
        assert accessions(status="reported") == ["CRITICAL"]

        bad = grey.post(f"/api/studies/{ct}/override", json={"tier": "stat", "reason": ""})
        assert bad.status_code == 422
        moved = grey.post(
            f"/api/studies/{ct}/override",
            json={"tier": "stat", "reason": "ED called: suspected pneumothorax"},
        )
        assert moved.status_code == 200
        assert moved.json()["override_by"] == "dr_grey"
        assert accessions() == ["CT", "ROUTINE"]

        detail = house.get(f"/api/studies/{ct}").json()
        assert detail["priority"] == "stat"
        assert [(h["actor"], h["action"], h["reason"]) for h in detail["history"]] == [
            ("dr_grey", "override", "ED called: suspected pneumothorax")
        ]
        assert house.get("/api/studies/1.2.3.999").status_code == 404
        assert house.post("/api/studies/1.2.3.999/claim").status_code == 404
    with site.client("boss") as admin:
        views = admin.get("/api/audit", params={"action": "view_study"}).json()
        assert [(v["actor"], v["study_instance_uid"]) for v in views] == [("dr_house", ct)]
        # The worklist polls are recorded once per user and interval, not per request.
        polls = admin.get("/api/audit", params={"action": "view_worklist"}).json()
        assert [p["actor"] for p in polls] == ["dr_house"]


def test_admin_releases_anyones_claim(site: Site) -> None:
    uid = site.seed("ACC", probability=0.9)
    with site.client("dr_house") as house, site.client("boss") as admin:
        house.post(f"/api/studies/{uid}/claim")
        released = admin.post(f"/api/studies/{uid}/release")
        assert released.status_code == 200
        assert released.json()["status"] == "ready"


def test_complete_needs_the_callers_claim_as_on_the_page(site: Site) -> None:
    """The API completes only a study the caller has claimed, as the page offers Complete
    only then: an unclaimed study is refused with 409, also for an admin, and stays on the
    worklist unreported; someone else's claim is refused as before."""
    uid = site.seed("ACC", probability=0.92)
    with (
        site.client("dr_house") as house,
        site.client("dr_grey") as grey,
        site.client("boss") as admin,
    ):
        for client in (house, admin):
            refused = client.post(f"/api/studies/{uid}/complete")
            assert refused.status_code == 409, refused.text
            assert refused.json()["detail"] == (
                f"study {uid} is not claimed by anyone; claim it before completing it"
            )
        row = house.get(f"/api/studies/{uid}").json()
        assert (row["status"], row["claimed_by"], row["reported_by"]) == ("ready", "", "")
        assert [r["study_instance_uid"] for r in house.get("/api/worklist").json()["rows"]] == [uid]

        house.post(f"/api/studies/{uid}/claim")
        taken = grey.post(f"/api/studies/{uid}/complete")
        assert taken.status_code == 409
        assert "being read by dr_house" in taken.json()["detail"]
        done = house.post(f"/api/studies/{uid}/complete")
        assert done.status_code == 200, done.text
        assert (done.json()["status"], done.json()["reported_by"]) == ("reported", "dr_house")
        entries = admin.get("/api/audit", params={"study_instance_uid": uid}).json()
    assert [(e["actor"], e["action"]) for e in entries if not e["action"].startswith("view_")] == [
        ("dr_house", "complete"),
        ("dr_house", "claim"),
    ]


def test_reopen_puts_a_reported_study_back_for_its_reporter_or_an_admin(site: Site) -> None:
    """Reopen: only a reported study (409), only by its reporter or an admin (403); it comes
    back in progress claimed by the caller, the report cleared, priority and due time as before
    it was completed; audited; a cookie session needs the CSRF token as for every change."""
    uid = site.seed("ACC", probability=0.92)
    with site.client("dr_house") as house, site.client("dr_grey") as grey:
        not_reported = house.post(f"/api/studies/{uid}/reopen")
        assert not_reported.status_code == 409
        assert not_reported.json()["detail"] == (
            f"study {uid} is not reported; there is nothing to reopen"
        )
        before = house.post(f"/api/studies/{uid}/claim").json()
        assert house.post(f"/api/studies/{uid}/complete").json()["status"] == "reported"

        forbidden = grey.post(f"/api/studies/{uid}/reopen")
        assert forbidden.status_code == 403
        assert forbidden.json()["detail"] == (
            f"study {uid} was reported by dr_house, not by you; only they or an admin can reopen it"
        )
        assert grey.get(f"/api/studies/{uid}").json()["status"] == "reported"

        reopened = house.post(f"/api/studies/{uid}/reopen")
        assert reopened.status_code == 200, reopened.text
        row = reopened.json()
        assert (row["status"], row["claimed_by"]) == ("in_progress", "dr_house")
        assert (row["reported_by"], row["reported_at"]) == ("", None)
        fields = ("priority", "ups_priority", "due_at", "reason")
        assert {k: row[k] for k in fields} == {k: before[k] for k in fields}
        listing = house.get("/api/worklist").json()["rows"]
        assert [(r["study_instance_uid"], r["status"]) for r in listing] == [(uid, "in_progress")]
        assert house.post(f"/api/studies/{uid}/reopen").status_code == 409
        assert house.post(f"/api/studies/{uid}/complete").json()["reported_by"] == "dr_house"

    # An admin may reopen anyone's report; it is then the admin's claim (they may release it).
    with site.client("boss") as admin:
        by_admin = admin.post(f"/api/studies/{uid}/reopen").json()
        assert (by_admin["status"], by_admin["claimed_by"]) == ("in_progress", "boss")
        assert admin.post(f"/api/studies/{uid}/release").json()["status"] == "ready"
        entries = admin.get("/api/audit", params={"action": "reopen"}).json()
    assert [(e["actor"], e["study_instance_uid"]) for e in entries] == [
        ("boss", uid),
        ("dr_house", uid),
    ]
    assert all(e["detail"].startswith("reopened report of dr_house from ") for e in entries)

    # From the page's cookie session, only with the page's CSRF token.
    with site.client("dr_house") as house:
        house.post(f"/api/studies/{uid}/claim")
        house.post(f"/api/studies/{uid}/complete")
    browser, csrf = _browser_login(site)
    with closing(browser):
        refused = browser.post(f"/api/studies/{uid}/reopen")
        assert refused.status_code == 403
        assert "CSRF" in refused.json()["detail"]
        with site.client("dr_house") as house:
            assert house.get(f"/api/studies/{uid}").json()["status"] == "reported"
        done = browser.post(f"/api/studies/{uid}/reopen", headers={"X-CSRF-Token": csrf})
        assert done.status_code == 200, done.text
        assert done.json()["claimed_by"] == "dr_house"


def test_result_objects_download_as_dicom_and_are_audited(site: Site, tmp_path: Path) -> None:
    result = tmp_path / "sr.dcm"
    result.write_bytes(b"\0" * 128 + b"DICM" + b"payload")
    uid = site.seed("ACC", probability=0.9, result_file=result)
    with site.client("dr_house") as house:
        row = house.get("/api/worklist").json()["rows"][0]
        link = row["results"][0]["url"]
        response = house.get(link)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/dicom"
        assert response.content == result.read_bytes()
        assert house.get("/api/results/1.2.3.4.5").status_code == 404
    with site.client("boss") as admin:
        entries = admin.get("/api/audit", params={"action": "view_result"}).json()
    assert [(e["actor"], e["study_instance_uid"]) for e in entries] == [("dr_house", uid)]


def test_openapi_schema_lists_the_endpoints_and_bearer_auth(site: Site) -> None:
    schema = httpx.get(f"{site.url}/openapi.json", timeout=10).json()
    paths = schema["paths"]
    assert "get" in paths["/api/worklist"]
    assert {"modality", "tier", "status", "limit", "offset"} <= {
        p["name"] for p in paths["/api/worklist"]["get"]["parameters"]
    }
    assert "get" in paths["/api/studies/{study_instance_uid}"]
    for action in ("claim", "release", "complete", "reopen", "override"):
        assert "post" in paths[f"/api/studies/{{study_instance_uid}}/{action}"]
    assert "get" in paths["/api/audit"]
    assert "get" in paths["/api/results/{sop_instance_uid}"]
    assert "post" in paths["/api/login"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert "/worklist" not in paths
    # Every /api operation documents the refusals it may give, with their body.
    error = {"$ref": "#/components/schemas/ErrorOut"}
    for path, operations in paths.items():
        for method, operation in operations.items():
            answers = operation["responses"]
            for code in ("401", "403"):
                assert answers[code]["content"]["application/json"]["schema"] == error, (
                    path,
                    method,
                    code,
                )
    assert (
        "ErrorOut"
        in paths["/api/studies/{study_instance_uid}/claim"]["post"]["responses"]["409"]["content"][
            "application/json"
        ]["schema"]["$ref"]
    )
    # Complete says when it refuses: a study not claimed by the caller.
    refusal = paths["/api/studies/{study_instance_uid}/complete"]["post"]["responses"]["409"]
    assert refusal["content"]["application/json"]["schema"] == error
    assert "not claimed by you" in refusal["description"]


def test_pages_send_security_headers(site: Site) -> None:
    browser, _ = _browser_login(site)
    with closing(browser):
        page = browser.get("/worklist")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert "Research demo, not for clinical use".upper() in page.text
    cookie = next(c for c in browser.cookies.jar if c.name == "dicomnode_session")
    assert cookie.has_nonstandard_attr("HttpOnly")


def test_pages_have_an_icon_and_favicon_ico_is_served(site: Site) -> None:
    """Every page links its icon, and /favicon.ico (what a browser asks for on a page without
    the link) is an image, without log-in: no 404 in the browser's console."""
    browser, _ = _browser_login(site)
    with closing(browser):
        pages = [browser.get(path).text for path in ("/login", "/worklist")]
    link = '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">'
    assert all(link in page for page in pages)
    with site.client() as anonymous:
        for path in ("/static/favicon.svg", "/favicon.ico"):
            icon = anonymous.get(path)
            assert icon.status_code == 200, path
            assert icon.headers["content-type"] == "image/svg+xml", path
            assert icon.text.startswith("<svg "), path


def test_secrets_never_reach_the_logs(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with site.client() as anonymous:
        token = anonymous.post(
            "/api/login", json={"username": "dr_house", "password": PASSWORD}
        ).json()["token"]
        anonymous.get("/api/worklist", headers={"Authorization": f"Bearer {token}"})
        anonymous.post("/api/login", json={"username": "dr_house", "password": "typo-secret"})
    browser, csrf = _browser_login(site)
    browser.close()
    logged = caplog.text
    assert "dr_house" in logged  # the log-in itself is logged, by name
    for secret in (PASSWORD, "typo-secret", token, csrf, *site.tokens.values()):
        assert secret not in logged
    with site.client("boss") as admin:
        audit_text = admin.get("/api/audit", params={"limit": 1000}).text
    assert PASSWORD not in audit_text and "typo-secret" not in audit_text


def test_cli_adds_users_and_prints_tokens(db_url: str, sessions, tmp_path: Path) -> None:
    config, _, _ = write_config(tmp_path, db_url)
    token = add_cli_user(config, "dr_cli", "admin")
    with serve(create_app(sessions)) as url:
        me = httpx.get(f"{url}/api/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert me.json() == {"username": "dr_cli", "role": "admin"}
    command = [sys.executable, "-m", "dicomnode", "users"]
    add = [*command, "add", "dr_weak", "--role", "radiologist", "--password-stdin"]
    weak = subprocess.run(
        [*add, "--config", str(config)],
        input="short\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert weak.returncode == 1
    assert "at least 8 characters" in weak.stderr
    listing = subprocess.run(
        [*command, "list", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert listing.stdout.split() == ["dr_cli", "admin"]


def _dead_export(site: Site, uid: str, destination: str, reason: str) -> int:
    """A dead-lettered export job of the study, as a worker leaves it; returns its id."""
    from sqlalchemy import select
    from worklist_seed import add_result_object

    from dicomnode.db.models import Job, Study

    with site.sessions() as session:
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == uid))
        result_id = add_result_object(session, study_id)
        now = utcnow()
        job = Job(
            kind="export",
            study_id=study_id,
            payload={"destination": destination, "result_id": result_id},
            state="dead",
            attempts=5,
            run_after=now,
            last_error=reason,
            created_at=now,
            finished_at=now,
        )
        session.add(job)
        session.commit()
        return job.id


def test_jobs_give_their_times_in_utc(site: Site) -> None:
    """Every time the API returns carries its zone, the job list's too (SQLite hands back
    naive datetimes)."""
    uid = site.seed("ACC", probability=0.9)
    job_id = _dead_export(site, uid, "pacs", "ExportError: refused")
    with site.client("boss") as admin:
        jobs = admin.get("/api/jobs").json()
        assert [job["id"] for job in jobs] == [job_id]
        for moment in (jobs[0]["run_after"], jobs[0]["finished_at"]):
            assert datetime.fromisoformat(moment).utcoffset() == timedelta(0), moment
        retried = admin.post(f"/api/jobs/{job_id}/retry").json()
        assert datetime.fromisoformat(retried["run_after"]).utcoffset() == timedelta(0)


def test_numbers_beyond_the_database_are_refused_not_a_server_error(site: Site) -> None:
    """An offset or job id too large for the database answers 422 or 404, never 500."""
    huge = 10**20
    with site.client("boss") as admin:
        for path in ("/api/worklist", "/api/audit"):
            refused = admin.get(path, params={"offset": huge})
            assert refused.status_code == 422, (path, refused.text)
            assert admin.get(path, params={"offset": 2**31 - 1}).status_code == 200
        for job_id in (huge, 2**31, 0, -1):
            missing = admin.post(f"/api/jobs/{job_id}/retry")
            assert missing.status_code == 404, (job_id, missing.text)
            assert missing.json()["detail"] == f"no job {job_id}"
        assert admin.post(f"/api/jobs/{'9' * 5000}/retry").status_code == 422


def test_every_response_with_a_study_row_gives_its_failed_export(site: Site) -> None:
    """The worklist, the study's detail, the page's first render and the actions' answers
    all say which export was dead-lettered (the first one, by job)."""
    uid = site.seed("ACC", probability=0.9)
    _dead_export(site, uid, "pacs-down", "ExportError: association rejected")
    _dead_export(site, uid, "archive", "ExportError: refused")
    expected = "pacs-down: ExportError: association rejected"
    browser, _ = _browser_login(site)
    with closing(browser):
        page = browser.get("/worklist").text
    initial = re.search(r'id="initial-worklist">(.*?)</script>', page, re.S).group(1)
    assert [row["export_error"] for row in json.loads(initial)["rows"]] == [expected]
    with site.client("dr_house") as house:
        assert house.get("/api/worklist").json()["rows"][0]["export_error"] == expected
        detail = house.get(f"/api/studies/{uid}").json()
        assert detail["export_error"] == expected
        assert detail["export_errors"] == [expected, "archive: ExportError: refused"]
        override = {"json": {"tier": "stat", "reason": "ED called"}}
        for action, request in [
            ("claim", {}),
            ("release", {}),
            ("override", override),
            ("claim", {}),
            ("complete", {}),
        ]:
            answer = house.post(f"/api/studies/{uid}/{action}", **request)
            assert answer.status_code == 200, (action, answer.text)
            assert answer.json()["export_error"] == expected, action


def _results_job(site: Site, uid: str, state: str, **kwargs) -> None:
    with site.sessions() as session:
        add_results_job(session, uid, state, now=utcnow(), **kwargs)


GSPS_REFUSED = {
    "model": "cxr-nodule-demo",
    "version": "1.0.0",
    "kind": "gsps",
    "error": "ValueError: unsupported window",
}
SEG_RUN_FAILED = {
    "model": "cxr-lung-seg-demo",
    "version": "1.0.0",
    "kind": "run",
    "error": "RuntimeError: input too small",
}


def test_every_response_with_a_study_row_says_which_ai_results_are_missing(site: Site) -> None:
    """A reader sees from the worklist that the latest results job left objects out (done,
    naming them) or wrote none (dead); an earlier job superseded by a newer analysis does not
    count. The study, the page's first render and the actions' answers say the same."""
    partly = site.seed("ACC-PARTLY", probability=0.9, minutes_ago=50)
    _results_job(site, partly, "dead", last_error="OSError: disk full")  # retried by a newer one
    _results_job(site, partly, "done", not_written=[GSPS_REFUSED, SEG_RUN_FAILED])
    dead = site.seed("ACC-DEAD", probability=0.9, minutes_ago=40)
    _results_job(site, dead, "dead", last_error="RuntimeError: decoder crashed")
    redone = site.seed("ACC-REDONE", probability=0.9, minutes_ago=30)
    _results_job(site, redone, "done", not_written=[GSPS_REFUSED])
    _results_job(site, redone, "done")  # a newer analysis's job wrote them all
    writing = site.seed("ACC-WRITING", probability=0.9, minutes_ago=20)
    _results_job(site, writing, "queued")
    none = site.seed("ACC-NONE", probability=0.9, minutes_ago=10)
    partly_error = (
        "cxr-nodule-demo gsps: ValueError: unsupported window; "
        "cxr-lung-seg-demo run: RuntimeError: input too small"
    )
    expected = {
        partly: ("done", True, partly_error, [GSPS_REFUSED, SEG_RUN_FAILED]),
        dead: ("dead", True, "RuntimeError: decoder crashed", []),
        redone: ("done", False, "", []),
        writing: ("queued", False, "", []),
        none: ("", False, "", []),
    }

    def results(row: dict) -> tuple:
        fields = ("results_state", "results_incomplete", "results_error", "results_missing")
        return tuple(row[name] for name in fields)

    with site.client("dr_house") as house:
        rows = house.get("/api/worklist").json()["rows"]
        assert {row["study_instance_uid"]: results(row) for row in rows} == expected
        for uid in (partly, dead):
            assert results(house.get(f"/api/studies/{uid}").json()) == expected[uid]
        claimed = house.post(f"/api/studies/{partly}/claim")
        assert claimed.status_code == 200, claimed.text
        assert results(claimed.json()) == expected[partly]
    browser, _ = _browser_login(site)
    with closing(browser):
        page = browser.get("/worklist").text
    initial = re.search(r'id="initial-worklist">(.*?)</script>', page, re.S).group(1)
    shown = {row["study_instance_uid"]: results(row) for row in json.loads(initial)["rows"]}
    assert shown == expected
    schema = httpx.get(f"{site.url}/openapi.json", timeout=10).json()
    row_schema = schema["components"]["schemas"]["WorklistRowOut"]["properties"]
    for name in ("results_state", "results_incomplete", "results_error", "results_missing"):
        assert row_schema[name]["description"], name


def test_a_worklist_page_reads_its_jobs_in_two_queries_whatever_its_size(sessions) -> None:
    """The failed exports and the results jobs of a page's rows are read in one query each,
    not one per row: a page of 1 and one of 6 studies take the same statements."""
    from sqlalchemy import event

    from dicomnode.web.job_failures import rows_out
    from dicomnode.worklist import service

    site = Site("", sessions, {})
    for number in range(6):
        uid = site.seed(f"ACC-{number}", probability=0.9, minutes_ago=10 + number)
        _results_job(site, uid, "done", not_written=[GSPS_REFUSED])
        _dead_export(site, uid, "pacs", "ExportError: refused")
    counts = {}
    with sessions() as session:
        statements: list[str] = []

        def count(conn, cursor, statement, *args) -> None:
            statements.append(statement)

        engine = session.get_bind()
        event.listen(engine, "before_cursor_execute", count)
        try:
            for size in (1, 6):
                rows = service.reading_order(session, size, 0, site=WorklistSettings())
                statements.clear()
                shown = rows_out(session, rows)
                counts[size] = len(statements)
                assert all(row.results_incomplete and row.export_error for row in shown)
        finally:
            event.remove(engine, "before_cursor_execute", count)
    assert counts == {1: 2, 6: 2}


def test_logout_without_the_csrf_token_still_ends_the_session(site: Site) -> None:
    """A log-out form that lost its token must not leave the session alive behind the log-in
    page: the presented session is revoked and its cookie deleted either way."""
    browser, _ = _browser_login(site)
    with closing(browser):
        session_token = browser.cookies["dicomnode_session"]
        out = browser.post("/logout", data={}, follow_redirects=False)
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert "dicomnode_session" not in browser.cookies
    cookies = {"dicomnode_session": session_token}
    with httpx.Client(base_url=site.url, cookies=cookies, timeout=10) as replay:
        assert replay.get("/api/me").status_code == 401
    with site.client("boss") as admin:
        actions = [(e["actor"], e["action"]) for e in admin.get("/api/audit").json()]
    assert ("dr_house", "logout") in actions


def test_logging_in_again_ends_the_browsers_previous_session(site: Site) -> None:
    browser, _ = _browser_login(site)
    with closing(browser):
        first = browser.cookies["dicomnode_session"]
        form = browser.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        again = browser.post(
            "/login", data={"username": "dr_grey", "password": PASSWORD, "csrf_token": csrf}
        )
        assert again.status_code == 200 and again.url.path == "/worklist"
        second = browser.cookies["dicomnode_session"]
        assert second != first
        assert browser.get("/api/me").json()["username"] == "dr_grey"

    def me(token: str) -> int:
        cookies = {"dicomnode_session": token}
        with httpx.Client(base_url=site.url, cookies=cookies, timeout=10) as other:
            return other.get("/api/me").status_code

    assert (me(first), me(second)) == (401, 200)
