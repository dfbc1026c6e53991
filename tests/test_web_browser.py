"""The worklist page in headless Chromium (Debian's, driven by Playwright): log-in, the
critical study on top (checked on a screenshot's pixels), live update, filters, claim and
complete (which asks for a confirmation), the marker of AI result objects that were not
written, the study page's actions, and pages that load without a console error."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from web_server import CHROMIUM, add_users, chromium_page, log_in, serve
from worklist_seed import add_results_job, add_study

from dicomnode.config import WorklistSettings
from dicomnode.db.models import Study
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade, utcnow
from dicomnode.ingest.arrival import InstanceFacts
from dicomnode.ingest.index import index_instance
from dicomnode.pipeline.analyse import mark_failed
from dicomnode.web import pages
from dicomnode.web.app import create_app
from dicomnode.worklist.service import claim, complete

ROWS = "#rows tr[data-study-uid]"
CRITICAL_RED = (0xD3, 0x2F, 0x2F)  # --tier-critical in worklist.css
CONFIRM_AFTER_MS = 600  # a second click sooner is a double click, not the confirmation (actions.js)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} not found (apt-get install chromium)"
)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[str, object]]:
    """The web app on the embedded default (SQLite) with two analysed studies."""
    url = f"sqlite:///{tmp_path / 'dicomnode.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    add_users(sessions)
    with sessions() as session:
        add_study(session, "ACC-ROUTINE", minutes_ago=40, probability=0.12, now=utcnow())
        sr = tmp_path / "sr.dcm"
        sr.write_bytes(b"\0" * 128 + b"DICM")
        add_study(session, "ACC-PTX", minutes_ago=3, probability=0.93, now=utcnow(), result_file=sr)
    with serve(create_app(sessions)) as base:
        yield base, sessions
    engine.dispose()


@pytest.fixture
def page(site):
    with chromium_page() as page:
        yield page


def _expect(locator):
    from playwright.sync_api import expect

    return expect(locator)


def _accessions(page) -> list[str]:
    return page.locator(f"{ROWS} td.accession").all_inner_texts()


def test_critical_study_on_top_live_update_filters_claim_complete(
    site, page, tmp_path: Path
) -> None:
    base, sessions = site
    log_in(page, base)
    assert _accessions(page) == ["ACC-PTX", "ACC-ROUTINE"]
    top = page.locator("#rows tr").first
    assert top.get_attribute("data-tier") == "critical"
    assert "Pneumothorax 93%" in top.locator("td.reason").inner_text()
    assert "RESEARCH DEMO, NOT FOR CLINICAL USE" in page.inner_text("#demo-banner")
    result_link = top.locator("td.results a", has_text="SR")
    assert result_link.get_attribute("href").startswith("/api/results/")

    # The screenshot shows the critical tier's colour on the first row.
    png = page.screenshot(path=str(tmp_path / "worklist.png"), full_page=True)
    box = top.locator("td.strip").bounding_box()
    pixel = (
        Image.open(io.BytesIO(png))
        .convert("RGB")
        .getpixel((int(box["x"] + box["width"] / 2), int(box["y"] + box["height"] / 2)))
    )
    assert all(abs(a - b) <= 6 for a, b in zip(pixel, CRITICAL_RED, strict=True)), pixel

    # A study that arrives now shows up without a reload (the page polls the API).
    with sessions() as session:
        add_study(session, "ACC-NEW-PTX", minutes_ago=0, probability=0.81, now=utcnow())
    page.wait_for_selector("#rows tr td.accession:text-is('ACC-NEW-PTX')")
    assert _accessions(page) == ["ACC-PTX", "ACC-NEW-PTX", "ACC-ROUTINE"]

    # Filter by tier; the filter is kept in the address bar.
    page.select_option("#filter-tier", "routine")
    _expect(page.locator(ROWS)).to_have_count(1)
    assert _accessions(page) == ["ACC-ROUTINE"]
    assert "tier=routine" in page.url
    page.select_option("#filter-tier", "")
    _expect(page.locator(ROWS)).to_have_count(3)

    # Claim, then complete (confirmed): the study leaves the worklist.
    top = page.locator("#rows tr").first
    top.locator("button[data-action=claim]").click()
    page.wait_for_selector("#rows tr:first-child td.status:has-text('In progress')")
    assert "dr_house" in page.locator("#rows tr").first.locator("td.status").inner_text()
    complete = page.locator("#rows tr").first.locator("button[data-action=complete]")
    complete.click()
    _expect(complete).to_have_text("Confirm complete")
    page.wait_for_timeout(CONFIRM_AFTER_MS)
    complete.click()
    _expect(page.locator(ROWS)).to_have_count(2)
    assert _accessions(page) == ["ACC-NEW-PTX", "ACC-ROUTINE"]
    assert page.inner_text("#message") == ""


def test_override_dialog_moves_a_study_to_the_top(site, page) -> None:
    base, _ = site
    log_in(page, base)
    routine = page.locator("#rows tr", has_text="ACC-ROUTINE")
    routine.locator("button[data-action=override]").click()
    page.select_option("#override-tier", "stat")
    page.fill("#override-reason", "ED called: trauma")
    page.click("#override-form button[type=submit]")
    _expect(page.locator(ROWS).first).to_have_attribute("data-tier", "stat")
    assert _accessions(page) == ["ACC-ROUTINE", "ACC-PTX"]
    assert page.locator("#rows tr").first.locator(".override-tag").count() == 1


def test_rows_say_which_ai_result_objects_were_not_written(site, page) -> None:
    """A study whose results job left objects out names them on its row (the reasons in the
    tooltip); one whose results job is dead says none were written; a complete one says
    nothing. The live refresh keeps the markers and shows a new one."""
    base, sessions = site
    with sessions() as session:
        uids = dict(session.query(Study.accession_number, Study.study_instance_uid).all())
        add_results_job(
            session,
            uids["ACC-PTX"],
            "done",
            not_written=[
                {
                    "model": "cxr-nodule-demo",
                    "version": "1.0.0",
                    "kind": "gsps",
                    "error": "ValueError: unsupported window",
                },
                {
                    "model": "cxr-lung-seg-demo",
                    "version": "1.0.0",
                    "kind": "run",
                    "error": "RuntimeError: input too small",
                },
                {  # left out by the worker: its file cannot be loaded
                    "model": "cxr-pneumothorax-demo",
                    "version": "1.1.0",
                    "kind": "run",
                    "error": "not run: the model cannot be loaded (truncated)",
                },
            ],
            now=utcnow(),
        )
        add_results_job(session, uids["ACC-ROUTINE"], "done", now=utcnow())
    log_in(page, base)
    ptx = page.locator("#rows tr", has_text="ACC-PTX")
    marker = ptx.locator("td.status .results-failed")
    _expect(marker).to_be_visible()
    assert marker.inner_text() == (
        "AI results incomplete: cxr-nodule-demo GSPS, cxr-lung-seg-demo (run failed), "
        "cxr-pneumothorax-demo (not run)"
    )
    assert marker.get_attribute("title") == (
        "Not written (the others were written and sent): cxr-nodule-demo gsps: ValueError: "
        "unsupported window; cxr-lung-seg-demo run: RuntimeError: input too small; "
        "cxr-pneumothorax-demo run: not run: the model cannot be loaded (truncated)"
    )
    # It wraps in the status column like a failed export's reason, instead of widening it.
    assert marker.bounding_box()["width"] <= ptx.locator("td.status").bounding_box()["width"]
    routine = page.locator("#rows tr", has_text="ACC-ROUTINE")
    _expect(routine.locator(".results-failed")).to_have_count(0)

    # A results job that dies later is marked on the next refresh, without a reload.
    with sessions() as session:
        add_results_job(
            session,
            uids["ACC-ROUTINE"],
            "dead",
            last_error="RuntimeError: decoder crashed",
            now=utcnow(),
        )
    dead = routine.locator("td.status .results-failed")
    _expect(dead).to_have_text("AI results not written", timeout=10_000)
    assert dead.get_attribute("title").endswith(": RuntimeError: decoder crashed")
    _expect(marker).to_be_visible()


def test_a_row_says_when_the_ai_could_not_read_the_images(site, page) -> None:
    """A study failed because none of its images can be read says so in its status column,
    not "AI analysis failed", which another failure keeps (both in the policy's words)."""
    base, sessions = site
    with sessions() as session:
        uids = dict(session.query(Study.accession_number, Study.study_instance_uid).all())
        ids = dict(session.query(Study.accession_number, Study.id).all())
        mark_failed(session, ids["ACC-ROUTINE"], "x.dcm: cannot be read", unreadable=True)
        mark_failed(session, ids["ACC-PTX"], "RuntimeError: out of memory")
    log_in(page, base)
    unreadable = page.locator(f"#rows tr[data-study-uid='{uids['ACC-ROUTINE']}'] td.status")
    _expect(unreadable.locator(".by")).to_have_text(
        "AI could not read the image(s) (corrupt or unsupported pixel data)"
    )
    failed = page.locator(f"#rows tr[data-study-uid='{uids['ACC-PTX']}'] td.status")
    _expect(failed.locator(".by")).to_have_text("AI analysis failed")


def test_pages_load_without_console_errors(site, page) -> None:
    """The log-in form, the worklist and a study page load with no console error and no
    failed request: the icon the browser asks for (favicon) is served, not a 404."""
    base, sessions = site
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    log_in(page, base)
    with sessions() as session:
        uid = session.query(Study.study_instance_uid).filter_by(accession_number="ACC-PTX").scalar()
    page.goto(f"{base}/worklist/study/{uid}")
    page.wait_for_load_state("networkidle")
    assert errors == []


def _uid(sessions, accession: str) -> str:
    with sessions() as session:
        return (
            session.query(Study.study_instance_uid).filter_by(accession_number=accession).scalar()
        )


def _api_study(page, base: str, uid: str) -> dict:
    """The study as GET /api/studies/{uid} gives it to the page's session."""
    response = page.request.get(f"{base}/api/studies/{uid}")
    assert response.ok, response.status
    return response.json()


def test_complete_on_the_worklist_needs_a_confirmation(site, page, monkeypatch) -> None:
    """One click on Complete (or a double click) asks "Confirm complete" and sends nothing; the
    question survives the page's poll, goes away after a few seconds, and a second click
    while it is asked completes the study."""
    # A poll a second, so that the check after one comes well inside the question's 5 s
    # (after 3 s polls, 3.5 s left a loaded machine's browser 1.5 s).
    monkeypatch.setattr(pages, "POLL_SECONDS", 1)
    base, sessions = site
    uid = _uid(sessions, "ACC-PTX")
    log_in(page, base)
    row = page.locator(f"#rows tr[data-study-uid='{uid}']")
    row.locator("button[data-action=claim]").click()
    complete = row.locator("button[data-action=complete]")
    _expect(complete).to_have_text("Complete")

    complete.click()
    _expect(complete).to_have_text("Confirm complete")
    page.wait_for_timeout(1500)  # past a poll, which renders the rows again
    _expect(complete).to_have_text("Confirm complete")
    assert _api_study(page, base, uid)["status"] == "in_progress"
    # Not confirmed: asked no more (5 s after the click; room for a loaded browser's timer).
    _expect(complete).to_have_text("Complete", timeout=10_000)
    assert _api_study(page, base, uid)["status"] == "in_progress"

    complete.dblclick()
    _expect(complete).to_have_text("Confirm complete")
    page.wait_for_timeout(CONFIRM_AFTER_MS)
    assert _api_study(page, base, uid)["status"] == "in_progress"
    complete.click()
    _expect(row).to_have_count(0)
    study = _api_study(page, base, uid)
    assert (study["status"], study["reported_by"]) == ("reported", "dr_house")
    assert page.inner_text("#message") == ""


def test_study_page_claims_then_completes_with_a_confirmation(site, page) -> None:
    """The study page offers its worklist row's actions: Claim, then Complete and Release once
    claimed, Priority… throughout; Complete asks once more; each call shows the study as it is
    after it."""
    base, sessions = site
    uid = _uid(sessions, "ACC-PTX")
    log_in(page, base)
    page.goto(f"{base}/worklist/study/{uid}")
    actions = page.locator("#study-actions button")
    _expect(actions).to_have_text(["Claim", "Priority…"])

    page.click("#study-actions button[data-action=claim]")
    _expect(actions).to_have_text(["Complete", "Release", "Priority…"])
    assert "in progress · dr_house" in page.inner_text(".facts")
    study = _api_study(page, base, uid)
    assert (study["status"], study["claimed_by"]) == ("in_progress", "dr_house")

    complete = page.locator("#study-actions button[data-action=complete]")
    complete.click()
    _expect(complete).to_have_text("Confirm complete")
    page.wait_for_timeout(CONFIRM_AFTER_MS)
    assert _api_study(page, base, uid)["status"] == "in_progress"
    complete.click()
    _expect(actions).to_have_text(["Reopen"])  # all a reported study offers its reporter
    assert "reported · reported by dr_house" in page.inner_text(".facts")
    assert page.locator("#message").is_hidden()
    study = _api_study(page, base, uid)
    assert (study["status"], study["reported_by"]) == ("reported", "dr_house")


def test_study_page_reopens_a_study_completed_by_mistake(site, page) -> None:
    """A reported study's page offers its reporter Reopen (and nothing else); after it, the
    study is in progress with the reporter's claim and back on the worklist."""
    base, sessions = site
    uid = _uid(sessions, "ACC-PTX")
    log_in(page, base)
    page.goto(f"{base}/worklist/study/{uid}")
    actions = page.locator("#study-actions button")
    page.click("#study-actions button[data-action=claim]")
    complete = page.locator("#study-actions button[data-action=complete]")
    complete.click()
    _expect(complete).to_have_text("Confirm complete")
    page.wait_for_timeout(CONFIRM_AFTER_MS)
    complete.click()
    _expect(actions).to_have_text(["Reopen"])
    assert "reported · reported by dr_house" in page.inner_text(".facts")

    page.click("#study-actions button[data-action=reopen]")
    _expect(actions).to_have_text(["Complete", "Release", "Priority…"])
    assert "in progress · dr_house" in page.inner_text(".facts")
    assert "reported by" not in page.inner_text(".facts")
    assert page.locator("#message").is_hidden()
    study = _api_study(page, base, uid)
    assert (study["status"], study["claimed_by"], study["reported_by"]) == (
        "in_progress",
        "dr_house",
        "",
    )

    page.click("#back")
    page.wait_for_url(f"{base}/worklist")
    row = page.locator(f"#rows tr[data-study-uid='{uid}']")
    _expect(row).to_have_count(1)
    _expect(row.locator("button[data-action=complete]")).to_have_text("Complete")


def test_study_page_of_a_study_another_radiologist_claims(site, page) -> None:
    """A claim the page did not know of yet answers 409: the page shows why and the study as it
    is now, with no Complete (nor Claim) button; the override dialog works from the page."""
    base, sessions = site
    uid = _uid(sessions, "ACC-ROUTINE")
    log_in(page, base)
    page.goto(f"{base}/worklist/study/{uid}")
    _expect(page.locator("#study-actions button")).to_have_text(["Claim", "Priority…"])
    with sessions() as session:
        claim(session, uid, "dr_grey", utcnow())

    page.click("#study-actions button[data-action=claim]")
    message = page.locator("#message")
    _expect(message).to_be_visible()
    assert f"study {uid} is being read by dr_grey" in message.inner_text()
    _expect(page.locator("#study-actions button")).to_have_text(["Priority…"])
    assert "in progress · dr_grey" in page.inner_text(".facts")
    study = _api_study(page, base, uid)
    assert (study["status"], study["claimed_by"]) == ("in_progress", "dr_grey")

    page.click("#study-actions button[data-action=override]")
    page.select_option("#override-tier", "stat")
    page.fill("#override-reason", "ED called: trauma")
    page.click("#override-form button[type=submit]")
    _expect(page.locator(".study-head h1 .chip")).to_have_text("stat")
    assert _api_study(page, base, uid)["override_tier"] == "stat"
    assert message.is_hidden()


def test_a_reported_study_with_new_images_is_back_and_flagged(site, page) -> None:
    """An image indexed into a reported study (real ingest) brings it back on the worklist,
    flagged 'new images after report (1)' in its status column and on its study page, which
    names the earlier report."""
    base, sessions = site
    uid = _uid(sessions, "ACC-ROUTINE")
    with sessions() as session:
        claim(session, uid, "dr_grey", utcnow())
        complete(session, uid, "dr_grey", utcnow())
    log_in(page, base)
    _expect(page.locator(f"#rows tr[data-study-uid='{uid}']")).to_have_count(0)
    with sessions() as session:
        facts = InstanceFacts(
            study_instance_uid=uid,
            series_instance_uid=f"{uid}.9",
            sop_instance_uid=f"{uid}.9.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
            modality="DX",
        )
        index_instance(
            session,
            facts,
            path="/nonexistent/late.dcm",
            size_bytes=1,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            calling_ae="MODALITY",
            now=utcnow(),
            quiet_seconds=60,
            worklist=WorklistSettings(),
        )
    row = page.locator(f"#rows tr[data-study-uid='{uid}']")
    _expect(row).to_have_count(1)  # the page polls: no reload
    flag = row.locator("td.status .new-images")
    _expect(flag).to_have_text("new images after report (1)")
    _expect(flag).to_be_visible()
    assert "dr_grey" in flag.get_attribute("title")
    _expect(row.locator(".reason-text")).to_contain_text("new images after report (1); ")

    page.goto(f"{base}/worklist/study/{uid}")
    _expect(page.locator("#study-new-images")).to_have_text("new images after report (1)")
    facts_text = page.inner_text(".facts")
    assert "waiting · earlier report by dr_grey" in facts_text
