"""Every surface that shows a demo model's output says it is a research demo, not for clinical
use: the DICOM results (SR, SC overlay, GSPS, SEG, derived image, KOS), the REST API and web
page, the CLI, the start-up log, notifications and the model cards. A model that is not a
research demo gets none of these labels (so the checks below can fail)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from conftest import start_serve, stop_process, wait_for, write_config
from dciodvfy import chest_xray
from PIL import ImageDraw
from web_server import PASSWORD, add_users, serve
from worklist_seed import add_study

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.config import NotifySettings
from dicomnode.db.session import utcnow
from dicomnode.findings import (
    Algorithm,
    CodedConcept,
    DerivedImage,
    Finding,
    ImageFindings,
    Segment,
    Segmentation,
)
from dicomnode.models.registry import discover_cards
from dicomnode.notify import CriticalResult, FindingNote, hl7_message, webhook_body
from dicomnode.ports import wait_for_port
from dicomnode.results.derived import build_derived
from dicomnode.results.gsps import build_gsps
from dicomnode.results.kos import build_kos
from dicomnode.results.overlay import build_overlay
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import build_sr
from dicomnode.web.app import create_app

REPO = Path(__file__).resolve().parents[1]
NOTICE = RESEARCH_DEMO_NOTICE.lower()
LUNG = CodedConcept("39607008", "SCT", "Lung structure")
NODULE = CodedConcept("27925004", "SCT", "Nodule")

DEMO = Algorithm(name="cxr-nodule-demo", version="1.0.0")
# Long enough that every 64-character field must be cut: the notice must survive the cut.
LONG_DEMO = Algorithm(name="cxr-multi-finding-nodule-and-effusion-research-model", version="12.3")
CLINICAL = Algorithm(name="cxr-nodule-cleared", version="2.0.0", research_demo=False)


def says_notice(text: str) -> bool:
    return "research demo" in text.lower() and "not for clinical use" in text.lower()


def strings(ds: pydicom.Dataset) -> Iterator[tuple[str, str, str]]:
    """(keyword, VR, text) of every string value in the dataset, nested sequences included."""
    for element in ds.iterall():
        if element.VR in ("LO", "LT", "ST", "UT", "SH", "CS") and element.value:
            values = element.value if element.VM > 1 else [element.value]
            for value in values:
                yield element.keyword, element.VR, str(value)


def texts_of(ds: pydicom.Dataset, keyword: str) -> list[str]:
    return [text for name, _, text in strings(ds) if name == keyword]


@pytest.fixture(scope="module")
def source() -> pydicom.Dataset:
    return chest_xray(31, size=128)


def _evaluation(source: pydicom.Dataset) -> ImageFindings:
    heatmap = np.zeros((128, 128), dtype=np.float32)
    heatmap[30:60, 40:70] = 1.0
    return ImageFindings(
        source,
        [
            Finding(NODULE, 0.91, 0.5, critical=True, box=(40.0, 30.0, 70.0, 60.0)),
            Finding(LUNG, 0.8, 0.5, critical=False, heatmap=heatmap, peak=(55.0, 45.0)),
        ],
    )


def build_all(source: pydicom.Dataset, algorithm: Algorithm) -> dict[str, pydicom.Dataset]:
    evaluation = _evaluation(source)
    probabilities = np.zeros((1, 128, 128), dtype=np.float32)
    probabilities[0, 20:100, 10:60] = 0.9
    objects = {
        "sr": build_sr([evaluation], algorithm),
        "overlay": build_overlay(evaluation, algorithm),
        "gsps": build_gsps(evaluation, algorithm),
        "seg": build_seg(Segmentation([source], [Segment(LUNG, probabilities)]), algorithm),
        "derived": build_derived(
            DerivedImage(source, source.pixel_array.astype(np.float32), "bone suppression"),
            algorithm,
        ),
    }
    objects["kos"] = build_kos([source], algorithm, [objects["sr"], objects["seg"]])
    return objects


# What each result object shows, and where. A viewer lists series by Series Description
# (LO, 64 characters: room for "research demo" only); the full notice is in the fields below.
FULL_NOTICE_FIELDS = {
    "sr": ["TextValue"],
    "overlay": ["ImageComments", "DerivationDescription"],
    "gsps": ["ContentDescription", "UnformattedTextValue"],
    "seg": ["ContentDescription", "SegmentDescription"],
    "derived": ["ImageComments", "DerivationDescription"],
    "kos": ["TextValue"],
}


@pytest.mark.parametrize("algorithm", [DEMO, LONG_DEMO], ids=["short-name", "long-name"])
def test_every_dicom_result_of_a_demo_says_so(
    source: pydicom.Dataset, algorithm: Algorithm
) -> None:
    for kind, ds in build_all(source, algorithm).items():
        assert "research demo" in ds.SeriesDescription, kind
        assert len(ds.SeriesDescription) <= 64, kind
        for keyword in FULL_NOTICE_FIELDS[kind]:
            values = texts_of(ds, keyword)
            assert values, f"{kind} has no {keyword}"
            assert any(says_notice(value) for value in values), (kind, keyword, values)
        for keyword, vr, text in strings(ds):  # the notice never overflows a field
            assert vr != "LO" or len(text) <= 64, (kind, keyword, text)
    segment = build_all(source, algorithm)["seg"].SegmentSequence[0]
    assert says_notice(segment.SegmentDescription)


def test_results_of_a_cleared_model_carry_no_demo_label(source: pydicom.Dataset) -> None:
    for kind, ds in build_all(source, CLINICAL).items():
        for keyword, _, text in strings(ds):
            assert "research demo" not in text.lower(), (kind, keyword, text)


def test_overlay_burns_the_notice_into_the_pixels(
    source: pydicom.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[str] = []
    original = ImageDraw.ImageDraw.text

    def recording(self, xy, text, *args, **kwargs):  # the real drawing still happens
        drawn.append(str(text))
        return original(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", recording)
    overlay = build_overlay(_evaluation(source), DEMO)
    assert overlay.BurnedInAnnotation == "YES"
    assert "AI RESULT - NOT FOR DIAGNOSTIC USE" in drawn
    # The model's line says it, or (a small image) the line under it, whole.
    model = next(index for index, text in enumerate(drawn) if "cxr-nodule-demo" in text)
    assert says_notice(drawn[model]) or says_notice(drawn[model + 1]), drawn
    drawn.clear()
    build_overlay(_evaluation(source), CLINICAL)
    assert "AI RESULT - NOT FOR DIAGNOSTIC USE" in drawn
    assert not any("research demo" in text.lower() for text in drawn)


def test_every_model_card_describes_itself_as_a_research_demo() -> None:
    cards = discover_cards([REPO / "models"])
    assert len(cards) >= 1
    for card in cards:
        assert card.model.research_demo, card.model.name
        assert says_notice(card.model.description), card.model.name
        assert says_notice(card.model.disclaimer), card.model.name


def test_models_list_marks_each_demo_model() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "dicomnode", "models", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=True,
    ).stdout.splitlines()
    cards = discover_cards([REPO / "models"])
    assert len(listed) == len(cards)
    for line in listed:
        assert line.endswith("(research demo, not for clinical use)"), line


NOTE = CriticalResult(
    study_instance_uid="1.2.3.4",
    accession_number="ACC1",
    patient_id="PID1",
    patient_name="Doe^Jane",
    modality="DX",
    tier="critical",
    ups_priority="HIGH",
    reason="AI critical: Pneumothorax 87%",
    received_at=utcnow(),
    due_at=utcnow(),
    findings=[FindingNote("36118008", "SCT", "Pneumothorax", 0.87, 0.5, True, "cxr 1")],
)


def test_notifications_carry_the_notice() -> None:
    assert says_notice(webhook_body(NOTE, "n-1")["notice"])
    message = hl7_message(NOTE, "c-1", NotifySettings(), utcnow())
    notes = [segment for segment in message.split("\r") if segment.startswith("NTE|")]
    assert notes and says_notice(notes[0])


def test_api_and_page_show_the_notice(sessions) -> None:
    tokens = add_users(sessions)
    with sessions() as session:
        uid = add_study(session, "ACC-DEMO", now=utcnow(), probability=0.93)
    with serve(create_app(sessions)) as url:
        headers = {"Authorization": f"Bearer {tokens['dr_house']}"}
        with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
            listing = client.get("/api/worklist").json()
            assert says_notice(listing["notice"])
            (row,) = [row for row in listing["rows"] if row["study_instance_uid"] == uid]
            assert row["findings"] and says_notice(row["notice"])
            # A study fetched on its own (e.g. by a viewer integration) says it too.
            study = client.get(f"/api/studies/{uid}").json()
            assert study["findings"] and says_notice(study["notice"])
            claimed = client.post(f"/api/studies/{uid}/claim").json()
            assert says_notice(claimed["notice"])
        with httpx.Client(base_url=url, timeout=10, follow_redirects=True) as browser:
            login = browser.get("/login")
            assert RESEARCH_DEMO_NOTICE.upper() in login.text
            csrf = login.text.split('name="csrf_token" value="')[1].split('"')[0]
            page = browser.post(
                "/login", data={"username": "dr_house", "password": PASSWORD, "csrf_token": csrf}
            )
            assert page.url.path == "/worklist"
            banner = page.text.split('id="demo-banner"')[1].split("</div>")[0]
            assert RESEARCH_DEMO_NOTICE.upper() in banner
            assert "ACC-DEMO" in page.text  # the rows with their AI reasons are on this page


def test_worklist_cli_and_start_up_log_say_it(tmp_path: Path) -> None:
    # One listener: no DICOM is sent here, and more only slow the worker's start.
    config, _, web_port = write_config(tmp_path, f"sqlite:///{tmp_path / 'node.db'}", listeners=1)
    process, log = start_serve(tmp_path, config)

    def lines(word: str) -> list[str]:
        return [line for line in log.read_text().splitlines() if word in line]

    try:
        # The node has made its database (the worklist command would too, at the same time)
        # and the worklist command runs while its worker starts.
        wait_for(
            lambda: process.poll() is not None or lines("model card(s)"), what="serve's models"
        )
        table = subprocess.run(
            [sys.executable, "-m", "dicomnode", "worklist", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        assert says_notice(table.splitlines()[0])
        wait_for(
            lambda: process.poll() is not None or lines("ready ("), what="the worker's ready line"
        )
        # Stopped once its web server runs: SIGTERM is then a clean stop.
        wait_for_port(web_port, process, log=log)
    finally:
        stop_process(process)
    started = lines("model card(s)")
    assert started and says_notice(started[0])
    ready = [line for line in lines("worker") if "ready" in line]
    assert ready and all(says_notice(line) for line in ready), ready
