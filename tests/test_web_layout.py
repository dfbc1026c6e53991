"""The worklist page's layout in headless Chromium at common screen sizes, with a realistic
day's studies (the whole model zoo's findings and result objects on most of them): the table
fits 1280 and 1400 px without sideways scrolling, every action button is on screen, and rows are
compact enough that a 900 px high screen shows at least eight studies. Probabilities near 0 or 1
never read as certainty ("<1%", ">99%")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from web_server import CHROMIUM, add_users, chromium_page, log_in, screenshot, serve
from worklist_seed import add_export_job, add_results_job, add_study, add_zoo_study

from dicomnode.db.models import Study
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade, utcnow
from dicomnode.findings import probability_text
from dicomnode.web.app import create_app
from dicomnode.worklist.service import claim

ROWS = "#rows tr[data-study-uid]"
MIN_ROWS_ON_SCREEN = 8

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} not found (apt-get install chromium)"
)


def _seed_day(sessions, folder: Path) -> None:
    """Fourteen open studies: six through the model zoo (one claimed by the user, one by a
    colleague, one with a failed export), a near-certain pneumothorax, routine studies with
    an SR, one waiting for the AI, one whose results job left objects out, and long names."""
    now = utcnow()
    with sessions() as session:
        zoo = [
            add_zoo_study(session, f"ACC-ZOO-{n}", folder, minutes_ago=5 + 17 * n, now=now)
            for n in range(6)
        ]
        sr = folder / "sr.dcm"
        sr.write_bytes(b"\0" * 128 + b"DICM")
        add_study(session, "ACC-SURE", minutes_ago=2, probability=0.99915, now=now, result_file=sr)
        add_study(session, "ACC-FAINT", minutes_ago=95, probability=0.004, now=now, result_file=sr)
        for n, probability in enumerate((0.12, 0.27, 0.08, 0.19)):
            add_study(
                session,
                f"ACC-RT-{n}",
                minutes_ago=60 + 40 * n,
                probability=probability,
                now=now,
                result_file=sr,
            )
        add_study(session, "ACC-WAITING", minutes_ago=1, now=now)
        partial = add_study(session, "ACC-PARTIAL", minutes_ago=50, probability=0.2, now=now)
        add_results_job(
            session,
            partial,
            "done",
            not_written=[
                {
                    "model": "cxr-nodule-demo",
                    "version": "1.0.0",
                    "kind": "gsps",
                    "error": "ValueError: unsupported window",
                }
            ],
            now=now,
        )
        long_one = session.query(Study).filter_by(study_instance_uid=zoo[2][0]).one()
        long_one.patient_name = "Vandenberghe-Oosterhuis^Maximiliana Alexandra^^Dr"
        long_one.patient_id = "PID-2026-000123456789"
        long_one.accession_number = "ACC-2026-0000012345-XR"
        session.commit()
        add_export_job(
            session,
            zoo[1][1][("sr", "cxr-pneumothorax-demo")],
            "VNA",
            "dead",
            attempts=5,
            last_error="association rejected by VNA: called AE title not recognised",
            now=now,
        )
        claim(session, zoo[0][0], "dr_house", now)
        claim(session, zoo[3][0], "dr_grey", now)
        session.commit()


@pytest.fixture
def day_site(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'dicomnode.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    add_users(sessions)
    _seed_day(sessions, tmp_path)
    with serve(create_app(sessions)) as base:
        yield base
    engine.dispose()


@pytest.fixture
def page(day_site):
    with chromium_page() as page:
        yield page


def _assert_fits(page, width: int, height: int) -> None:
    page.set_viewport_size({"width": width, "height": height})
    page.wait_for_function("document.querySelector('.table-wrap').clientWidth <= innerWidth")
    wrap = page.evaluate(
        "(() => { const w = document.querySelector('.table-wrap');"
        " return {scroll: w.scrollWidth, client: w.clientWidth,"
        " page: document.documentElement.scrollWidth}; })()"
    )
    assert wrap["scroll"] <= wrap["client"], (width, wrap)
    assert wrap["page"] <= width, (width, wrap)
    buttons = page.locator(f"{ROWS} td.actions button")
    assert buttons.count() >= 13
    for box in page.evaluate(
        "Array.from(document.querySelectorAll('#rows td.actions button')).map(b => {"
        " const r = b.getBoundingClientRect(), c = b.closest('td').getBoundingClientRect();"
        " return {text: b.textContent, left: r.left, right: r.right,"
        " cellLeft: c.left, cellRight: c.right}; })"
    ):
        assert box["left"] >= 0 and box["right"] <= width, (width, box)
        assert box["cellLeft"] <= box["left"] and box["right"] <= box["cellRight"], (width, box)


def test_worklist_shows_eight_compact_rows_on_a_1280_x_900_screen(page, day_site) -> None:
    page.set_viewport_size({"width": 1280, "height": 900})
    log_in(page, day_site)
    assert page.locator(ROWS).count() == 14
    screenshot(page, "worklist-1280x900.png")
    # Everything the page shows is still there.
    assert "NOT FOR CLINICAL USE" in page.inner_text("#demo-banner")
    zoo = page.locator("#rows tr", has_text="ACC-ZOO-1")
    assert zoo.locator("td.priority .chip").inner_text().lower() == "critical"
    assert zoo.locator("td.reason .finding.present").count() == 2
    assert zoo.locator("td.results a[data-kind]").count() == 6
    assert "export failed: VNA" in zoo.locator("td.status").inner_text()
    mine = page.locator("#rows tr", has_text="ACC-ZOO-0")
    assert mine.locator("td.actions button").all_inner_texts() == [
        "Complete",
        "Release",
        "Priority…",
    ]

    # At least eight rows, whole, above the fold of a 1280 x 900 screen.
    bottoms = page.evaluate(
        "Array.from(document.querySelectorAll('#rows tr[data-study-uid]'))"
        ".map(r => r.getBoundingClientRect().bottom)"
    )
    on_screen = sum(bottom <= 900 for bottom in bottoms)
    assert on_screen >= MIN_ROWS_ON_SCREEN, bottoms

    # Long names stay on one line, cut, the whole text in the tooltip.
    long_row = page.locator("#rows tr", has_text="ACC-2026-0000012345-XR")
    patient = long_row.locator("td.patient .patient-name")
    assert patient.get_attribute("title") == "Vandenberghe-Oosterhuis Maximiliana Alexandra  Dr"
    assert long_row.locator("td.accession").get_attribute("title") == "ACC-2026-0000012345-XR"


@pytest.mark.parametrize("width,height", [(1280, 800), (1400, 900)])
def test_worklist_fits_the_screen_with_every_action_button_visible(
    page, day_site, width: int, height: int
) -> None:
    page.set_viewport_size({"width": width, "height": height})
    log_in(page, day_site)
    _assert_fits(page, width, height)
    screenshot(page, f"worklist-{width}x{height}.png")
    # Complete waiting for its confirmation is a longer button; it wraps within the column.
    complete = page.locator("#rows tr", has_text="ACC-ZOO-0").locator(
        "button[data-action=complete]"
    )
    complete.click()
    assert complete.inner_text() == "Confirm complete"
    _assert_fits(page, width, height)
    screenshot(page, f"worklist-{width}x{height}-confirm.png")


# (screen width, height, the patient column's least width in px): the name is not squeezed
# into a narrow column while the reason column takes the rest of a wide screen.
PATIENT_WIDTHS = [(1280, 900, 120), (1920, 1080, 200)]


@pytest.mark.parametrize("width,height,patient_width", PATIENT_WIDTHS)
def test_patient_names_have_room_and_finding_chips_wrap_whole(
    page, day_site, width: int, height: int, patient_width: int
) -> None:
    """The patient column widens with the screen; each finding chip (a finding, its
    probability and its model) goes to the next line whole, never split across two lines,
    and stays inside its cell."""
    page.set_viewport_size({"width": width, "height": height})
    log_in(page, day_site)
    _assert_fits(page, width, height)
    long_row = page.locator("#rows tr", has_text="ACC-2026-0000012345-XR")
    long_row.locator("details.below summary").click()  # its eight findings below threshold
    screenshot(page, f"worklist-chips-{width}x{height}.png")
    cells = page.evaluate(
        "Array.from(document.querySelectorAll('#rows td.patient'))"
        ".map(td => td.getBoundingClientRect().width)"
    )
    assert len(cells) == 14 and min(cells) >= patient_width, (width, cells)
    chips = page.evaluate(
        "Array.from(document.querySelectorAll('#rows td.reason .finding'))"
        ".filter(f => f.checkVisibility()).map(f => {"
        " const r = f.getBoundingClientRect(), c = f.closest('td').getBoundingClientRect();"
        " const parts = Array.from(f.children).map(p => p.getBoundingClientRect());"
        " const lines = e => new Set(Array.from(e.getClientRects(), b => Math.round(b.top))).size;"
        " return {text: f.textContent, lines: lines(f),"
        " headLines: lines(f.querySelector('.finding-head')),"
        " inCell: c.left <= r.left && r.right <= c.right + 0.5,"
        " partsIn: parts.every(p => r.left - 0.5 <= p.left && p.right <= r.right + 0.5"
        " && r.top - 0.5 <= p.top && p.bottom <= r.bottom + 0.5)}; })"
    )
    # Two present findings in each of six zoo rows and one in ACC-SURE, eight open below.
    assert len(chips) == 6 * 2 + 1 + 8, chips
    for chip in chips:
        # One box on one line (an inline box split over two lines has a box on each).
        assert chip["lines"] == 1 and chip["headLines"] == 1, (width, chip)
        assert chip["inCell"] and chip["partsIn"], (width, chip)


def test_probabilities_near_certainty_are_not_shown_as_certain(page, day_site) -> None:
    log_in(page, day_site)
    sure = page.locator("#rows tr", has_text="ACC-SURE")
    assert "AI critical: Pneumothorax >99%" in sure.locator("td.reason").inner_text()
    assert sure.locator(".finding.present .prob").inner_text() == ">99%"
    assert "100%" not in sure.inner_text()
    faint = page.locator("#rows tr", has_text="ACC-FAINT")
    faint.locator("details.below summary").click()
    assert faint.locator(".below-list .finding .prob").inner_text() == "<1%"
    assert "0%" not in faint.locator("td.reason").inner_text().replace("<1%", "")

    # The API keeps the raw numbers; only the reason is display text.
    listing = page.request.get(f"{day_site}/api/worklist").json()
    by_accession = {row["accession_number"]: row for row in listing["rows"]}
    assert [f["probability"] for f in by_accession["ACC-SURE"]["findings"]] == [0.99915]
    assert [f["probability"] for f in by_accession["ACC-FAINT"]["findings"]] == [0.004]
    assert by_accession["ACC-SURE"]["reason"] == "AI critical: Pneumothorax >99%"

    # The study page says the same.
    sure.locator("td.results a.details").click()
    page.wait_for_url("**/worklist/study/*")
    cells = page.locator("table.model-findings tbody td.num").all_inner_texts()
    assert cells == [">99%", "50%"]  # probability, threshold
    assert page.inner_text("#study-reason") == "AI critical: Pneumothorax >99%"
    screenshot(page, "study-near-certain.png")


# Near and at the ends, a tie at each end of "<1%" and ">99%", and a tie between whole
# percentages (12.5%: to even, as Python's format).
PROBABILITIES = (0, 0.004, 0.005, 0.01, 0.125, 0.5, 0.99, 0.995, 0.99915, 1)


@pytest.fixture
def probabilities_site(tmp_path: Path) -> Iterator[str]:
    """One analysed study per probability in :data:`PROBABILITIES`, its one finding scored so."""
    url = f"sqlite:///{tmp_path / 'dicomnode.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    add_users(sessions)
    with sessions() as session:
        for n, probability in enumerate(PROBABILITIES):
            add_study(session, f"ACC-P{n}", minutes_ago=10 + n, probability=probability)
    with serve(create_app(sessions)) as base:
        yield base
    engine.dispose()


def test_the_worklist_page_reads_each_probability_as_python_does(probabilities_site) -> None:
    """The page's script mirrors ``findings.probability_text`` (the rows' reasons and the
    study page use it): each probability reads the same on the worklist page as in Python."""
    with chromium_page() as page:
        log_in(page, probabilities_site)
        shown = {}
        for n, probability in enumerate(PROBABILITIES):
            row = page.locator("#rows tr", has_text=f"ACC-P{n}")
            # Findings below threshold are in a closed <details>: their text, not their look.
            shown[probability] = row.locator(".finding .prob").text_content()
    assert shown == {probability: probability_text(probability) for probability in PROBABILITIES}
