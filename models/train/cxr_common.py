"""Shared helpers of the CXR demo classifier training scripts (triage, findings, view, TB).

One job each: describe a phantom (``PhantomJob``), turn seed ranges into prepared model inputs
with their ground truth (``prepared_split``, rendered in worker processes and cached on disk),
train a network (``train``), export it to ONNX with a dynamic batch (``export_onnx``), run it
with onnxruntime (``onnx_outputs``), compute metrics (``auc``, ``auc_ci``, ``youden``) and fill
its card's tables (``input_table``, ``training_table``; ``shared.write_card`` writes it).

Every phantom goes through a DICOM write/read round trip and
``dicomnode.pipeline.preprocess.prepare_input``, the code the node runs at inference, so training
and serving preprocessing are identical. Prepared inputs are cached as 'unit' (0..1) canvases;
``normalised`` applies the card's z-score afterwards exactly as ``prepare_input`` does.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import itertools
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
import shared
import torch
from PIL import Image
from torch import nn

import dicomnode.synth.cxr as synth_cxr
from dicomnode.evaluation import metrics as evaluation
from dicomnode.models.registry import InputSpec
from dicomnode.pipeline.preprocess import prepare_input
from dicomnode.synth.cxr_names import FINDINGS, VIEWS

FRONTAL = ("PA", "AP")
# Side of the coarse region grid (over the whole model input) that truth regions are kept at.
REGION_GRID = 32
# Input shapes every split is prepared at (one rendering per phantom serves all scripts).
STANDARD_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 224, 224), (1, 256, 256))
SPLIT_SEEDS = {"train": 0, "validation": 500_000, "heldout": 1_000_000}
CACHE_VERSION = "cxr-common-2"
RESEARCH_DEMO = "Research demo, not for clinical use."


def new_synth_api() -> bool:
    """True when ``make_cxr`` takes findings/view/modality (the extended phantom API)."""
    return "findings" in inspect.signature(synth_cxr.make_cxr).parameters


@dataclass(frozen=True)
class PhantomJob:
    """One phantom to render: seed, findings and acquisition variation."""

    seed: int
    findings: tuple[str, ...]
    view: str
    modality: str
    bits: int
    size: int  # rows
    columns: int
    photometric: str


def random_job(seed: int) -> PhantomJob:
    """The shared phantom mix: views PA 40 % / AP 35 % / lateral 25 %, DX or CR, 8-16 bit,
    MONOCHROME1 30 %, 384-512 rows, columns 0.85-1.15 x rows. A third of studies is normal;
    otherwise each finding is present with probability 0.2 (a tube, not an abnormality, in
    20 % of all studies)."""
    rng = np.random.default_rng([seed, 4010])
    view = str(rng.choice(VIEWS, p=[0.40, 0.35, 0.25]))
    findings = [f for f in FINDINGS if f != "tube" and rng.random() < 0.2]
    if rng.random() < 1 / 3:
        findings = []
    if "tube" in FINDINGS and rng.random() < 0.2:
        findings.append("tube")
    size = int(rng.choice([384, 448, 512]))
    columns = round(size * rng.uniform(0.85, 1.15))
    if not new_synth_api():
        columns = size
        # The original phantom API: PA views with or without a pneumothorax only.
        findings = [f for f in findings if f == "pneumothorax"]
        view = "PA"
    return PhantomJob(
        seed=seed,
        findings=tuple(findings),
        view=view,
        modality=str(rng.choice(["DX", "CR"])),
        bits=int(rng.choice([8, 10, 12, 14, 16], p=[0.1, 0.2, 0.4, 0.2, 0.1])),
        size=size,
        columns=columns,
        photometric="MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2",
    )


def render(job: PhantomJob) -> tuple[pydicom.Dataset, object]:
    """The phantom's dataset after a DICOM write/read round trip, and its truth object."""
    if new_synth_api():
        ds, truth = synth_cxr.make_cxr(
            job.seed,
            findings=job.findings,
            view=job.view,
            modality=job.modality,
            bits=job.bits,
            size=job.size,
            columns=job.columns,
            photometric=job.photometric,
        )
    else:
        ds, truth = synth_cxr.make_cxr(
            job.seed,
            pneumothorax="pneumothorax" in job.findings,
            size=job.size,
            photometric=job.photometric,
        )
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer), truth


def truth_labels(truth: object) -> dict[str, bool]:
    """Finding -> present, from either phantom API."""
    labels = getattr(truth, "labels", None)
    if isinstance(labels, dict):
        return {f: bool(labels.get(f, False)) for f in FINDINGS}
    return {f: f == "pneumothorax" and bool(truth.pneumothorax) for f in FINDINGS}


def truth_view(truth: object, job: PhantomJob) -> str:
    return str(getattr(truth, "view", None) or job.view)


def _box_mask(shape: tuple[int, int], box: Sequence[int]) -> np.ndarray:
    row0, col0, row1, col1 = (int(v) for v in box)
    mask = np.zeros(shape, dtype=bool)
    mask[max(row0, 0) : max(row1, 0), max(col0, 0) : max(col1, 0)] = True
    return mask


def truth_regions(truth: object, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Finding -> boolean source-pixel mask, for the findings whose truth has a region.

    Reads ``masks`` (name -> array) and, for findings without a mask, ``boxes`` ((finding,
    (row0, col0, row1, col1)) pairs, half-open) when the truth has them, else the original
    pneumothorax ``box``.
    """
    regions: dict[str, np.ndarray] = {}
    for name, mask in (getattr(truth, "masks", None) or {}).items():
        if name in FINDINGS and mask is not None and np.asarray(mask).shape == shape:
            regions[name] = np.asarray(mask) > 0.5
    boxed: dict[str, np.ndarray] = {}
    boxes = getattr(truth, "boxes", None) or []
    for name, box in boxes.items() if isinstance(boxes, dict) else boxes:  # (finding, box)
        if name in FINDINGS and name not in regions and box is not None:
            boxed[name] = boxed.get(name, np.zeros(shape, dtype=bool)) | _box_mask(shape, box)
    regions.update(boxed)
    if not regions and getattr(truth, "box", None) is not None:
        regions["pneumothorax"] = _box_mask(shape, truth.box)
    return regions


def _region_grid(mask: np.ndarray, geometry, input_shape: tuple[int, int]) -> np.ndarray:
    """A source mask placed like the image in the model input, as a REGION_GRID^2 'any' grid."""
    rows, cols = geometry.resized_shape
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((cols, rows), Image.NEAREST)
    canvas = np.zeros(input_shape, dtype=bool)
    canvas[
        geometry.pad_rows : geometry.pad_rows + rows, geometry.pad_cols : geometry.pad_cols + cols
    ] = np.asarray(resized) > 127
    h, w = input_shape
    grid = canvas.reshape(REGION_GRID, h // REGION_GRID, REGION_GRID, w // REGION_GRID)
    return grid.any(axis=(1, 3))


def prepare_job(job: PhantomJob) -> dict[str, object]:
    """Worker: render one phantom and prepare it at every standard shape ('unit' canvases)."""
    ds, truth = render(job)
    labels = truth_labels(truth)
    out: dict[str, object] = {
        "labels": np.array([labels[f] for f in FINDINGS], dtype=bool),
        "view": truth_view(truth, job),
    }
    source_regions = truth_regions(truth, (int(ds.Rows), int(ds.Columns)))
    for shape in STANDARD_SHAPES:
        spec = InputSpec(shape=shape, normalisation="unit")
        sample, geometry = prepare_input(ds, spec)
        out[f"image{shape[1]}"] = sample.astype(np.float16)
        regions = np.zeros((len(FINDINGS), REGION_GRID, REGION_GRID), dtype=bool)
        for index, name in enumerate(FINDINGS):
            if name in source_regions:
                regions[index] = _region_grid(source_regions[name], geometry, shape[1:])
        out[f"regions{shape[1]}"] = regions
    return out


@dataclass
class Split:
    """Prepared 'unit' model inputs of one seed range and their ground truth."""

    images: np.ndarray  # N x C x H x W float16, 0..1
    labels: np.ndarray  # N x len(FINDINGS) bool
    views: np.ndarray  # N str
    regions: np.ndarray  # N x len(FINDINGS) x REGION_GRID x REGION_GRID bool (False = no region)
    seeds: np.ndarray  # N int
    has_region: np.ndarray  # N x len(FINDINGS) bool

    def subset(self, keep: np.ndarray) -> Split:
        return Split(
            self.images[keep],
            self.labels[keep],
            self.views[keep],
            self.regions[keep],
            self.seeds[keep],
            self.has_region[keep],
        )

    def frontal(self) -> Split:
        """Only the PA and AP phantoms."""
        return self.subset(np.isin(self.views, FRONTAL))

    def label(self, finding: str) -> np.ndarray:
        return self.labels[:, FINDINGS.index(finding)].astype(np.float32)

    def abnormal(self) -> np.ndarray:
        """1 where any finding but a tube is present."""
        index = [i for i, f in enumerate(FINDINGS) if f != "tube"]
        return self.labels[:, index].any(axis=1).astype(np.float32)


def cache_dir() -> Path:
    """``$DICOMNODE_TRAIN_CACHE`` or ``~/.cache/dicomnode/cxr-train``."""
    default = Path.home() / ".cache" / "dicomnode" / "cxr-train"
    return Path(os.environ.get("DICOMNODE_TRAIN_CACHE", default))


def _cache_key(jobs: list[PhantomJob]) -> str:
    # The phantom sources and this module's preparation code (not its training code, so that
    # editing the training loop keeps the cache).
    phantom_sources = sorted(Path(synth_cxr.__file__).parent.glob("cxr*.py"))
    preparation = (render, truth_labels, truth_view, _box_mask, truth_regions, _region_grid)
    source = (
        b"".join(p.read_bytes() for p in phantom_sources)
        + "".join(inspect.getsource(function) for function in (*preparation, prepare_job)).encode()
    )
    payload = json.dumps(
        [CACHE_VERSION, STANDARD_SHAPES, REGION_GRID, [asdict(j) for j in jobs]], sort_keys=True
    ).encode()
    return hashlib.sha256(hashlib.sha256(source).digest() + payload).hexdigest()[:20]


def prepared_split(
    name: str, n: int, shape: tuple[int, int, int], workers: int = 2, cache: bool = True
) -> Split:
    """``n`` phantoms of split ``name`` (seeds from SPLIT_SEEDS) at input ``shape``.

    Rendered once in ``workers`` processes for all STANDARD_SHAPES and cached (keyed by the
    jobs, the preparation code of this module and the dicomnode/synth/cxr*.py sources), so the
    scripts share one rendering.
    """
    if shape not in STANDARD_SHAPES:
        raise ValueError(f"shape {shape} is not one of {STANDARD_SHAPES}")
    jobs = [random_job(seed) for seed in range(SPLIT_SEEDS[name], SPLIT_SEEDS[name] + n)]
    key = _cache_key(jobs)
    folder = cache_dir() / f"{name}-{n}-{key}"
    path = folder / f"{shape[1]}.npz"
    if not (cache and path.is_file()):
        started = time.monotonic()
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(prepare_job, jobs, chunksize=8)
        print(f"{name}: rendered {n} phantoms in {time.monotonic() - started:.0f} s", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        common = {
            "labels": np.stack([r["labels"] for r in results]),
            "views": np.array([r["view"] for r in results]),
            "seeds": np.array([j.seed for j in jobs]),
        }
        for size in (s[1] for s in STANDARD_SHAPES):
            regions = np.stack([r[f"regions{size}"] for r in results])
            arrays = {
                **common,
                "images": np.stack([r[f"image{size}"] for r in results]),
                "regions": np.packbits(regions, axis=-1),
            }
            temporary = folder / f"{size}.tmp.npz"
            np.savez(temporary, **arrays)
            temporary.replace(folder / f"{size}.npz")
        del results
    data = np.load(path)
    regions = np.unpackbits(data["regions"], axis=-1, count=REGION_GRID).astype(bool)
    return Split(
        images=data["images"],
        labels=data["labels"],
        views=data["views"],
        regions=regions,
        seeds=data["seeds"],
        has_region=regions.any(axis=(2, 3)),
    )


def load_splits(
    n_train: int,
    n_validation: int,
    n_heldout: int,
    shape: tuple[int, int, int],
    workers: int = 2,
    frontal: bool = False,
) -> tuple[Split, Split, Split]:
    """The train, validation and held-out splits at input ``shape`` (``prepared_split``), only
    their PA/AP phantoms when ``frontal``."""
    splits = tuple(
        prepared_split(name, n, shape, workers)
        for name, n in (("train", n_train), ("validation", n_validation), ("heldout", n_heldout))
    )
    if frontal:
        splits = tuple(split.frontal() for split in splits)
    return splits[0], splits[1], splits[2]


def normalised(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Float32 model inputs from cached 'unit' canvases, as ``prepare_input`` normalises."""
    images = images.astype(np.float32)
    if spec.normalisation == "zscore":
        images = (images - np.float32(spec.mean)) / np.float32(spec.std)
    return images


def zscore_spec(images: np.ndarray, shape: tuple[int, ...]) -> InputSpec:
    """A z-score InputSpec with the mean/std of (up to 256 of) the training ``images`` ('unit'
    canvases), rounded to 4 decimals."""
    sample = images[:256].astype(np.float64)
    mean, std = round(float(sample.mean()), 4), round(float(sample.std()), 4)
    return InputSpec(shape=shape, normalisation="zscore", mean=mean, std=std)


# --- networks -----------------------------------------------------------------------------


def conv_block(channels_in: int, channels_out: int, dilation: int = 1) -> list[nn.Module]:
    """3x3 convolution, BatchNorm, ReLU."""
    return [
        nn.Conv2d(channels_in, channels_out, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    ]


class CamNet(nn.Module):
    """Features -> global average pooling -> linear, so class-activation maps are exact.

    ``features`` is any module mapping (N,C,H,W) to (N,F,h,w); ``classes`` linear units.
    """

    def __init__(self, features: nn.Module, channels: int, classes: int) -> None:
        super().__init__()
        self.features = features
        self.classifier = nn.Linear(channels, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits (N x classes)."""
        return self.classifier(self.features(image).mean(dim=(2, 3)))

    def cam(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits N x L, CAM N x L x h x w): the linear layer at every feature position; the
        CAM's spatial mean is the logit."""
        features = self.features(image)
        weight = self.classifier.weight  # L x F
        cam = torch.einsum("nfhw,lf->nlhw", features, weight)
        cam = cam + self.classifier.bias.view(1, -1, 1, 1)
        return cam.mean(dim=(2, 3)), cam


def plain_features(widths: Sequence[int] = (16, 32, 64, 96, 128)) -> nn.Sequential:
    """Strided stem then conv blocks with max-pooling: output stride 16."""
    layers: list[nn.Module] = [
        nn.Conv2d(1, widths[0], 5, stride=2, padding=2, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    ]
    for index, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
        layers += conv_block(w_in, w_out)
        if index < 2:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class CamExport(nn.Module):
    """ONNX graph of a CamNet: probabilities (sigmoid or softmax) and optionally the CAM."""

    def __init__(self, net: CamNet, activation: str = "sigmoid", with_cam: bool = True) -> None:
        super().__init__()
        self.net = net
        self.activation = activation
        self.with_cam = with_cam

    def forward(self, image: torch.Tensor):
        logits, cam = self.net.cam(image)
        if self.activation == "softmax":
            probabilities = torch.softmax(logits, dim=1)
        else:
            probabilities = torch.sigmoid(logits)
        return (probabilities, cam) if self.with_cam else probabilities


# --- training -----------------------------------------------------------------------------


def predict(
    net: nn.Module, images: np.ndarray, spec: InputSpec, activation: str, batch: int = 64
) -> np.ndarray:
    """Probabilities (N x L) of the network in eval mode ('sigmoid' or 'softmax')."""
    head = nn.Softmax(dim=1) if activation == "softmax" else nn.Sigmoid()
    return shared.predict(
        nn.Sequential(net, head), images, batch, lambda chunk: normalised(chunk, spec)
    )


def train(
    net: nn.Module,
    images: np.ndarray,
    targets: np.ndarray,
    spec: InputSpec,
    *,
    loss_fn: nn.Module,
    validate: Callable[[nn.Module], tuple[float, float]],
    epochs: int,
    batch: int = 32,
    lr: float = 3e-3,
    flip: bool = True,
    seed: int = 1,
) -> tuple[float, int, list[dict[str, float]]]:
    """AdamW with a one-cycle schedule; mirrors half of each batch when ``flip``.

    ``targets`` are float (N x L) for BCE or int64 (N) for cross-entropy. ``validate(net)``
    returns (score, loss); the epoch with the best score (ties: lower loss) is kept. Returns the
    best score, its epoch and the per-epoch history.
    """
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(images) / batch)
    optimiser, schedule = shared.adamw_one_cycle(net.parameters(), lr, steps)
    history: list[dict[str, float]] = []

    def train_epoch() -> float:
        order = torch.randperm(len(images), generator=generator).numpy()
        total = 0.0
        for start in range(0, len(order), batch):
            index = np.sort(order[start : start + batch])
            x = torch.from_numpy(normalised(images[index], spec))
            if flip:
                mirrored = torch.rand(len(index), generator=generator) < 0.5
                x[mirrored] = x[mirrored].flip(-1)
            y = torch.from_numpy(targets[index])
            loss = loss_fn(net(x), y)
            shared.optimise(optimiser, schedule, loss)
            total += loss.item() * len(index)
        history.append({"epoch": len(history) + 1, "loss": total / len(order)})
        return total / len(order)

    def validate_epoch() -> tuple[tuple[float, float], str]:
        score, validation_loss = validate(net)
        history[-1]["score"] = score
        return (score, -validation_loss), f"validation score {score:.4f} loss {validation_loss:.4f}"

    best = shared.BestEpoch(initial=(-math.inf, -math.inf))
    shared.fit(net, epochs, train_epoch, validate_epoch, best)
    return best.score[0], best.epoch, history


def bce(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities (clipped to 1e-7..1-1e-7) against 0/1
    targets."""
    p = np.clip(probabilities, 1e-7, 1 - 1e-7)
    return float(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean())


def auc_validation(
    images: np.ndarray, labels: np.ndarray, spec: InputSpec
) -> Callable[[nn.Module], tuple[float, float]]:
    """A ``validate`` for ``train`` of a one-output sigmoid classifier: (AUC, BCE) of the
    clipped probabilities on the validation ``images`` against ``labels``."""

    def validate(model: nn.Module) -> tuple[float, float]:
        p = np.clip(predict(model, images, spec, "sigmoid")[:, 0], 1e-7, 1 - 1e-7)
        return auc(p, labels), bce(p, labels)

    return validate


# --- export and inference -------------------------------------------------------------------


def export_onnx(
    module: nn.Module, path: Path, spec: InputSpec, output_names: Sequence[str]
) -> None:
    """ONNX opset 17 with ``spec``'s input and a dynamic batch dimension on the input and every
    output (``shared.export_onnx``)."""
    shared.export_onnx(module, path, spec.shape, output_names, spec.name)


def onnx_outputs(
    path: Path, images: np.ndarray, spec: InputSpec, names: Sequence[str], batch: int = 64
) -> list[np.ndarray]:
    """The named outputs of the ONNX file over cached images, from onnxruntime on the CPU."""
    return shared.onnx_outputs(
        path, images, batch, names, lambda chunk: normalised(chunk, spec), spec.name
    )


def export_checked(
    net: CamNet,
    path: Path,
    spec: InputSpec,
    output_names: Sequence[str],
    images: np.ndarray,
    activation: str = "sigmoid",
    with_cam: bool = True,
) -> tuple[list[np.ndarray], float]:
    """Export ``net`` as a ``CamExport`` graph, run the ONNX file over ``images`` and compare its
    first output (the probabilities) with the torch network's. Returns the named outputs and
    the largest absolute difference."""
    export_onnx(CamExport(net, activation, with_cam), path, spec, output_names)
    outputs = onnx_outputs(path, images, spec, output_names)
    difference = float(np.abs(outputs[0] - predict(net, images, spec, activation)).max())
    return outputs, difference


# --- metrics ---------------------------------------------------------------------------------


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney)."""
    return evaluation.roc_auc(labels, scores)


def auc_ci(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """DeLong 95 % confidence interval of the AUC."""
    return evaluation.auc_confidence_interval(labels, scores)


def youden(scores: np.ndarray, labels: np.ndarray) -> float:
    """Youden-J threshold, rounded to 6 significant digits as the card stores it."""
    return float(f"{evaluation.youden_threshold(labels, scores):.6g}")


def sensitivity_specificity(
    scores: np.ndarray, labels: np.ndarray, threshold: float
) -> tuple[float, float]:
    return evaluation.sensitivity_specificity(labels, scores, threshold)


def binary_metrics(
    prefix: str, scores: np.ndarray, labels: np.ndarray, threshold: float
) -> dict[str, float | int]:
    """auc, its DeLong CI, sensitivity and specificity at ``threshold``, n and prevalence."""
    low, high = auc_ci(scores, labels)
    sensitivity, specificity = sensitivity_specificity(scores, labels, threshold)
    key = f"{prefix}_" if prefix else ""
    return {
        f"auc_{prefix}" if prefix else "auc": auc(scores, labels),
        f"auc_{prefix}_ci_low" if prefix else "auc_ci_low": low,
        f"auc_{prefix}_ci_high" if prefix else "auc_ci_high": high,
        f"{key}sensitivity": sensitivity,
        f"{key}specificity": specificity,
        f"{key}positives": int(np.sum(labels == 1)),
    }


def heldout_binary_metrics(
    scores: np.ndarray, labels: np.ndarray, threshold: float
) -> dict[str, object]:
    """``binary_metrics`` of held-out scores followed by the CI method, n, prevalence and the
    held-out seed start, as the classifier cards list them."""
    return {
        **binary_metrics("", scores, labels, threshold),
        "auc_ci_method": "DeLong 95%",
        "heldout_n": len(labels),
        "heldout_prevalence": float(labels.mean()),
        "heldout_seed_start": SPLIT_SEEDS["heldout"],
    }


def cam_peak_in_region(cams: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Per image: does the CAM's peak (any resolution) fall on a True cell of the region grid?"""
    hits = []
    for cam, region in zip(cams, regions, strict=True):
        row, col = np.unravel_index(np.argmax(cam), cam.shape)
        grid_row = int((row + 0.5) / cam.shape[0] * region.shape[0])
        grid_col = int((col + 0.5) / cam.shape[1] * region.shape[1])
        hits.append(bool(region[grid_row, grid_col]))
    return np.array(hits, dtype=bool)


# --- cards -----------------------------------------------------------------------------------


def input_table(spec: InputSpec) -> dict[str, object]:
    """The [input] table of a card for ``spec``."""
    table: dict[str, object] = {
        "name": spec.name,
        "shape": list(spec.shape),
        "normalisation": spec.normalisation,
    }
    if spec.normalisation == "zscore":
        table.update(mean=spec.mean, std=spec.std)
    table.update(resize=spec.resize, window_percentiles=list(spec.window_percentiles))
    return table


def select_table(views: Sequence[str] = FRONTAL) -> dict[str, object]:
    """The [select] table of a chest radiograph model: DX/CR, CHEST, and ``views`` (no view rule
    when empty)."""
    table: dict[str, object] = {"modalities": ["DX", "CR"], "body_parts": ["CHEST"]}
    if views:
        table["views"] = list(views)
    # Not another system's processed copy, not raw detector data (docs/model-cards.md).
    table["excluded_image_types"] = ["DERIVED", "LOCALIZER"]
    table["excluded_presentation_intents"] = ["FOR PROCESSING"]
    return table


def training_table(started: float, **values: object) -> dict[str, object]:
    """Common [training] entries: seconds, torch version, phantom mix."""
    return {
        **values,
        **shared.run_entries(started),
        "data": "dicomnode.synth.cxr.make_cxr via cxr_common.random_job (views PA/AP/LATERAL, "
        "DX/CR, 8-16 bit, MONOCHROME1/2, 384-512 rows, non-square)",
    }
