"""Model cards: what an ONNX file expects, what it outputs, and when to run it.

A card is a TOML file beside its ONNX file (``models/*.toml`` or ``conf/models/*.toml``).
Adding a model needs no code change: drop both files in one of those folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dicomnode.findings import Algorithm, CodedConcept
from dicomnode.tomlfile import ConfigError, load_toml

Task = Literal[
    "classification",
    "multi-label",
    "segmentation",
    "detection",
    "landmark",
    "image-to-image",
    "ensemble",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelInfo(_Strict):
    name: str
    version: str
    task: Task
    onnx: str = Field(description="ONNX file, relative to the card")
    description: str = ""
    manufacturer: str = "dicomnode"
    research_demo: bool = True
    disclaimer: str = "Research demo, not for clinical use."


class InputSpec(_Strict):
    name: str = "image"
    # Channels, rows, columns of one sample (batch dimension excluded).
    shape: tuple[int, int, int]
    # zscore: (x - mean) / std after scaling the windowed image to 0..1.
    normalisation: Literal["zscore", "unit"] = "zscore"
    mean: float = 0.0
    std: float = 1.0
    # letterbox keeps the aspect ratio and pads; stretch resizes to the shape.
    resize: Literal["letterbox", "stretch"] = "letterbox"
    # Percentiles used to window images without a VOI LUT or window.
    window_percentiles: tuple[float, float] = (0.5, 99.5)


class OutputSpec(_Strict):
    name: str
    kind: Literal["probabilities", "logits", "heatmap", "mask", "boxes", "landmarks", "image"]


class Label(_Strict):
    index: int = Field(ge=0)
    code_value: str
    code_scheme: str = Field(description="SCT (SNOMED CT) or RADLEX")
    code_meaning: str
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    critical: bool = False

    @property
    def concept(self) -> CodedConcept:
        return CodedConcept(self.code_value, self.code_scheme, self.code_meaning)


class SelectionRules(_Strict):
    """Empty lists mean "any"."""

    modalities: list[str] = []
    body_parts: list[str] = []
    views: list[str] = []
    sop_classes: list[str] = []


class ModelCard(_Strict):
    model: ModelInfo
    input: InputSpec
    outputs: list[OutputSpec]
    labels: list[Label] = []
    select: SelectionRules = SelectionRules()
    metrics: dict[str, float | int | str] = {}
    training: dict[str, float | int | str] = {}

    # Set by load_card: the card file, so that relative paths resolve.
    card_path: Path | None = Field(default=None, exclude=True)

    @field_validator("outputs")
    @classmethod
    def _outputs_not_empty(cls, value: list[OutputSpec]) -> list[OutputSpec]:
        if not value:
            raise ValueError("a model needs at least one output")
        return value

    @property
    def onnx_path(self) -> Path:
        base = self.card_path.parent if self.card_path else Path.cwd()
        return (base / self.model.onnx).resolve()

    @property
    def algorithm(self) -> Algorithm:
        return Algorithm(
            self.model.name, self.model.version, self.model.manufacturer, self.model.research_demo
        )

    def output(self, kind: str) -> OutputSpec | None:
        return next((o for o in self.outputs if o.kind == kind), None)


def load_card(path: Path | str) -> ModelCard:
    """Read and validate one model card."""
    card = load_toml(path, ModelCard)
    card.card_path = Path(path).resolve()
    names = [label.index for label in card.labels]
    if len(set(names)) != len(names):
        raise ConfigError(path, "label indexes must be unique", key="labels")
    return card


def discover_cards(folders: list[Path]) -> list[ModelCard]:
    """All cards in ``folders`` (sorted by file name); a later folder's card of the same
    model name replaces an earlier one's."""
    by_name: dict[str, ModelCard] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.toml")):
            card = load_card(path)
            by_name[card.model.name] = card
    return list(by_name.values())
