"""Result objects of images in other character sets: every kind is made, carries the source's
Specific Character Set, reads back with the patient's name unchanged, and passes dciodvfy.

Japanese and Korean as PS3.5 Annexes H and I write them, the default repertoire as an empty
first value (which highdicom refused, failing the study's whole results job); Chinese in
GB18030; Latin-1."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from dciodvfy import dciodvfy_errors

from dicomnode.models.registry import ModelCard, discover_cards
from dicomnode.pipeline.analyse import StageTimes
from dicomnode.pipeline.outputs import result_objects
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.tasks import run_model
from dicomnode.synth.cxr import make_cxr

REPO = Path(__file__).resolve().parent.parent
# Models whose results between them are every kind: SR, overlay, KOS, SEG, GSPS, derived.
MODELS = (
    "cxr-pneumothorax-demo",
    "cxr-lung-seg-demo",
    "cxr-tube-tip-demo",
    "cxr-bone-suppression-demo",
)
CHARACTER_SETS = {
    "japanese": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    "korean": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
    "chinese": ("GB18030", "Wang^XiaoDong=王^小东"),
    "latin-1": ("ISO_IR 100", "Müller^Jürgen"),
}


@pytest.fixture(scope="module")
def cards() -> dict[str, ModelCard]:
    return {card.model.name: card for card in discover_cards([REPO / "models"])}


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(["CPUExecutionProvider"])


def _round_trip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("language", CHARACTER_SETS)
def test_results_carry_the_sources_character_set(cards, runtime, language: str) -> None:
    character_set, name = CHARACTER_SETS[language]
    source, _ = make_cxr(21, findings=("pneumothorax", "tube"), size=256)
    source.SpecificCharacterSet = character_set
    source.PatientName = name
    source = _round_trip(source)  # as received: the name decoded from its encoding
    assert str(source.PatientName) == name

    kinds = set()
    for model in MODELS:
        card = cards[model]
        run = run_model(card, [source], runtime, StageTimes(), cards)
        for kind, result in result_objects(run, card):
            kinds.add(kind)
            read = _round_trip(result)
            assert read.SpecificCharacterSet == source.SpecificCharacterSet, (model, kind)
            assert str(read.PatientName) == name, (model, kind)
            assert dciodvfy_errors(result) == [], (model, kind)
    assert kinds == {"sr", "overlay", "kos", "seg", "gsps", "derived"}
