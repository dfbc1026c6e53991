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
    onnx: str = Field(default="", description="ONNX file, relative to the card ('' for ensembles)")
    description: str = ""
    # False for a model that only runs as a member of an ensemble card.
    standalone: bool = True
    # "view": a router whose top label's fact_value replaces the image's view (ViewPosition)
    # for the selection rules of the other models; "" for an ordinary model.
    sets: Literal["", "view"] = ""
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
    # Fixed window (centre, width) in modality units (e.g. CT lung window -600, 1500); when set
    # it replaces the image's own VOI LUT / window and the percentiles.
    window: tuple[float, float] | None = None
    # 2.5D input: this many adjacent slices of a series (odd; the centre slice is the one
    # analysed) stacked as the channels, in slice-position order. 1 = plain 2D.
    slices: int = Field(default=1, ge=1)

    @field_validator("slices")
    @classmethod
    def _odd_slices(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("slices must be odd (the analysed slice sits in the middle)")
        return value


class OutputSpec(_Strict):
    """One ONNX output. Shapes per kind (N = batch, L = labels by index):

    - probabilities: (N, L) in 0..1.  logits: (N, L), sigmoid applied.
    - heatmap: (N, L, h, w) class-activation maps over the model input, any scale.
    - mask: (N, L, h, w) per-label (segment) probabilities 0..1 over the model input.
    - boxes: (N, K, 6) rows (x0, y0, x1, y1, score, label_index) in model-input pixels
      (x = column, y = row, half-open); rows with score < min_score are ignored.
    - landmarks: (N, L, 3) rows (x, y, score) in model-input pixels, one per label.
    - image: (N, 1, H, W) an image over the model input, in the input's normalised intensity
      space (the card's normalisation is inverted to get 0..1 presentation values).
    """

    name: str
    kind: Literal["probabilities", "logits", "heatmap", "mask", "boxes", "landmarks", "image"]
    min_score: float = Field(default=0.05, ge=0.0, le=1.0)


class Label(_Strict):
    index: int = Field(ge=0)
    code_value: str
    code_scheme: str = Field(description="SCT (SNOMED CT) or RADLEX")
    code_meaning: str
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    critical: bool = False
    # For a router card (model.sets = "view"): the value this label stands for, e.g. "PA".
    fact_value: str = ""
    # Ground-truth key of this label in the synthetic data sets of ``dicomnode synth`` (used by
    # ``dicomnode models eval``): a finding ("pneumothorax", "nodule"), "abnormal" (any
    # finding), "view:PA", a mask ("lung"), a landmark ("tube_tip") or an image ("soft_tissue").
    truth: str = ""

    @property
    def concept(self) -> CodedConcept:
        return CodedConcept(self.code_value, self.code_scheme, self.code_meaning)


Orientation = Literal["AXIAL", "CORONAL", "SAGITTAL", "OBLIQUE"]


class SelectionRules(_Strict):
    """Which images a model runs on (``[select]``; docs/model-cards.md). An image must pass
    every rule. Empty allow-lists (modalities, body_parts, views, sop_classes, orientations) mean
    "any"; the exclusions and max_frames have safe defaults that a card may widen. The node's
    own result objects are never selected, whatever the rules (pipeline/select.py)."""

    modalities: list[str] = []
    body_parts: list[str] = []
    views: list[str] = []
    sop_classes: list[str] = []
    # An image with any of these values anywhere in its Image Type is refused (e.g. DERIVED,
    # LOCALIZER). A scout is no slice and no radiograph of the patient, whatever the model.
    # An image DERIVED only by lossy compression on the way counts as ORIGINAL here
    # (pipeline/select.py: lossy_compression_only).
    excluded_image_types: list[str] = ["LOCALIZER"]
    # Presentation Intent Type values refused; images of a For Processing SOP class count as
    # FOR PROCESSING. Raw detector data is not what a radiologist (or a model trained on
    # displayed images) sees.
    excluded_presentation_intents: list[str] = ["FOR PROCESSING"]
    # Image planes admitted, from Image Orientation Patient (the patient axis nearest the slice
    # normal, OBLIQUE when it is further than orientation_tolerance_deg from every axis).
    # Images without Image Orientation Patient (radiographs) have no plane: a non-empty list
    # refuses them.
    orientations: list[Orientation] = []
    orientation_tolerance_deg: float = Field(default=20.0, ge=0.0, le=45.0)
    # Samples per Pixel 1 and MONOCHROME1/2 only. Classifiers read colour images as grey; an
    # image-to-image model must not, since its output is written as an image of the source's
    # class.
    monochrome_only: bool = False
    # Images with more frames are refused: the pipeline analyses the first frame only and the
    # overlay needs a single-frame source, so raise it only for a model whose result on the
    # first frame stands for the whole image.
    max_frames: int = Field(default=1, ge=1)

    @field_validator("orientations", mode="before")
    @classmethod
    def _upper_orientations(cls, value: object) -> object:
        if isinstance(value, list):
            return [item.upper() if isinstance(item, str) else item for item in value]
        return value


ResultKind = Literal["sr", "overlay", "seg", "gsps", "derived", "kos"]

# What each task produces unless the card's [results] produce says otherwise.
DEFAULT_RESULTS: dict[str, tuple[str, ...]] = {
    "classification": ("sr", "overlay", "kos"),
    "multi-label": ("sr", "overlay", "kos"),
    "ensemble": ("sr", "overlay", "kos"),
    "segmentation": ("seg",),
    "detection": ("sr", "overlay", "gsps", "kos"),
    "landmark": ("sr", "overlay", "gsps", "kos"),
    "image-to-image": ("derived",),
}


class ResultsSpec(_Strict):
    """Which DICOM result objects the model's runs produce (empty = the task's default)."""

    produce: list[ResultKind] = []
    # SEG: FRACTIONAL (probabilities, 8-bit) instead of BINARY (thresholded) segments.
    fractional: bool = False


class EnsembleSpec(_Strict):
    """An ensemble card runs no ONNX file of its own: it combines its members' outputs."""

    members: list[str] = Field(min_length=2, description="model names of the member cards")
    combine: Literal["mean"] = "mean"


class ModelCard(_Strict):
    model: ModelInfo
    input: InputSpec
    outputs: list[OutputSpec]
    labels: list[Label] = []
    select: SelectionRules = SelectionRules()
    results: ResultsSpec = ResultsSpec()
    ensemble: EnsembleSpec | None = None
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

    def onnx_identity(self) -> str:
        """What identifies the ONNX file's content now, without reading it: its size and
        modification time ("" without a file, "missing" where it cannot be found). A file
        replaced under the same card changes it."""
        if not self.model.onnx:
            return ""
        try:
            stat = self.onnx_path.stat()
        except OSError:
            return "missing"
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    @property
    def algorithm(self) -> Algorithm:
        return Algorithm(
            self.model.name, self.model.version, self.model.manufacturer, self.model.research_demo
        )

    def output(self, kind: str) -> OutputSpec | None:
        return next((o for o in self.outputs if o.kind == kind), None)

    @property
    def produces(self) -> tuple[str, ...]:
        """The result kinds this model's runs write."""
        return tuple(self.results.produce) or DEFAULT_RESULTS[self.model.task]


def load_card(path: Path | str) -> ModelCard:
    """Read and validate one model card."""
    card = load_toml(path, ModelCard)
    card.card_path = Path(path).resolve()
    names = [label.index for label in card.labels]
    if len(set(names)) != len(names):
        raise ConfigError(path, "label indexes must be unique", key="labels")
    if card.model.task == "ensemble" and card.ensemble is None:
        raise ConfigError(path, "an ensemble card needs an [ensemble] members list", key="ensemble")
    if card.model.task != "ensemble" and not card.model.onnx:
        raise ConfigError(path, "the card names no ONNX file", key="model.onnx")
    if card.model.sets and not all(label.fact_value for label in card.labels):
        raise ConfigError(path, "a router card needs fact_value on every label", key="labels")
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
