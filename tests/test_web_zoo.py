"""The worklist with a whole model zoo per study: the study detail (REST on SQLite and
PostgreSQL, and the server-rendered page) lists every model's findings with thresholds and the
result objects by kind with their export state per destination; in headless Chromium a row
with eleven findings shows the present ones and collapses the rest, and the detail page lists
the result objects."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from web_server import CHROMIUM, PASSWORD, add_users, chromium_page, log_in, serve
from worklist_seed import ZOO_FINDINGS, ZOO_RESULTS, add_export_job, add_study, add_zoo_study

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.db.models import AuditEntry
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade, utcnow
from dicomnode.web.app import create_app

PTX_SR = ("sr", "cxr-pneumothorax-demo")
PTX_OVERLAY = ("overlay", "cxr-pneumothorax-demo")
LUNG_SEG = ("seg", "cxr-lung-seg-demo")


def _seed_zoo(sessions, folder: Path) -> tuple[str, dict[tuple[str, str], str]]:
    """The zoo study plus a routine one, with exports in every state to two destinations."""
    now = utcnow()
    with sessions() as session:
        add_study(session, "ACC-ROUTINE", minutes_ago=30, probability=0.1, now=now)
        uid, objects = add_zoo_study(session, "ACC-ZOO", folder, now=now)
        add_export_job(session, objects[PTX_SR], "PACS", "done", attempts=1, now=now)
        add_export_job(
            session,
            objects[PTX_SR],
            "VNA",
            "dead",
            attempts=5,
            last_error="association rejected by VNA",
            now=now,
        )
        add_export_job(
            session,
            objects[PTX_OVERLAY],
            "PACS",
            "queued",
            attempts=2,
            last_error="connection refused",
            now=now,
        )
        # Re-analysis exports the SEG again: the latest job to a destination is its state.
        add_export_job(session, objects[LUNG_SEG], "PACS", "done", attempts=1, now=now)
        add_export_job(session, objects[LUNG_SEG], "PACS", "queued", now=now)
    return uid, objects


@pytest.fixture
def zoo_site(sessions, tmp_path: Path) -> Iterator[tuple[str, object, dict, str, dict]]:
    tokens = add_users(sessions)
    uid, objects = _seed_zoo(sessions, tmp_path)
    with serve(create_app(sessions)) as url:
        yield url, sessions, tokens, uid, objects


def test_study_detail_api_lists_models_and_result_objects_with_exports(zoo_site) -> None:
    url, sessions, tokens, uid, objects = zoo_site
    headers = {"Authorization": f"Bearer {tokens['dr_house']}"}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        assert httpx.get(f"{url}/api/studies/{uid}", timeout=10).status_code == 401
        assert client.get("/api/studies/1.2.3.999").status_code == 404
        detail = client.get(f"/api/studies/{uid}").json()

    assert detail["priority"] == "critical" and "Pneumothorax" in detail["reason"]
    assert len(detail["findings"]) == len(ZOO_FINDINGS)

    # Every model's findings, models with a present finding first, thresholds included.
    models = [(m["model"], m["present"], len(m["findings"])) for m in detail["models"]]
    assert models == [
        ("cxr-findings-demo", 1, 7),
        ("cxr-pneumothorax-demo", 1, 1),
        ("cxr-triage-demo", 1, 1),
        ("cxr-nodule-demo", 0, 1),
        ("cxr-tb-ensemble-demo", 0, 1),
    ]
    findings = detail["models"][0]["findings"]
    assert [f["probability"] for f in findings] == sorted(
        (f["probability"] for f in findings), reverse=True
    )
    by_meaning = {f["meaning"]: f for f in findings}
    assert by_meaning["Pneumothorax"]["present"] and by_meaning["Pneumothorax"]["critical"]
    # 0.31 is below Cardiomegaly's threshold 0.546: absent, and the threshold is shown.
    assert by_meaning["Cardiomegaly"] == {
        "code": "8186001",
        "scheme": "SCT",
        "meaning": "Cardiomegaly",
        "probability": 0.31,
        "threshold": 0.546,
        "present": False,
        "critical": False,
    }

    # Result objects by kind, in the order SR, overlay, SEG, GSPS, derived, KOS.
    groups = detail["result_groups"]
    assert [g["kind"] for g in groups] == ["sr", "overlay", "seg", "gsps", "derived", "kos"]
    assert sum(len(g["results"]) for g in groups) == len(ZOO_RESULTS)
    assert [r["model"] for r in groups[0]["results"]] == [
        "cxr-findings-demo",
        "cxr-pneumothorax-demo",
        "cxr-triage-demo",
    ]
    results = {r["sop_instance_uid"]: r for g in groups for r in g["results"]}
    assert set(results) == set(objects.values())
    sr = results[objects[PTX_SR]]
    assert sr["url"] == f"/api/results/{objects[PTX_SR]}" and sr["version"] == "1.0.0"
    assert [(e["destination"], e["state"], e["summary"]) for e in sr["exports"]] == [
        ("PACS", "done", "sent"),
        ("VNA", "dead", "failed after 5 attempts: association rejected by VNA"),
    ]
    overlay = results[objects[PTX_OVERLAY]]
    assert [e["summary"] for e in overlay["exports"]] == ["retrying (2 failed: connection refused)"]
    assert [e["state"] for e in results[objects[LUNG_SEG]]["exports"]] == ["queued"]
    assert results[objects[("kos", "cxr-pneumothorax-demo")]]["exports"] == []
    assert detail["export_errors"] == ["VNA: association rejected by VNA"]

    with sessions() as session:
        views = session.query(AuditEntry).filter_by(action="view_study", actor="dr_house").all()
        assert [v.study_instance_uid for v in views] == [uid]


def _page_client(url: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=10, follow_redirects=True)
    form = client.get("/login")  # opens the client; the caller closes it
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    page = client.post(
        "/login", data={"username": "dr_grey", "password": PASSWORD, "csrf_token": csrf}
    )
    assert page.url.path == "/worklist"
    return client


def test_study_detail_page_is_server_rendered_and_audited(zoo_site) -> None:
    url, sessions, _, uid, _ = zoo_site
    anonymous = httpx.get(f"{url}/worklist/study/{uid}", timeout=10)
    assert anonymous.status_code == 303
    assert anonymous.headers["location"] == f"/login?next=/worklist/study/{uid}"

    client = _page_client(url)
    try:
        page = client.get(f"/worklist/study/{uid}")
        missing = client.get("/worklist/study/1.2.3.999")
    finally:
        client.close()
    assert page.status_code == 200, page.text
    html = page.text
    banner = html.split('id="demo-banner"')[1].split("</div>")[0]
    assert RESEARCH_DEMO_NOTICE.upper() in banner
    assert "ACC-ZOO" in html
    for model in {finding[0] for finding in ZOO_FINDINGS}:
        assert f'data-model="{model}"' in html
    # Text, not only colour: each finding says present or absent.
    assert html.count("Absent (below threshold)") == 8
    assert html.count('<span class="crit-tag">Critical</span> Present') == 2
    assert "Cardiomegaly" in html and "55%" in html  # its threshold 0.546
    for kind in ("sr", "overlay", "seg", "gsps", "derived", "kos"):
        assert f'id="results-{kind}"' in html
    assert html.count('href="/api/results/') == len(ZOO_RESULTS)
    assert "VNA: failed after 5 attempts: association rejected by VNA" in html
    assert "PACS: sent" in html

    assert missing.status_code == 404 and "1.2.3.999" in missing.text
    with sessions() as session:
        views = session.query(AuditEntry).filter_by(action="view_study", actor="dr_grey").all()
        assert [(v.study_instance_uid, v.detail) for v in views] == [(uid, "page")]


# The browser part runs on SQLite only: the page does not care which database is behind it.
@pytest.fixture
def browser_site(tmp_path: Path) -> Iterator[tuple[str, str, dict]]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    db_url = f"sqlite:///{tmp_path / 'dicomnode.db'}"
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    add_users(sessions)
    uid, objects = _seed_zoo(sessions, tmp_path)
    with serve(create_app(sessions)) as url:
        yield url, uid, objects
    engine.dispose()


@pytest.fixture
def page(browser_site):
    with chromium_page() as page:
        yield page


def test_row_shows_present_findings_and_collapses_the_rest(browser_site, page) -> None:
    from playwright.sync_api import expect

    url, uid, objects = browser_site
    log_in(page, url)

    row = page.locator(f"#rows tr[data-study-uid='{uid}']")
    assert page.locator("#rows tr").first.get_attribute("data-study-uid") == uid
    reason = row.locator("td.reason")
    # Present findings, one per label, critical first: Pneumothorax (two models agree), Abnormal.
    present = reason.locator(".finding.present")
    assert present.all_inner_texts() == [
        "CRITICAL Pneumothorax 91% · cxr-pneumothorax-demo 1.0.0 +1 model",
        "Abnormal 88% · cxr-triage-demo 1.0.0",
    ]
    assert "cxr-findings-demo 1.0.0 84%" in present.first.get_attribute("title")
    assert present.first.locator(".crit-tag").count() == 1
    # The eight below threshold are collapsed behind a summary, so the row stays short.
    summary = reason.locator("details.below summary")
    assert summary.inner_text().strip().endswith("+8 below threshold")
    below = reason.locator(".below-list .finding")
    expect(below.first).to_be_hidden()
    # The findings take about three lines: the AI tag, two findings (the cell itself is as
    # tall as the row's tallest cell: the status column's failed export, the results' links).
    findings = reason.locator(".findings")
    collapsed = findings.bounding_box()["height"]
    line = float(page.evaluate("parseFloat(getComputedStyle(document.body).lineHeight)"))
    assert collapsed <= 3 * line, (collapsed, line)
    status = row.locator("td.status").inner_text()
    assert "export failed: VNA: association rejected by VNA" in status.replace("\n", " ")

    summary.click()
    expect(below).to_have_count(8)
    expect(below.first).to_be_visible()
    assert below.first.inner_text().startswith("Cardiomegaly 31%")
    assert findings.bounding_box()["height"] > collapsed
    # It stays open across the page's live refresh (it re-renders every row).
    updated = page.inner_text("#live-text")
    expect(page.locator("#live-text")).not_to_have_text(updated, timeout=10_000)
    expect(row.locator(".below-list .finding").first).to_be_visible()

    # A routine study: nothing present, its one finding collapsed.
    routine = page.locator("#rows tr", has_text="ACC-ROUTINE").locator("td.reason")
    assert routine.locator(".finding.present").count() == 0
    summary_text = routine.locator("details.below summary").inner_text()
    assert summary_text.strip().endswith("+1 below threshold")

    # Results: one link per kind; a lone object downloads, several go to the detail page.
    links = row.locator("td.results a[data-kind]")
    assert [t.split()[0] for t in links.all_inner_texts()] == [
        "SR",
        "Overlay",
        "SEG",
        "GSPS",
        "Derived",
        "KOS",
    ]
    assert row.locator("td.results a[data-kind=sr]").inner_text() == "SR ×3"
    kos = row.locator("td.results a[data-kind=kos]").get_attribute("href")
    assert kos == f"/api/results/{objects[('kos', 'cxr-pneumothorax-demo')]}"

    # The detail page lists every result object by kind, with its export state.
    row.locator("td.results a.details").click()
    page.wait_for_url(f"{url}/worklist/study/{uid}")
    assert "NOT FOR CLINICAL USE" in page.inner_text("#demo-banner")
    expect(page.locator("table.model-findings")).to_have_count(5)
    sr_rows = page.locator("#results-sr tbody tr")
    expect(sr_rows).to_have_count(3)
    ptx_sr = page.locator(f"tr[data-sop-uid='{objects[PTX_SR]}']")
    assert ptx_sr.locator(".export").all_inner_texts() == [
        "PACS: sent",
        "VNA: failed after 5 attempts: association rejected by VNA",
    ]
    expect(page.locator("table.result-group tbody tr")).to_have_count(len(ZOO_RESULTS))
    page.click("#back")
    page.wait_for_url(f"{url}/worklist")


def test_an_export_being_retried_is_not_shown_as_failed(tmp_path: Path) -> None:
    """A study whose only export problem is an object queued again after a failed attempt
    (nothing dead-lettered): its row says "export PACS: retrying (2 failed: ...)", not
    "export failed:" (it has not failed for good)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    db_url = f"sqlite:///{tmp_path / 'dicomnode.db'}"
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    add_users(sessions)
    now = utcnow()
    with sessions() as session:
        uid, objects = add_zoo_study(session, "ACC-RETRY", tmp_path, now=now)
        add_export_job(
            session,
            objects[PTX_OVERLAY],
            "PACS",
            "queued",
            attempts=2,
            last_error="connection refused",
            now=now,
        )
    try:
        with serve(create_app(sessions)) as url, chromium_page() as page:
            log_in(page, url)
            status = page.locator(f"#rows tr[data-study-uid='{uid}'] td.status")
            status.locator(".export-failed").wait_for()
            text = status.inner_text().replace("\n", " ")
            assert "export PACS: retrying (2 failed: connection refused)" in text, text
            assert "export failed" not in text
    finally:
        engine.dispose()
