"""Shared helpers of the CT demo training scripts (nodule detector, lung segmentation).

One job each: describe the phantom series of a split (``series_options``), render them in worker
processes into prepared model inputs with their truth (``prepared_split``, cached on disk so the
two scripts share one rendering; ``load_splits`` for all three), and fill the card tables both
share (``input_table``, ``select_table``, ``training_table``; ``shared.write_card`` writes it).

Every slice goes through ``dicomnode.pipeline.preprocess.prepare_input`` with the card's fixed
lung window, the code the node runs at inference; the 2.5D stacks are built from those slices
in slice-position order with the edge slices repeated, as the node's series code does.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dicomnode.synth.ct as synth_ct
import dicomnode.synth.ct_anatomy as synth_ct_anatomy
from dicomnode.models.registry import InputSpec
from dicomnode.pipeline.preprocess import prepare_input

INPUT_SIZE = 160
LUNG_WINDOW = (-600.0, 1500.0)
SPLIT_SEEDS = {"train": 0, "validation": 500_000, "heldout": 1_000_000}
CACHE_VERSION = "ct-common-1"
RESEARCH_DEMO = "Research demo, not for clinical use."
# Seconds spent rendering each split in this process (0 when it came from the disk cache).
RENDER_SECONDS: dict[str, float] = {}


def slice_spec(channels: int = 1) -> InputSpec:
    """The per-slice input spec both CT cards use (unit-normalised lung window)."""
    return InputSpec(
        shape=(channels, INPUT_SIZE, INPUT_SIZE),
        normalisation="unit",
        resize="letterbox",
        window=LUNG_WINDOW,
        slices=channels,
    )


def series_options(split: str, seed: int) -> dict:
    """Phantom options of one series: a mix of matrix sizes, slice thicknesses and doses.
    Training series carry more nodules; held-out series have the CLI's default size."""
    rng = np.random.default_rng([seed, 77])
    thickness = float(rng.choice([1.25, 2.5, 5.0], p=[0.3, 0.45, 0.25]))
    options = {
        "rows": int(rng.choice([160, 256])),
        "slices": 32,
        "slice_thickness": thickness,
        "dose": str(rng.choice(["standard", "low"], p=[0.65, 0.35])),
        "nodules": (2, 6),
    }
    if split == "heldout":
        options.update(rows=256, slices=48, nodules=(1, 4))
    elif split == "validation":
        options.update(nodules=(1, 4))
    return options


def _downsample(mask: np.ndarray, size: int) -> np.ndarray:
    """Area fraction of a boolean mask on a size x size grid (BOX, as inputs are resized)."""
    image = Image.fromarray(mask.astype(np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.float32)


def prepare_series(job: tuple[str, int]) -> dict:
    """Render one series and prepare its slices; returns arrays and truth."""
    split, seed = job
    options = series_options(split, seed)
    datasets, truth = synth_ct.make_ct_series(seed, **options)
    spec = slice_spec(1)
    images = np.stack([prepare_input(ds, spec)[0][0] for ds in datasets]).astype(np.float16)
    lung_input = np.stack([_downsample(m, INPUT_SIZE) for m in truth.lung])
    return {
        "seed": seed,
        "images": images,
        "lung_input": (lung_input * 255).round().astype(np.uint8),
        "lung": np.packbits(truth.lung, axis=-1),
        "rows": int(datasets[0].Rows),
        "pixel_spacing": truth.pixel_spacing_mm,
        "spacing": truth.spacing_between_slices_mm,
        "thickness": truth.slice_thickness_mm,
        "noise_hu": truth.noise_hu,
        "nodules": [
            [*n.center_voxel, n.diameter_mm, synth_ct.NODULE_KINDS.index(n.kind)]
            for n in truth.nodules
        ],
    }


@dataclass
class Series:
    """One prepared series: inputs (slices, H, W) unit float16, lung fraction at input size,
    nodules as rows (slice, row, col, diameter_mm, kind index) in source voxels."""

    seed: int
    images: np.ndarray
    lung_input: np.ndarray
    lung_packed: np.ndarray
    rows: int
    pixel_spacing: float
    spacing: float
    thickness: float
    noise_hu: float
    nodules: np.ndarray

    @property
    def scale(self) -> float:
        """Source pixels to input pixels (square images, no padding)."""
        return INPUT_SIZE / self.rows

    def lung(self) -> np.ndarray:
        """Source-resolution lung mask (slices, rows, rows) bool."""
        return np.unpackbits(self.lung_packed, axis=-1, count=self.rows).astype(bool)

    def stack(self, index: int, count: int = 3) -> np.ndarray:
        """(count, H, W) float32 2.5D input centred on slice ``index``; edges repeated."""
        half = count // 2
        last = len(self.images) - 1
        picks = [min(max(index + o, 0), last) for o in range(-half, half + 1)]
        return self.images[picks].astype(np.float32)


def cache_dir() -> Path:
    """``$DICOMNODE_TRAIN_CACHE`` or ``~/.cache/dicomnode/ct-train``."""
    default = Path.home() / ".cache" / "dicomnode" / "ct-train"
    return Path(os.environ.get("DICOMNODE_TRAIN_CACHE", default)) / "ct"


def _cache_key(split: str, n: int) -> str:
    """Keyed by the phantom source, the series options and the input size (bump
    CACHE_VERSION when ``prepare_series`` changes)."""
    sources = b"".join(Path(m.__file__).read_bytes() for m in (synth_ct, synth_ct_anatomy))
    seeds = range(SPLIT_SEEDS[split], SPLIT_SEEDS[split] + n)
    options = [series_options(split, seed) for seed in seeds]
    payload = json.dumps([CACHE_VERSION, split, n, INPUT_SIZE, options]).encode()
    return hashlib.sha256(hashlib.sha256(sources).digest() + payload).hexdigest()[:20]


def prepared_split(split: str, n: int, workers: int = 2, cache: bool = True) -> list[Series]:
    """``n`` series of ``split`` (seeds from SPLIT_SEEDS), rendered in ``workers`` processes
    and cached (keyed by this module and the phantom source)."""
    path = cache_dir() / f"{split}-{n}-{_cache_key(split, n)}.npz"
    RENDER_SECONDS[split] = 0.0
    if not (cache and path.is_file()):
        started = time.monotonic()
        jobs = [(split, seed) for seed in range(SPLIT_SEEDS[split], SPLIT_SEEDS[split] + n)]
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(prepare_series, jobs, chunksize=2)
        RENDER_SECONDS[split] = time.monotonic() - started
        print(f"{split}: rendered {n} series in {RENDER_SECONDS[split]:.0f} s", flush=True)
        arrays: dict[str, np.ndarray] = {}
        for i, r in enumerate(results):
            for key in ("images", "lung_input", "lung"):
                arrays[f"{key}_{i}"] = r[key]
            arrays[f"nodules_{i}"] = np.asarray(r["nodules"], np.float64).reshape(-1, 5)
            arrays[f"meta_{i}"] = np.array(
                [
                    r["seed"],
                    r["rows"],
                    r["pixel_spacing"],
                    r["spacing"],
                    r["thickness"],
                    r["noise_hu"],
                ],
                np.float64,
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp.npz")
        np.savez(temporary, **arrays)
        temporary.replace(path)
    data = np.load(path)
    out = []
    for i in range(n):
        seed, rows, pixel_spacing, spacing, thickness, noise = data[f"meta_{i}"]
        out.append(
            Series(
                seed=int(seed),
                images=data[f"images_{i}"],
                lung_input=data[f"lung_input_{i}"],
                lung_packed=data[f"lung_{i}"],
                rows=int(rows),
                pixel_spacing=float(pixel_spacing),
                spacing=float(spacing),
                thickness=float(thickness),
                noise_hu=float(noise),
                nodules=data[f"nodules_{i}"],
            )
        )
    return out


def load_splits(
    n_train: int, n_validation: int, n_heldout: int, workers: int = 2
) -> dict[str, list[Series]]:
    """The train, validation and held-out splits (``prepared_split``), keyed by split name."""
    return {
        name: prepared_split(name, n, workers)
        for name, n in (("train", n_train), ("validation", n_validation), ("heldout", n_heldout))
    }


# --- cards -----------------------------------------------------------------------------------


def input_table(spec: InputSpec) -> dict[str, object]:
    return {
        "name": spec.name,
        "shape": list(spec.shape),
        "normalisation": spec.normalisation,
        "resize": spec.resize,
        "window": list(spec.window or ()),
        "slices": spec.slices,
    }


def select_table() -> dict[str, object]:
    """The [select] table of both CT cards: CT Image Storage only (a dose report or screen
    capture in a CT study, SC with Modality CT, has no HU for the lung window)."""
    return {
        "modalities": ["CT"],
        "body_parts": ["CHEST"],
        "sop_classes": ["1.2.840.10008.5.1.4.1.1.2"],
        # Axial slices only: no localisers, no coronal or sagittal reformats.
        "excluded_image_types": ["LOCALIZER"],
        "orientations": ["AXIAL"],
    }


def training_table(started: float, **values: object) -> dict[str, object]:
    return {
        **values,
        "seconds": round(time.monotonic() - started),
        "render_seconds": round(sum(RENDER_SECONDS.values())),
        "render_note": "phantom series rendered in this run (0 = read from the on-disk cache "
        "an earlier run of either CT script rendered, about 1 minute on 2 cores)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "data": "dicomnode.synth.ct.make_ct_series via ct_common.series_options (160/256 px, "
        "1.25/2.5/5 mm slices, standard/low dose)",
    }
