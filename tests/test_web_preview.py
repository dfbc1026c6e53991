"""Image previews on the study page, over a real uvicorn server on SQLite and PostgreSQL with
real stored DICOM files (phantoms spooled and indexed as the SCP does, and the node's own
overlay secondary captures): the list of images per study (one per CT stack, the slice with
the AI view), the PNGs as presented (the DICOM's window and rescale, MONOCHROME1 inverted,
downscaled), the AI view, authentication, 404s; and the page in headless Chromium."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from conftest import spool_and_index
from PIL import Image
from sqlalchemy import select
from web_server import CHROMIUM, add_users, chromium_page, log_in, screenshot, serve

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.db.models import AuditEntry, ResultObject
from dicomnode.db.session import make_engine, make_sessionmaker, upgrade, utcnow
from dicomnode.findings import Algorithm, CodedConcept, Finding, ImageFindings
from dicomnode.results.overlay import build_overlay
from dicomnode.synth.ct import make_ct_series
from dicomnode.synth.cxr import make_cxr
from dicomnode.web.app import create_app
from dicomnode.web.preview_image import source_png

PNEUMOTHORAX = CodedConcept("36118008", "SCT", "Pneumothorax")
NODULE = CodedConcept("786838002", "SCT", "Pulmonary nodule")
DEMO = Algorithm("cxr-pneumothorax-demo", "1.0.0")
CLEARED = Algorithm("cxr-cleared", "2.0.0", research_demo=False)
CT_DEMO = Algorithm("ct-nodule-demo", "1.0.0")
# The radiographs' own window (stored values): narrow, far from a percentile window.
CENTRE, WIDTH = 1500.0, 400.0
BLOCK = 128  # source pixels; 64 in a preview of half the size
# Stored values in the top row of blocks and the grey each shows in the DICOM's window.
WINDOW_VALUES = (
    CENTRE - WIDTH / 2 - 300,  # below the window: black
    CENTRE - WIDTH / 4,  # a quarter up: 64
    CENTRE,  # the centre: 128
    CENTRE + WIDTH / 4,  # three quarters: 191
    CENTRE + WIDTH / 2 + 300,  # above: white
)
CT_SLICES = 12
CT_AI_SLICES = (6, 7, 8)  # 0-based; the middle of them is Instance Number 8
CT_HU_BLOCKS = (-600.0, 0.0)  # in its lung window (-600, 1500): 128 and 230


def _expected_grey(value: float) -> float:
    return 255.0 * float(np.clip((value - (CENTRE - WIDTH / 2)) / WIDTH, 0.0, 1.0))


def _radiograph(seed: int, study_uid: str | None, photometric: str) -> pydicom.Dataset:
    """A 1024 x 800 chest phantom with the blocks of WINDOW_VALUES along its top, and
    the window CENTRE / WIDTH."""
    ds, _ = make_cxr(seed, size=1024, columns=800, photometric=photometric)
    if study_uid:
        ds.StudyInstanceUID = study_uid
    pixels = ds.pixel_array.copy()
    for index, value in enumerate(WINDOW_VALUES):
        pixels[:BLOCK, index * BLOCK : (index + 1) * BLOCK] = value
    ds.PixelData = pixels.tobytes()
    ds.WindowCenter, ds.WindowWidth = CENTRE, WIDTH
    return ds


def _heat(source: pydicom.Dataset) -> ImageFindings:
    rows, columns = int(source.Rows), int(source.Columns)
    row, column = np.mgrid[0:rows, 0:columns]
    heat = np.exp(-((column - 500) ** 2 + (row - 600) ** 2) / (2 * 80.0**2)).astype(np.float32)
    finding = Finding(PNEUMOTHORAX, 0.9, 0.5, True, peak=(500.0, 600.0), heatmap=heat)
    return ImageFindings(source=source, findings=[finding])


def _store_overlay(session, storage: Path, study_id: int, overlay: pydicom.Dataset, name: str):
    path = storage / "results" / f"{overlay.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay.save_as(path, enforce_file_format=True)
    session.add(
        ResultObject(
            study_id=study_id,
            kind="overlay",
            model_name=name,
            model_version="1.0.0",
            sop_class_uid=str(overlay.SOPClassUID),
            sop_instance_uid=str(overlay.SOPInstanceUID),
            series_instance_uid=str(overlay.SeriesInstanceUID),
            path=str(path),
            created_at=utcnow(),
        )
    )
    session.commit()


@dataclass
class Stored:
    cxr_study: str
    pa: str  # MONOCHROME2, with two overlays (a research demo's and another's)
    lateral: str  # MONOCHROME1, no overlay
    ct_study: str
    ct_slices: list[str]
    storage: Path
    overlays: dict[str, str] = field(default_factory=dict)  # model -> overlay SOP UID


def _store_studies(sessions, storage: Path) -> Stored:
    pa = _radiograph(41, None, "MONOCHROME2")
    lateral = _radiograph(42, str(pa.StudyInstanceUID), "MONOCHROME1")
    ct, _ = make_ct_series(43, rows=128, slices=CT_SLICES, nodules=(1, 1))
    for index in CT_AI_SLICES:  # the stored values of HU -600 and 0 in a corner of each
        pixels = ct[index].pixel_array.copy()
        for block, hu in enumerate(CT_HU_BLOCKS):
            pixels[:16, block * 16 : (block + 1) * 16] = hu - float(ct[index].RescaleIntercept)
        ct[index].PixelData = pixels.tobytes()
    overlays = {}
    with sessions() as session:
        study_id, _ = spool_and_index(session, storage, pa)
        spool_and_index(session, storage, lateral)
        for algorithm in (DEMO, CLEARED):
            overlay = build_overlay(_heat(pa), algorithm)
            _store_overlay(session, storage, study_id, overlay, algorithm.name)
            overlays[algorithm.name] = str(overlay.SOPInstanceUID)
        for ds in ct:
            ct_id, _ = spool_and_index(session, storage, ds)
        for index in CT_AI_SLICES:
            finding = Finding(NODULE, 0.8, 0.5, False, box=(40.0, 50.0, 60.0, 70.0))
            overlay = build_overlay(
                ImageFindings(ct[index], [finding]), CT_DEMO, window=(-600.0, 1500.0)
            )
            _store_overlay(session, storage, ct_id, overlay, CT_DEMO.name)
            overlays[f"ct{index}"] = str(overlay.SOPInstanceUID)
    return Stored(
        str(pa.StudyInstanceUID),
        str(pa.SOPInstanceUID),
        str(lateral.SOPInstanceUID),
        str(ct[0].StudyInstanceUID),
        [str(ds.SOPInstanceUID) for ds in ct],
        storage,
        overlays,
    )


@dataclass
class Site:
    url: str
    tokens: dict[str, str]
    stored: Stored

    def client(self, user: str | None = "dr_house") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
def site(sessions, tmp_path: Path) -> Iterator[Site]:
    tokens = add_users(sessions)
    stored = _store_studies(sessions, tmp_path / "storage")
    with serve(create_app(sessions)) as url:
        yield Site(url, tokens, stored)


def _png(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["cache-control"] == "no-store"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"
    image.load()
    return np.asarray(image)


def _block_grey(grey: np.ndarray, index: int, block: int) -> float:
    """The mean of a block's inner half in the preview (its edges are blended by the resize)."""
    quarter = block // 4
    inner = grey[quarter : block - quarter, index * block + quarter : (index + 1) * block - quarter]
    return float(inner.mean())


def test_the_study_lists_its_radiographs_and_one_slice_per_ct_stack(site: Site) -> None:
    stored = site.stored
    with site.client() as client:
        cxr = client.get(f"/api/studies/{stored.cxr_study}/previews")
        ct = client.get(f"/api/studies/{stored.ct_study}/previews").json()
    assert cxr.status_code == 200 and cxr.headers["cache-control"] == "no-store"
    images = {image["sop_instance_uid"]: image for image in cxr.json()["images"]}
    assert set(images) == {stored.pa, stored.lateral}
    assert images[stored.lateral]["ai_views"] == []
    # Each radiograph is its series' only image, and the caption says so in those words.
    assert images[stored.pa]["chosen"] == "the only image of its series"
    views = {view["model"]: view for view in images[stored.pa]["ai_views"]}
    assert set(views) == {DEMO.name, CLEARED.name}
    assert views[DEMO.name]["research_demo"] is True
    assert views[DEMO.name]["label"] == RESEARCH_DEMO_NOTICE
    assert views[CLEARED.name]["research_demo"] is False and views[CLEARED.name]["label"] == ""
    assert views[DEMO.name]["sop_instance_uid"] == stored.overlays[DEMO.name]
    # The CT: one slice, the middle one of those with an AI view.
    [slice_] = ct["images"]
    assert slice_["sop_instance_uid"] == stored.ct_slices[CT_AI_SLICES[1]]
    assert slice_["instance_number"] == CT_AI_SLICES[1] + 1
    assert "middle of the 3 of 12 images with an AI view" in slice_["chosen"]
    assert [view["sop_instance_uid"] for view in slice_["ai_views"]] == [
        stored.overlays[f"ct{CT_AI_SLICES[1]}"]
    ]
    assert "/api/studies/" in slice_["url"] and stored.ct_study in slice_["url"]


def test_a_radiograph_preview_is_downscaled_in_the_dicoms_window(site: Site) -> None:
    stored = site.stored
    with site.client() as client:
        listed = client.get(f"/api/studies/{stored.cxr_study}/previews").json()
        [pa] = [image for image in listed["images"] if image["sop_instance_uid"] == stored.pa]
        grey = _png(client.get(pa["url"]))
        small = _png(client.get(pa["url"], params={"max_side": 256}))
    assert grey.shape == (512, 400) and grey.dtype == np.uint8  # 1024 x 800, aspect kept
    assert small.shape == (256, 200)
    for index, value in enumerate(WINDOW_VALUES):
        assert _block_grey(grey, index, BLOCK // 2) == pytest.approx(
            _expected_grey(value), abs=2
        ), value
    # The anatomy shows: neither blank nor saturated.
    body = grey[BLOCK:, :]
    assert 20 < body.mean() < 235 and body.std() > 10


def test_a_monochrome1_radiograph_comes_out_inverted(site: Site) -> None:
    stored = site.stored
    with site.client() as client:
        url = f"/api/studies/{stored.cxr_study}/images/{stored.lateral}/preview.png"
        grey = _png(client.get(url))
    assert grey.shape == (512, 400)
    for index, value in enumerate(WINDOW_VALUES):
        expected = 255.0 - _expected_grey(value)
        assert _block_grey(grey, index, BLOCK // 2) == pytest.approx(expected, abs=2), value


def test_a_ct_slice_preview_applies_the_rescale_and_its_window(site: Site) -> None:
    stored = site.stored
    middle = stored.ct_slices[CT_AI_SLICES[1]]
    with site.client() as client:
        grey = _png(client.get(f"/api/studies/{stored.ct_study}/images/{middle}/preview.png"))
    assert grey.shape == (128, 128)  # smaller than the preview: not enlarged
    for index, hu in enumerate(CT_HU_BLOCKS):
        expected = 255.0 * (hu - (-600.0 - 750.0)) / 1500.0
        assert _block_grey(grey, index, 16) == pytest.approx(expected, abs=2), hu


def test_the_ai_view_is_the_nodes_overlay_with_its_heat_map(site: Site) -> None:
    stored = site.stored
    with site.client() as client:
        listed = client.get(f"/api/studies/{stored.cxr_study}/previews").json()
        [pa] = [image for image in listed["images"] if image["sop_instance_uid"] == stored.pa]
        [view] = [view for view in pa["ai_views"] if view["model"] == DEMO.name]
        rgb = _png(client.get(view["url"]))
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and max(rgb.shape[:2]) == 512
    # The overlay is the stored one (header band above the image), downscaled.
    stored_overlay = pydicom.dcmread(
        stored.storage / "results" / f"{view['sop_instance_uid']}.dcm", stop_before_pixels=True
    )
    rows, columns = int(stored_overlay.Rows), int(stored_overlay.Columns)
    assert rgb.shape[:2] == (512, round(columns * 512 / rows))
    # The heat map: strongly coloured pixels (red well apart from blue) where the grey has none.
    colour = np.abs(rgb[..., 0].astype(int) - rgb[..., 2].astype(int))
    assert (colour > 60).sum() > 500


@pytest.mark.parametrize("spacing", [[0.2, 0.1], [0.1, 0.2]], ids=["tall", "wide"])
def test_the_ai_view_of_non_square_pixels_has_the_aspect_of_the_image(
    site: Site, sessions, spacing: list[float]
) -> None:
    """Pixels 0.2 x 0.1 mm: the image's preview is corrected to their aspect, and so is the
    overlay (written in square pixels), so that the study page's AI view toggles between two
    pictures of one shape. The overlay's image was written 320 x 256 as stored and shown at
    half (tall pixels) or twice (wide pixels) the height of the image's preview."""
    source, _ = make_cxr(45, size=320, columns=256)
    del source.ImagerPixelSpacing
    source.PixelSpacing = spacing
    with sessions() as session:
        study_id, _ = spool_and_index(session, site.stored.storage, source)
        finding = Finding(PNEUMOTHORAX, 0.9, 0.5, True, peak=(128.0, 160.0))
        overlay = build_overlay(ImageFindings(source, [finding]), DEMO)
        _store_overlay(session, site.stored.storage, study_id, overlay, DEMO.name)
    with site.client() as client:
        listed = client.get(f"/api/studies/{source.StudyInstanceUID}/previews").json()
        [image] = listed["images"]
        [view] = image["ai_views"]
        assert view["label"] == RESEARCH_DEMO_NOTICE
        grey = _png(client.get(image["url"]))
        rgb = _png(client.get(view["url"]))
    # The image: 64 x 25.6 mm (tall) or 32 x 51.2 mm (wide), as high as wide as in millimetres.
    height, width = 320 * spacing[0], 256 * spacing[1]
    assert max(grey.shape) <= 512
    assert abs(grey.shape[0] / grey.shape[1] - height / width) < 0.01
    # The overlay: its header band above the image, the image in square pixels, shown as is.
    rows, columns = int(overlay.Rows), int(overlay.Columns)
    body = round(columns * height / width)
    header = rows - body
    assert 0 < header < body // 2
    assert max(rgb.shape[:2]) <= 512
    assert abs(rgb.shape[0] / rgb.shape[1] - rows / columns) < 0.01
    shown_body = rgb.shape[0] * body / rows  # the image's rows in the overlay's preview
    assert abs(rgb.shape[1] / shown_body - grey.shape[1] / grey.shape[0]) < 0.02


def test_previews_need_a_log_in(site: Site) -> None:
    stored = site.stored
    paths = (
        f"/api/studies/{stored.cxr_study}/previews",
        f"/api/studies/{stored.cxr_study}/images/{stored.pa}/preview.png",
        f"/api/studies/{stored.cxr_study}/overlays/{stored.overlays[DEMO.name]}/preview.png",
    )
    with site.client(None) as anonymous:
        for path in paths:
            response = anonymous.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.headers["content-type"].startswith("application/json")
            forged = anonymous.get(path, headers={"Authorization": "Bearer dn_forged"})
            assert forged.status_code == 401, path
            # A session cookie that is not (or no longer) a session: not logged in either.
            stale = anonymous.get(path, headers={"Cookie": "dicomnode_session=stale"})
            assert stale.status_code == 401, path


def test_unknown_studies_and_images_are_404(site: Site) -> None:
    stored = site.stored
    demo_overlay = stored.overlays[DEMO.name]
    with site.client() as client:
        missing = [
            "/api/studies/1.2.3.999/previews",
            f"/api/studies/1.2.3.999/images/{stored.pa}/preview.png",
            f"/api/studies/{stored.cxr_study}/images/1.2.3.999/preview.png",
            # An image of another study, and an overlay asked for as an image and back.
            f"/api/studies/{stored.cxr_study}/images/{stored.ct_slices[0]}/preview.png",
            f"/api/studies/{stored.cxr_study}/images/{demo_overlay}/preview.png",
            f"/api/studies/{stored.cxr_study}/overlays/{stored.pa}/preview.png",
            f"/api/studies/{stored.ct_study}/overlays/{demo_overlay}/preview.png",
        ]
        for path in missing:
            response = client.get(path)
            assert response.status_code == 404, path
            assert response.headers["cache-control"] == "no-store", path
            assert response.json()["detail"].startswith(("no study", "no image", "no overlay"))
        # While the same study's image and overlay are there.
        base = f"/api/studies/{stored.cxr_study}"
        assert client.get(f"{base}/images/{stored.pa}/preview.png").status_code == 200
        assert client.get(f"{base}/overlays/{demo_overlay}/preview.png").status_code == 200


def test_a_large_jpeg2000_radiograph_is_decoded_at_a_lower_resolution_alike(tmp_path) -> None:
    """A 2500 x 2048 JPEG 2000 image decoded at its wavelet level near 512 px shows as the
    whole decoded image does, within a few grey levels."""
    from dicomnode.web.preview_image import _reduced_jpeg2000, source_png

    ds, _ = make_cxr(44, size=2500, columns=2048)
    whole, reduced = tmp_path / "whole.dcm", tmp_path / "j2k.dcm"
    ds.save_as(whole, enforce_file_format=True)
    ds.compress(pydicom.uid.JPEG2000Lossless, ds.pixel_array)
    ds.save_as(reduced, enforce_file_format=True)
    # Decoded at two levels down (625 x 512), not whole.
    lower = _reduced_jpeg2000(pydicom.dcmread(reduced), 512)
    assert lower is not None and (lower.Rows, lower.Columns) == (625, 512)
    assert lower.pixel_array.shape == (625, 512)
    first = np.asarray(Image.open(io.BytesIO(source_png(whole)))).astype(int)
    second = np.asarray(Image.open(io.BytesIO(source_png(reduced)))).astype(int)
    assert first.shape == second.shape == (512, 419)
    difference = np.abs(first - second)
    assert difference.mean() < 4 and np.percentile(difference, 99) < 16


@pytest.fixture
def browser_site(tmp_path: Path) -> Iterator[tuple[str, Stored, object]]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    url = f"sqlite:///{tmp_path / 'dicomnode.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    add_users(sessions)
    stored = _store_studies(sessions, tmp_path / "storage")
    with serve(create_app(sessions)) as base:
        yield base, stored, sessions
    engine.dispose()


def test_the_study_page_shows_the_image_and_toggles_to_the_ai_view(browser_site) -> None:
    base, stored, sessions = browser_site
    with chromium_page() as page:
        errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and errors.append(message.text))
        log_in(page, base)
        page.goto(f"{base}/worklist/study/{stored.cxr_study}")
        figure = page.locator(f'figure.preview[data-sop-uid="{stored.pa}"]')
        image = figure.locator("img")
        loaded = "img => img.complete && img.naturalWidth > 0"
        image.wait_for()
        # Functions, not expressions: the page's CSP forbids the eval an expression needs.
        shown = (
            "([uid, part]) => { const img = document.querySelector("
            '`figure.preview[data-sop-uid="${uid}"] img`);'
            " return img.src.includes(part) && img.complete && img.naturalWidth > 0; }"
        )
        page.wait_for_function(shown, arg=[stored.pa, "/images/"])
        assert image.evaluate(loaded)
        assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [400, 512]
        label = figure.locator(".preview-ai-label")
        assert not label.is_visible()
        figure.locator(f'button:has-text("AI: {DEMO.name}")').click()
        page.wait_for_function(shown, arg=[stored.pa, "/overlays/"])
        assert figure.get_attribute("data-view") == "ai"
        assert image.evaluate("img => img.naturalHeight") == 512
        assert label.is_visible() and RESEARCH_DEMO_NOTICE in label.inner_text()
        figure.locator('button:has-text("Image")').click()
        page.wait_for_function(shown, arg=[stored.pa, "/images/"])
        assert figure.get_attribute("data-view") == "image"
        assert not label.is_visible()
        # The MONOCHROME1 lateral has no AI view, so no buttons.
        lateral = page.locator(f'figure.preview[data-sop-uid="{stored.lateral}"]')
        assert lateral.locator("button").count() == 0
        page.wait_for_function(shown, arg=[stored.lateral, "/images/"])
        assert errors == []
    # The page's list and PNGs (two images, an AI view) are one audited view of the images.
    with sessions() as session:
        seen = session.scalars(
            select(AuditEntry.action).where(
                AuditEntry.actor == "dr_house", AuditEntry.study_instance_uid == stored.cxr_study
            )
        ).all()
    assert sorted(seen) == ["view_images", "view_study"]


def _store_unreadable_study(sessions, storage: Path) -> tuple[str, str, str]:
    """A study of two radiographs the preview cannot show: one whose Pixel Data is cut short
    (with the node's overlay of it, made while it was whole), one whose header lacks Rows;
    returns (Study, truncated, no Rows) UIDs."""
    truncated = _radiograph(48, None, "MONOCHROME2")
    no_rows = _radiograph(49, str(truncated.StudyInstanceUID), "MONOCHROME2")
    overlay = build_overlay(_heat(truncated), DEMO)
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 3]
    with sessions() as session:
        study_id, _ = spool_and_index(session, storage, truncated)
        _store_overlay(session, storage, study_id, overlay, DEMO.name)
        _, no_rows_path = spool_and_index(session, storage, no_rows)
    headless = pydicom.dcmread(no_rows_path)
    del headless.Rows
    headless.save_as(no_rows_path)
    return (
        str(truncated.StudyInstanceUID),
        str(truncated.SOPInstanceUID),
        str(no_rows.SOPInstanceUID),
    )


def test_the_study_page_says_why_an_image_cannot_be_shown(browser_site, tmp_path: Path) -> None:
    """An image the server answers 422 for shows the reason in its place (no broken-image
    icon); its AI view, which can be shown, is still there to switch to, and back."""
    base, stored, sessions = browser_site
    study, truncated, no_rows = _store_unreadable_study(sessions, stored.storage)
    visible_reason = (
        "([uid, part]) => { const fig = document.querySelector("
        '`figure.preview[data-sop-uid="${uid}"]`);'
        " const box = fig && fig.querySelector('.preview-failure');"
        " return !!box && fig.dataset.state === 'failed' && box.checkVisibility()"
        " && box.textContent.includes(part); }"
    )
    shown = (
        "([uid, part]) => { const img = document.querySelector("
        '`figure.preview[data-sop-uid="${uid}"] img`);'
        " return img.src.includes(part) && img.complete && img.naturalWidth > 0"
        " && img.checkVisibility(); }"
    )
    with chromium_page() as page:
        log_in(page, base)
        page.goto(f"{base}/worklist/study/{study}")
        cut = page.locator(f'figure.preview[data-sop-uid="{truncated}"]')
        page.wait_for_function(visible_reason, arg=[truncated, "cannot decode the pixel data"])
        screenshot(page, "study-unreadable.png")
        failure = cut.locator(".preview-failure")
        assert failure.locator(".preview-failure-title").inner_text() == (
            "This image cannot be shown"
        )
        reason = failure.locator(".preview-failure-reason").inner_text()
        # The server's reason, without its preamble or any path on the server.
        assert "less than expected" in reason, reason
        assert "cannot be shown as an image" not in reason and str(tmp_path) not in reason
        assert "/" not in reason, reason
        # No broken-image icon: the <img> is not rendered at all.
        assert not cut.locator("img").is_visible()
        assert "the only image of its series" in cut.locator("figcaption").inner_text()
        # The AI view of it (made while it could be read) can still be shown, and left.
        label = cut.locator(".preview-ai-label")
        image_button = cut.locator('button[data-view="image"]')
        assert "failed" in image_button.get_attribute("class")
        assert "less than expected" in image_button.get_attribute("title")
        cut.locator(f'button:has-text("AI: {DEMO.name}")').click()
        page.wait_for_function(shown, arg=[truncated, "/overlays/"])
        assert not failure.is_visible()
        assert label.is_visible() and RESEARCH_DEMO_NOTICE in label.inner_text()
        image_button.click()
        page.wait_for_function(visible_reason, arg=[truncated, "less than expected"])
        assert not cut.locator("img").is_visible() and not label.is_visible()
        # The image whose header lacks Rows: its reason, and no view buttons (no AI view).
        headless = page.locator(f'figure.preview[data-sop-uid="{no_rows}"]')
        page.wait_for_function(visible_reason, arg=[no_rows, "Rows"])
        assert headless.locator("button").count() == 0
        assert headless.locator(".preview-failure-reason").inner_text() == (
            "its header lacks Rows (0028,0010), needed to present it"
        )
        assert not headless.locator("img").is_visible()
        assert "/" not in headless.locator(".preview-failure-reason").inner_text()
        # The failure box stays inside the figure (a long reason wraps, or scrolls within).
        inside = headless.evaluate(
            "fig => { const f = fig.getBoundingClientRect(),"
            " b = fig.querySelector('.preview-failure').getBoundingClientRect();"
            " return b.left >= f.left && b.right <= f.right; }"
        )
        assert inside


def _audit(site: Site, action: str) -> list[tuple[str, str, str]]:
    with site.client("boss") as admin:
        entries = admin.get("/api/audit", params={"action": action, "limit": 1000})
    assert entries.status_code == 200, entries.text
    return sorted((e["actor"], e["study_instance_uid"], e["detail"]) for e in entries.json())


def test_seeing_a_studys_images_is_audited_once_per_user_and_study(site: Site) -> None:
    stored = site.stored
    base = f"/api/studies/{stored.cxr_study}"
    with site.client() as house:
        for _ in range(2):  # the page reloaded: its list and PNGs again
            listed = house.get(f"{base}/previews").json()
            for image in listed["images"]:
                _png(house.get(image["url"]))
                for view in image["ai_views"]:
                    _png(house.get(view["url"]))
        _png(house.get(f"{base}/images/{stored.pa}/preview.png", params={"max_side": 128}))
        assert house.get(f"{base}/images/1.2.3.999/preview.png").status_code == 404
        assert house.get("/api/studies/1.2.3.999/previews").status_code == 404
    with site.client("dr_grey") as grey:
        # A PNG fetched by its URL alone, with no list: seen all the same.
        _png(grey.get(f"{base}/overlays/{stored.overlays[DEMO.name]}/preview.png"))
        ct_slice = stored.ct_slices[CT_AI_SLICES[1]]
        _png(grey.get(f"/api/studies/{stored.ct_study}/images/{ct_slice}/preview.png"))
        _png(grey.get(f"/api/studies/{stored.ct_study}/images/{ct_slice}/preview.png"))
    # One row per user and study (the throttle's 5 minutes), none for what was not found.
    assert _audit(site, "view_images") == [
        ("dr_grey", stored.ct_study, "image previews"),
        ("dr_grey", stored.cxr_study, "image previews"),
        ("dr_house", stored.cxr_study, "image previews"),
    ]
    with site.client() as house:  # not in the study's change history
        history = house.get(f"/api/studies/{stored.cxr_study}").json()["history"]
    assert [entry["action"] for entry in history] == []


def test_a_preview_that_cannot_be_shown_says_why_without_a_server_path(
    site: Site, sessions, tmp_path: Path
) -> None:
    storage = site.stored.storage
    # An image without its Pixel Data, and one whose file is no longer DICOM at all.
    unfit = _radiograph(44, None, "MONOCHROME2")
    del unfit.PixelData
    not_dicom = _radiograph(45, str(unfit.StudyInstanceUID), "MONOCHROME2")
    # One whose header lacks what presenting it needs.
    no_rows = _radiograph(47, str(unfit.StudyInstanceUID), "MONOCHROME2")
    with sessions() as session:
        study_id, _ = spool_and_index(session, storage, unfit)
        _, not_dicom_path = spool_and_index(session, storage, not_dicom)
        # A grey image registered as an overlay (the node's are RGB).
        grey_overlay = _radiograph(46, None, "MONOCHROME2")
        _store_overlay(session, storage, study_id, grey_overlay, DEMO.name)
        _, no_rows_path = spool_and_index(session, storage, no_rows)
    not_dicom_path.write_bytes(b"not a DICOM file" * 100)
    headless = pydicom.dcmread(no_rows_path)
    del headless.Rows
    headless.save_as(no_rows_path)
    base = f"/api/studies/{unfit.StudyInstanceUID}"
    cases = {
        f"{base}/images/{unfit.SOPInstanceUID}/preview.png": "no Pixel Data",
        f"{base}/images/{not_dicom.SOPInstanceUID}/preview.png": "DICM",
        f"{base}/overlays/{grey_overlay.SOPInstanceUID}/preview.png": "not an RGB overlay",
        f"{base}/images/{no_rows.SOPInstanceUID}/preview.png": "Rows",
    }
    with site.client() as client:
        for url, why in cases.items():
            response = client.get(url)
            assert response.status_code == 422, (url, response.text)
            assert response.headers["cache-control"] == "no-store"
            detail = response.json()["detail"]
            assert "cannot be shown as an image" in detail and why in detail, detail
            assert str(tmp_path) not in response.text and "/" not in detail, detail


def test_a_preview_size_is_rounded_up_to_one_of_a_few(site: Site, monkeypatch) -> None:
    from dicomnode.web import preview

    renders: list[int] = []

    def counted(path, max_side):
        renders.append(max_side)
        return source_png(path, max_side)

    monkeypatch.setattr(preview, "source_png", counted)
    url = f"/api/studies/{site.stored.cxr_study}/images/{site.stored.lateral}/preview.png"
    with site.client() as client:
        shapes = [_png(client.get(url, params={"max_side": side})).shape for side in (300, 400)]
        shapes.append(_png(client.get(url)).shape)  # 512, the page's
        shapes.append(_png(client.get(url, params={"max_side": 65})).shape)
    assert shapes == [(512, 400)] * 3 + [(128, 100)]
    assert renders == [512, 128]
    assert preview.preview_side(64) == 64 and preview.preview_side(1024) == 1024
    assert preview.preview_side(513) == 1024


def test_concurrent_requests_for_one_preview_render_it_once(site: Site, monkeypatch) -> None:
    from dicomnode.web import preview

    renders: list[int] = []
    first_began, second_began = threading.Event(), threading.Event()

    def held(path, max_side):
        renders.append(max_side)
        if len(renders) == 1:
            first_began.set()
            # Held until a second render begins (as it did before the PNGs were made once)
            # or the second request has had ample time to get to it.
            second_began.wait(timeout=3)
        else:
            second_began.set()
        return source_png(path, max_side)

    monkeypatch.setattr(preview, "source_png", held)
    url = f"/api/studies/{site.stored.cxr_study}/images/{site.stored.pa}/preview.png"
    answers: dict[str, bytes] = {}

    def fetch(name: str) -> None:
        with site.client() as client:
            response = client.get(url)
            assert response.status_code == 200, response.text
            answers[name] = response.content

    first = threading.Thread(target=fetch, args=("first",))
    first.start()
    assert first_began.wait(timeout=30)
    second = threading.Thread(target=fetch, args=("second",))
    second.start()
    first.join(timeout=60)
    second.join(timeout=60)
    assert set(answers) == {"first", "second"}
    assert answers["first"] == answers["second"]
    assert renders == [512]


def test_overlay_headers_are_read_again_only_when_their_file_changes(
    site: Site, monkeypatch
) -> None:
    from dicomnode.web import preview

    stored = site.stored
    reads: list[str] = []
    dcmread = pydicom.dcmread

    def counted(path, *args, **kwargs):
        reads.append(Path(path).name)
        return dcmread(path, *args, **kwargs)

    monkeypatch.setattr(preview.pydicom, "dcmread", counted)
    previews = f"/api/studies/{stored.cxr_study}/previews"

    def ai_views() -> dict[str, list[str]]:
        with site.client() as client:
            listed = client.get(previews).json()["images"]
        return {i["sop_instance_uid"]: [v["model"] for v in i["ai_views"]] for i in listed}

    assert ai_views() == {stored.pa: [CLEARED.name, DEMO.name], stored.lateral: []}
    assert len(reads) == 2  # the two overlays' headers
    assert ai_views() == {stored.pa: [CLEARED.name, DEMO.name], stored.lateral: []}
    assert len(reads) == 2  # kept: not read again
    # The demo overlay's file replaced: now of the lateral (the row is the same).
    path = stored.storage / "results" / f"{stored.overlays[DEMO.name]}.dcm"
    overlay = dcmread(path)
    overlay.SourceImageSequence[0].ReferencedSOPInstanceUID = stored.lateral
    overlay.save_as(path, enforce_file_format=True)
    later = path.stat().st_mtime_ns + 2_000_000_000
    os.utime(path, ns=(later, later))
    assert ai_views() == {stored.pa: [CLEARED.name], stored.lateral: [DEMO.name]}
    assert reads[2:] == [path.name]


def test_video_is_not_an_image_to_preview() -> None:
    from dicomnode.imageclasses import image_class

    for video in ("1.2.840.10008.5.1.4.1.1.77.1.1.1", "1.2.840.10008.5.1.4.1.1.77.1.4.1"):
        assert not image_class(video), video  # Video Endoscopic / Photographic Image Storage
    assert not image_class("1.2.840.10008.5.1.4.1.1.77.1.2.1")  # Video Microscopic
    # Their still image neighbours are images: VL Endoscopic, Ophthalmic Photography 8 Bit.
    assert image_class("1.2.840.10008.5.1.4.1.1.77.1.1")
    assert image_class("1.2.840.10008.5.1.4.1.1.77.1.5.1")
    assert image_class("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray
