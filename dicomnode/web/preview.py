"""Image previews for the study page: which of a study's images to show, each as a PNG as
presented, and the node's overlay secondary captures of it (the AI view) as PNGs.

Which images: every image of a series of up to ``MAX_SERIES_IMAGES`` images (a radiograph
series: PA and lateral); one of a larger series (a CT or MR stack): the middle one of its
images that have an overlay (for CT detection, the slices with a present finding; the middle
of a nodule's run of slices is its centre), else its middle image, by Instance Number. At most
``MAX_PREVIEWS`` per study. An overlay belongs to the image its Source Image Sequence names.

Same authentication as the study page and API (any logged-in user); every answer is
``Cache-Control: no-store`` (patient images); URLs hold UIDs only. Showing a study's images is
audited as ``view_images``, once per user and study within the audit throttle's interval (the
page fetches a list and a dozen PNGs at each reload: one row says who saw them). Decoding runs
in FastAPI's thread pool (sync endpoints), at most one render per CPU at a time; the last PNGs
are kept in memory while their file is unchanged (the page reloads after each action), in a
few sizes only, and concurrent requests for one PNG render it once.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pydicom
from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.responses import Response
from pydantic import BaseModel, Field
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.db.models import Instance, ResultObject, Series, Study
from dicomnode.db.session import utcnow
from dicomnode.imageclasses import image_class
from dicomnode.pipeline.attributes import value_or_none
from dicomnode.web.auth import Caller
from dicomnode.web.preview_image import MAX_SIDE, overlay_png, source_png
from dicomnode.web.schemas import AUTH_ERRORS, ErrorOut
from dicomnode.worklist import audit

log = logging.getLogger(__name__)

MAX_SERIES_IMAGES = 4
MAX_PREVIEWS = 12
NO_STORE = {"Cache-Control": "no-store"}
# PNGs kept in memory (~100 KB each at 512 px): a study page's previews, reloaded.
PNG_CACHE_SIZE = 64
# The sizes a PNG is rendered in: an asked ``max_side`` is rounded up to the next, so that a
# client asking for any of 961 sizes neither renders each nor fills the cache with them.
PREVIEW_SIDES = (64, 128, 256, 512, 1024)
# Overlay headers kept (their source images and research demo mark, a few hundred bytes):
# a CT study's ~600 overlays, a few studies over.
OVERLAY_CACHE_SIZE = 4096
PreviewSide = Annotated[
    int,
    Query(
        ge=64,
        le=1024,
        description="longest side at most, pixels, rounded up to the next of "
        + ", ".join(map(str, PREVIEW_SIDES)),
    ),
]
_renders = threading.BoundedSemaphore(os.cpu_count() or 1)


class AiViewOut(BaseModel):
    model: str
    version: str
    sop_instance_uid: str = Field(description="the overlay secondary capture")
    url: str = Field(description="the overlay as a PNG")
    research_demo: bool = Field(description="made by a research demo model")
    label: str = Field(description="what to show with it, e.g. the research demo notice")


class PreviewOut(BaseModel):
    series_instance_uid: str
    sop_instance_uid: str
    modality: str
    series_description: str
    instance_number: int | None
    chosen: str = Field(description="why this image, e.g. 'middle of 64 images'")
    url: str = Field(description="the image as presented (its window, LUTs) as a PNG")
    ai_views: list[AiViewOut] = Field(description="the node's overlays of this image")


class PreviewsOut(BaseModel):
    notice: str
    max_side: int = Field(description="the PNGs' longest side at most, in pixels")
    images: list[PreviewOut]


@dataclass(frozen=True)
class _Overlay:
    model: str
    version: str
    sop_instance_uid: str
    research_demo: bool


def preview_side(asked: int) -> int:
    """The size a PNG asked for at ``asked`` pixels is rendered in: the smallest of
    ``PREVIEW_SIDES`` at least as large."""
    return next((side for side in PREVIEW_SIDES if side >= asked), PREVIEW_SIDES[-1])


@functools.lru_cache(maxsize=OVERLAY_CACHE_SIZE)
def _overlay_sources(path: str, stamp: tuple) -> tuple[tuple[str, ...], bool]:
    """The SOP Instance UIDs an overlay shows and whether a research demo made it; kept while
    ``stamp`` (the file's mtime and size) is the same, as the page reloads after each action
    (a CT study has hundreds of overlays, a header read each). A read error is not kept."""
    header = pydicom.dcmread(
        path,
        stop_before_pixels=True,
        specific_tags=["SourceImageSequence", "SeriesDescription", "ImageComments"],
    )
    text = f"{header.get('SeriesDescription', '')} {header.get('ImageComments', '')}"
    sources = (
        str(value_or_none(item, "ReferencedSOPInstanceUID") or "")
        for item in value_or_none(header, "SourceImageSequence") or []
    )
    return tuple(source for source in sources if source), "research demo" in text.lower()


def _file_stamp(path: str) -> tuple[int, int] | None:
    """(mtime, size) of a regular file; None when there is none at ``path``."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(found.st_mode):
        return None
    return found.st_mtime_ns, found.st_size


def _overlays_by_source(session: Session, study_id: int) -> dict[str, list[_Overlay]]:
    """The study's overlay secondary captures per source SOP Instance UID."""
    by_source: dict[str, list[_Overlay]] = defaultdict(list)
    rows = session.execute(
        select(
            ResultObject.path,
            ResultObject.model_name,
            ResultObject.model_version,
            ResultObject.sop_instance_uid,
        )
        .where(ResultObject.study_id == study_id, ResultObject.kind == "overlay")
        .order_by(ResultObject.model_name, ResultObject.id)
    )
    for path, model, version, sop_uid in rows:
        try:
            stamp = _file_stamp(path)
            if stamp is None:
                raise FileNotFoundError("no longer in storage")
            sources, research_demo = _overlay_sources(path, stamp)
        except Exception as error:  # a damaged result file leaves out its AI view, not the page
            log.warning("overlay %s cannot be read for the preview: %s", Path(path).name, error)
            continue
        overlay = _Overlay(model, version, sop_uid, research_demo)
        for source in sources:
            by_source[source].append(overlay)
    return by_source


def _reading_order(row) -> tuple[bool, int, str]:
    """By Instance Number (those without one last), then SOP Instance UID."""
    return (row.instance_number is None, row.instance_number or 0, row.sop_instance_uid)


def _chosen(images: list, overlays: dict[str, list[_Overlay]]) -> list[tuple[object, str]]:
    """The images of one series to preview (sorted by Instance Number), with why."""
    if len(images) <= MAX_SERIES_IMAGES:
        return [(image, "") for image in images]
    with_ai = [image for image in images if image.sop_instance_uid in overlays]
    if with_ai:
        middle = with_ai[(len(with_ai) - 1) // 2]
        return [(middle, f"middle of the {len(with_ai)} of {len(images)} images with an AI view")]
    return [(images[(len(images) - 1) // 2], f"middle of {len(images)} images")]


def study_previews(session: Session, study_instance_uid: str) -> PreviewsOut | None:
    """The images the study page previews, with their AI views; None for an unknown study."""
    study_id = session.scalar(
        select(Study.id).where(Study.study_instance_uid == study_instance_uid)
    )
    if study_id is None:
        return None
    overlays = _overlays_by_source(session, study_id)
    rows = session.execute(
        select(
            Series.id,
            Series.series_instance_uid,
            Series.modality,
            Series.series_description,
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Instance.instance_number,
        )
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
    ).all()
    by_series = defaultdict(list)
    for row in rows:
        if image_class(row.sop_class_uid):
            by_series[row.id].append(row)
    previews: list[PreviewOut] = []
    base = f"/api/studies/{study_instance_uid}"
    for series_id in sorted(by_series):
        images = sorted(by_series[series_id], key=_reading_order)
        for image, chosen in _chosen(images, overlays):
            previews.append(
                PreviewOut(
                    series_instance_uid=image.series_instance_uid,
                    sop_instance_uid=image.sop_instance_uid,
                    modality=image.modality,
                    series_description=image.series_description,
                    instance_number=image.instance_number,
                    chosen=chosen or ("the only image of its series" if len(images) == 1 else ""),
                    url=f"{base}/images/{image.sop_instance_uid}/preview.png",
                    ai_views=[
                        AiViewOut(
                            model=overlay.model,
                            version=overlay.version,
                            sop_instance_uid=overlay.sop_instance_uid,
                            url=f"{base}/overlays/{overlay.sop_instance_uid}/preview.png",
                            research_demo=overlay.research_demo,
                            label=RESEARCH_DEMO_NOTICE if overlay.research_demo else "",
                        )
                        for overlay in overlays.get(image.sop_instance_uid, [])
                    ],
                )
            )
    return PreviewsOut(
        notice=RESEARCH_DEMO_NOTICE, max_side=MAX_SIDE, images=previews[:MAX_PREVIEWS]
    )


def _not_found(what: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, what, headers=NO_STORE)


class PngCache:
    """The last ``size`` PNGs made, least recently used dropped; a PNG asked for while it is
    being made is waited for, not made again (a page's reload asks for it again at once)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._made: OrderedDict[tuple, Future[bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, make: Callable[[], bytes]) -> bytes:
        """The PNG kept for ``key``, else ``make()``'s (an error is not kept)."""
        with self._lock:
            made = self._made.get(key)
            mine = made is None
            if mine:
                made = self._made[key] = Future()
                while len(self._made) > self.size:
                    self._made.popitem(last=False)
            else:
                self._made.move_to_end(key)
        if not mine:
            return made.result()
        try:
            png = make()
        except BaseException as error:
            with self._lock:
                if self._made.get(key) is made:
                    del self._made[key]
            made.set_exception(error)
            raise
        made.set_result(png)
        return png


_pngs = PngCache(PNG_CACHE_SIZE)


def _render(render: Callable[[str, int], bytes], path: str, size: int) -> bytes:
    with _renders:
        return render(path, size)


def _public_reason(error: Exception, path: str) -> str:
    """Why an image cannot be shown, for the HTTP answer (the study page shows it in the
    image's place): without the file's path on the server (decode.describe names it; the log
    keeps it), and a header without an attribute presenting needs in DICOM's words, not
    Python's ("'FileDataset' object has no attribute 'Rows'")."""
    if isinstance(error, AttributeError) and isinstance(error.obj, pydicom.Dataset):
        number = tag_for_keyword(error.name or "")
        if number is not None:
            tag = Tag(number)
            where = f"({tag.group:04X},{tag.element:04X})"
            return f"its header lacks {error.name} {where}, needed to present it"
    return str(error).replace(f"file {path}, ", "").replace(path, "its stored file")


def _png_response(render: Callable[[str, int], bytes], path: str, sop_uid: str, size: int):
    """The PNG of the file at ``path`` (or its 404 or 422): kept, as JPEG-LS or JPEG Lossless
    radiographs decode whole (~0.5 s or more at 2-3k px)."""
    stamp = _file_stamp(path)
    if stamp is None:
        raise _not_found(f"the file of {sop_uid} is no longer in storage")
    side = preview_side(size)
    try:
        png = _pngs.get((render, path, side, stamp), lambda: _render(render, path, side))
    # DecodeError is a ValueError; a header lacking what presenting needs (Rows, a LUT's
    # parts) raises AttributeError, KeyError or TypeError in pydicom or the presentation.
    except (ValueError, OSError, InvalidDicomError, AttributeError, KeyError, TypeError) as error:
        # The reason names files and UIDs, never patient data (decode.describe).
        log.warning("no preview of %s: %s", sop_uid, error)
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"{sop_uid} cannot be shown as an image: {_public_reason(error, path)}",
            headers=NO_STORE,
        ) from None
    return Response(png, media_type="image/png", headers=NO_STORE)


PNG_RESPONSES: dict[int | str, dict] = {
    **AUTH_ERRORS,
    200: {"content": {"image/png": {}}, "description": "the PNG"},
    404: {"model": ErrorOut, "description": "no such study, or not an image of it"},
    422: {"model": ErrorOut, "description": "the image cannot be decoded or presented"},
}


def preview_router(
    sessions: sessionmaker[Session],
    caller_of: Callable[..., Caller],
    views: audit.ViewThrottle,
) -> APIRouter:
    """The /api/studies/{uid}/previews routes (any logged-in user, as the study page)."""
    router = APIRouter(prefix="/api/studies/{study_instance_uid}", tags=["studies"])
    authenticated = Depends(caller_of)

    def audited(session: Session, caller: Caller, study_instance_uid: str) -> None:
        """Record that the caller saw the study's images: once per ``views`` interval, as
        the list and each PNG are separate requests (a dozen per page load)."""
        now = utcnow()
        actor = caller.principal.username
        if views.due(actor, f"images of {study_instance_uid}", now):
            audit.record(
                session,
                actor,
                "view_images",
                now,
                study_instance_uid=study_instance_uid,
                detail="image previews",
            )
            session.commit()

    @router.get(
        "/previews",
        response_model=PreviewsOut,
        responses={**AUTH_ERRORS, 404: {"model": ErrorOut, "description": "no such study"}},
    )
    def previews(
        study_instance_uid: str, response: Response, caller: Caller = authenticated
    ) -> PreviewsOut:
        """The study's images to preview (one per CT/MR stack, every radiograph), each with
        its PNG URL and the node's overlays of it (AI views, research demo labelled)."""
        with sessions() as session:
            found = study_previews(session, study_instance_uid)
            if found is None:
                raise _not_found(f"no study {study_instance_uid}")
            audited(session, caller, study_instance_uid)
        response.headers.update(NO_STORE)
        return found

    @router.get("/images/{sop_instance_uid}/preview.png", responses=PNG_RESPONSES)
    def image_preview(
        study_instance_uid: str,
        sop_instance_uid: str,
        caller: Caller = authenticated,
        max_side: PreviewSide = MAX_SIDE,
    ) -> Response:
        """One of the study's images as presented (its Modality LUT, VOI LUT or window,
        MONOCHROME1 inverted), downscaled to ``max_side``, as a PNG."""
        with sessions() as session:
            path = session.scalar(
                select(Instance.path)
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(
                    Study.study_instance_uid == study_instance_uid,
                    Instance.sop_instance_uid == sop_instance_uid,
                )
            )
            if path is None:
                raise _not_found(f"no image {sop_instance_uid} in study {study_instance_uid}")
            audited(session, caller, study_instance_uid)
        return _png_response(source_png, path, sop_instance_uid, max_side)

    @router.get("/overlays/{sop_instance_uid}/preview.png", responses=PNG_RESPONSES)
    def overlay_preview(
        study_instance_uid: str,
        sop_instance_uid: str,
        caller: Caller = authenticated,
        max_side: PreviewSide = MAX_SIDE,
    ) -> Response:
        """One of the node's overlay secondary captures of the study (the AI view: heat map,
        boxes, findings burned in), downscaled to ``max_side``, as a PNG."""
        with sessions() as session:
            path = session.scalar(
                select(ResultObject.path)
                .join(Study, Study.id == ResultObject.study_id)
                .where(
                    Study.study_instance_uid == study_instance_uid,
                    ResultObject.sop_instance_uid == sop_instance_uid,
                    ResultObject.kind == "overlay",
                )
            )
            if path is None:
                raise _not_found(f"no overlay {sop_instance_uid} in study {study_instance_uid}")
            audited(session, caller, study_instance_uid)
        return _png_response(overlay_png, path, sop_instance_uid, max_side)

    return router
