"""Train the CT pulmonary nodule detector demo (2.5D CenterNet-style) on synthetic chest CT.

Input: 3 adjacent axial slices (lung window, 0..1) as channels, 160 x 160. The network predicts a
nodule-centre heat map, the nodule's diameter and the centre's sub-cell offset on a stride-2
grid; the exported ONNX graph decodes them itself (sigmoid, 5x5 max-pool peak suppression,
top-K) into boxes (N, K, 6) = (x0, y0, x1, y1, score, label_index) in model-input pixels.

Metrics are per scan: per-slice detections are merged across adjacent slices into 3D candidates;
a candidate hits a nodule when its centre lies within the nodule's radius (at least 5 mm). The
card reports held-out FROC sensitivity at 1 and 4 false positives per scan.

Usage: python models/train/train_ct_nodule.py --out models
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import ct_common
import numpy as np
import onnxruntime
import shared
import torch
import torch.nn.functional as F
from torch import nn

from dicomnode.evaluation import metrics as evaluation

STEM = "ct_nodule_demo"
MODEL_NAME = "ct-nodule-demo"
MODEL_VERSION = "1.0.0"
NODULE_CODE = ("786838002", "SCT", "Pulmonary nodule")
STRIDE = 2
PEAK_POOL = 5  # peak suppression window in heat-map cells (10 input px)
TOP_K = 16
MIN_SCORE = 0.05
CROP = 80
LUNG_NEGATIVES = 0.75  # share of nodule-free crops centred on a lung pixel
HIT_RADIUS_MIN_MM = 5.0
FROC_POINTS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def _block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class NoduleNet(nn.Module):
    """Small encoder-decoder (strides 2, 4, 8) fused back to stride 2, where small nodules are
    still a few cells wide: channels heat logit, log diameter (input px), and the centre's x/y
    offset within its cell (logits of 0..1)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_block(3, 16))
        self.down1 = nn.Sequential(*_block(16, 24, 2), *_block(24, 24))
        self.down2 = nn.Sequential(*_block(24, 32, 2), *_block(32, 32))
        self.down3 = nn.Sequential(*_block(32, 48, 2), *_block(48, 48))
        self.fuse = nn.Sequential(*_block(48 + 32, 32), *_block(32, 32))
        self.fuse1 = nn.Sequential(*_block(32 + 24, 24))
        self.head = nn.Conv2d(24, 4, 1)
        nn.init.constant_(self.head.bias, 0.0)
        with torch.no_grad():
            self.head.bias[0] = -2.2  # a rare-positive prior for the heat map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.down1(self.stem(x))
        f2 = self.down2(f1)
        f3 = self.down3(f2)
        up = F.interpolate(f3, scale_factor=2.0, mode="nearest")
        g2 = self.fuse(torch.cat([up, f2], dim=1))
        up1 = F.interpolate(g2, scale_factor=2.0, mode="nearest")
        return self.head(self.fuse1(torch.cat([up1, f1], dim=1)))


class BoxDecoder(nn.Module):
    """The network plus CenterNet decoding to (N, K, 6) boxes, exported as one graph."""

    def __init__(self, net: NoduleNet, k: int = TOP_K) -> None:
        super().__init__()
        self.net = net
        self.k = k

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.net(image)
        heat = torch.sigmoid(out[:, 0:1])
        pooled = F.max_pool2d(heat, PEAK_POOL, stride=1, padding=PEAK_POOL // 2)
        peaks = heat * (pooled == heat).to(heat.dtype)
        n, _, h, w = heat.shape
        scores, index = torch.topk(peaks.reshape(n, h * w), self.k, dim=1)
        rest = out[:, 1:4].reshape(n, 3, h * w)
        picked = torch.gather(rest, 2, index.unsqueeze(1).expand(n, 3, self.k))
        size = torch.exp(picked[:, 0])
        cx = ((index % w).to(heat.dtype) + torch.sigmoid(picked[:, 1])) * STRIDE
        cy = (
            torch.div(index, w, rounding_mode="floor").to(heat.dtype) + torch.sigmoid(picked[:, 2])
        ) * STRIDE
        half = size / 2
        label = torch.zeros_like(scores)
        return torch.stack([cx - half, cy - half, cx + half, cy + half, scores, label], dim=2)


# --- targets -----------------------------------------------------------------------------------


def slice_targets(series: ct_common.Series, k: int) -> list[tuple[float, float, float]]:
    """(cx, cy, diameter) in continuous input pixels of the nodule cross-sections that slice
    ``k`` shows clearly (within 0.85 radius of the centre, or the centre's nearest slice)."""
    out = []
    for slice_c, row, col, diameter, _kind in series.nodules:
        radius = diameter / 2
        dz = (k - slice_c) * series.spacing
        if abs(dz) >= 0.85 * radius and abs(k - slice_c) > 0.5:
            continue
        section = math.sqrt(max(radius**2 - dz**2, (0.4 * radius) ** 2))
        scale = series.scale
        out.append(
            ((col + 0.5) * scale, (row + 0.5) * scale, 2 * section / series.pixel_spacing * scale)
        )
    return out


def target_maps(targets: list[tuple[float, float, float]], size: int) -> np.ndarray:
    """(4, h, w): Gaussian heat (1 at the centre cell), log diameter, x/y offsets, and the
    mask of centre cells in channel order heat, size, offx, offy (+ mask as a 5th)."""
    h = w = size // STRIDE
    maps = np.zeros((5, h, w), np.float32)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    for cx, cy, diameter in targets:
        ux, uy = cx / STRIDE, cy / STRIDE
        sigma = max(0.6, diameter / STRIDE / 5.0)
        gauss = np.exp(-((gx + 0.5 - ux) ** 2 + (gy + 0.5 - uy) ** 2) / (2 * sigma**2))
        maps[0] = np.maximum(maps[0], gauss)
        j, i = min(int(ux), w - 1), min(int(uy), h - 1)
        maps[0, i, j] = 1.0
        maps[1, i, j] = math.log(max(diameter, 1.0))
        maps[2, i, j] = ux - j
        maps[3, i, j] = uy - i
        maps[4, i, j] = 1.0
    return maps


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet focal loss on the heat map plus L1 on log size and offsets at centres."""
    heat = torch.sigmoid(out[:, 0]).clamp(1e-4, 1 - 1e-4)
    gt = target[:, 0]
    positive = target[:, 4]
    pos_loss = -torch.log(heat) * (1 - heat) ** 2 * positive
    neg_loss = -torch.log(1 - heat) * heat**2 * (1 - gt) ** 4 * (1 - positive)
    n_pos = positive.sum().clamp(min=1.0)
    focal = (pos_loss.sum() + neg_loss.sum()) / n_pos
    size = (torch.abs(out[:, 1] - target[:, 1]) * positive).sum() / n_pos
    offset = (
        (
            torch.abs(torch.sigmoid(out[:, 2]) - target[:, 2])
            + torch.abs(torch.sigmoid(out[:, 3]) - target[:, 3])
        )
        * positive
    ).sum() / n_pos
    return focal + size + offset


# --- training ----------------------------------------------------------------------------------


def training_slices(split: list[ct_common.Series]) -> tuple[list, list]:
    """(series index, slice, targets) of slices with and without nodule sections."""
    positive, negative = [], []
    for s_index, series in enumerate(split):
        for k in range(len(series.images)):
            targets = slice_targets(series, k)
            (positive if targets else negative).append((s_index, k, targets))
    return positive, negative


def make_batch(
    split: list[ct_common.Series], items: list, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random CROP x CROP crops (aligned to the stride) around a nodule, or for nodule-free
    slices mostly around a lung pixel (else anywhere), flipped left-right and in slice order
    at random."""
    size = ct_common.INPUT_SIZE
    images, targets = [], []
    for s_index, k, slice_t in items:
        stack = split[s_index].stack(k)
        maps = target_maps(slice_t, size)
        if slice_t:
            cx, cy, _ = slice_t[rng.integers(len(slice_t))]
            x0 = int(np.clip(cx - rng.uniform(8, CROP - 8), 0, size - CROP))
            y0 = int(np.clip(cy - rng.uniform(8, CROP - 8), 0, size - CROP))
        else:
            lung = np.flatnonzero(split[s_index].lung_input[k] >= 128)
            if lung.size and rng.random() < LUNG_NEGATIVES:
                # Hard negatives: vessels and airways inside the lungs look most like nodules.
                cy, cx = divmod(int(lung[rng.integers(lung.size)]), size)
                x0 = int(np.clip(cx - rng.uniform(8, CROP - 8), 0, size - CROP))
                y0 = int(np.clip(cy - rng.uniform(8, CROP - 8), 0, size - CROP))
            else:
                x0 = int(rng.integers(0, size - CROP + 1))
                y0 = int(rng.integers(0, size - CROP + 1))
        x0, y0 = x0 // STRIDE * STRIDE, y0 // STRIDE * STRIDE
        image = stack[:, y0 : y0 + CROP, x0 : x0 + CROP]
        maps = maps[:, y0 // STRIDE : (y0 + CROP) // STRIDE, x0 // STRIDE : (x0 + CROP) // STRIDE]
        if rng.random() < 0.5:
            image = image[:, :, ::-1]
            maps = maps[:, :, ::-1].copy()
            # Mirrored offsets: a centre at u within its cell moves to 1 - u.
            maps[2] = np.where(maps[4] > 0, 1.0 - maps[2], 0.0)
        if rng.random() < 0.5:
            image = image[::-1]
        images.append(np.ascontiguousarray(image))
        targets.append(np.ascontiguousarray(maps))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(targets))


def predict_boxes(model: nn.Module, split: list[ct_common.Series], batch: int = 32) -> list:
    """Boxes (slices, K, 6) per series from a torch module (eval mode)."""
    return [shared.predict(model, series_stacks(series), batch) for series in split]


def onnx_boxes(path: Path, split: list[ct_common.Series], batch: int = 32) -> list:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [shared.onnx_outputs(session, series_stacks(s), batch, ["boxes"])[0] for s in split]


def series_stacks(series: ct_common.Series) -> np.ndarray:
    """The 2.5D input (slices, 3, H, W) float32 of every slice of the series."""
    return np.stack([series.stack(k) for k in range(len(series.images))])


def boxes_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference between two (slices, K, 6) box outputs over the rows that count
    (score >= MIN_SCORE), each slice's rows in score order (top-K order is arbitrary among
    the zero scores of suppressed cells)."""
    worst = 0.0
    for rows_a, rows_b in zip(a, b, strict=True):
        rows_a = rows_a[np.lexsort((rows_a[:, 1], rows_a[:, 0], -rows_a[:, 4]))]
        rows_b = rows_b[np.lexsort((rows_b[:, 1], rows_b[:, 0], -rows_b[:, 4]))]
        keep = (rows_a[:, 4] >= MIN_SCORE) | (rows_b[:, 4] >= MIN_SCORE)
        if keep.any():
            worst = max(worst, float(np.abs(rows_a[keep] - rows_b[keep]).max()))
    return worst


# --- 3D candidates and FROC --------------------------------------------------------------------


def scan_candidates(
    boxes: np.ndarray, series: ct_common.Series, min_score: float = MIN_SCORE
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-slice boxes (slices, K, 6) into 3D candidates: centres (n, 3) in mm (z, y, x
    from the first voxel) and scores (n,). A detection joins the best-scoring candidate whose
    centre is within its radius (at least 5 mm) in plane and one slice beyond it in z."""
    scale = series.scale
    dets = []
    for k, rows in enumerate(boxes):
        for x0, y0, x1, y1, score, _label in rows:
            if score < min_score:
                continue
            col = (x0 + x1) / 2 / scale - 0.5
            row = (y0 + y1) / 2 / scale - 0.5
            radius = (x1 - x0) / 2 / scale * series.pixel_spacing
            dets.append(
                (
                    score,
                    k * series.spacing,
                    row * series.pixel_spacing,
                    col * series.pixel_spacing,
                    radius,
                )
            )
    dets.sort(key=lambda d: -d[0])
    candidates: list[dict] = []
    for score, z, y, x, radius in dets:
        for c in candidates:
            reach = max(c["radius"], HIT_RADIUS_MIN_MM)
            in_plane = math.hypot(y - c["y"], x - c["x"]) <= reach
            if in_plane and c["z0"] - series.spacing * 1.01 <= z <= c["z1"] + series.spacing * 1.01:
                weight = c["weight"] + score
                for key, value in (("z", z), ("y", y), ("x", x)):
                    c[key] = (c[key] * c["weight"] + value * score) / weight
                c["weight"] = weight
                c["z0"], c["z1"] = min(c["z0"], z), max(c["z1"], z)
                c["radius"] = max(c["radius"], radius)
                break
        else:
            candidates.append(
                {
                    "score": score,
                    "z": z,
                    "y": y,
                    "x": x,
                    "z0": z,
                    "z1": z,
                    "radius": radius,
                    "weight": score,
                }
            )
    centres = np.array([[c["z"], c["y"], c["x"]] for c in candidates]).reshape(-1, 3)
    return centres, np.array([c["score"] for c in candidates])


def froc_of(
    boxes: list, split: list[ct_common.Series], min_diameter_mm: float = 0.0
) -> evaluation.FrocCurve:
    """FROC over the scans of ``split``; with ``min_diameter_mm`` only nodules at least that
    large count, and candidates on smaller nodules are neither hits nor false positives."""
    cases = []
    for series_boxes, series in zip(boxes, split, strict=True):
        centres, scores = scan_candidates(series_boxes, series)
        truth = series.nodules
        truth_mm = (
            np.stack(
                [
                    truth[:, 0] * series.spacing,
                    truth[:, 1] * series.pixel_spacing,
                    truth[:, 2] * series.pixel_spacing,
                ],
                axis=1,
            )
            if len(truth)
            else np.zeros((0, 3))
        )
        radii = np.maximum(truth[:, 3] / 2, HIT_RADIUS_MIN_MM) if len(truth) else np.zeros(0)
        hits = evaluation.match_points(centres, truth_mm, radii)
        counted = truth[:, 3] >= min_diameter_mm if len(truth) else np.zeros(0, bool)
        new_index = np.cumsum(counted) - 1
        keep = np.array([h < 0 or counted[h] for h in hits], bool)
        hits = np.array([new_index[h] if h >= 0 else -1 for h in hits[keep]], np.int64)
        cases.append(evaluation.CaseDetections(scores[keep], hits, int(counted.sum())))
    return evaluation.froc(cases)


def froc_summary(curve: evaluation.FrocCurve) -> str:
    """'fp/scan:sensitivity' pairs at the FROC points (cards hold no lists)."""
    return " ".join(f"{p:g}:{curve.sensitivity_at(p):.3f}" for p in FROC_POINTS)


def train(
    net: NoduleNet,
    split: list[ct_common.Series],
    validation: list[ct_common.Series],
    epochs: int,
    batch: int,
    samples: int,
) -> tuple[float, int]:
    """AdamW with a one-cycle schedule; keeps the epoch with the best validation CPM."""
    rng = np.random.default_rng(1)
    positive, negative = training_slices(split)
    print(f"training slices: {len(positive)} with nodules, {len(negative)} without", flush=True)
    steps_per_epoch = samples // batch
    optimiser, schedule = shared.adamw_one_cycle(net.parameters(), 3e-3, epochs * steps_per_epoch)
    decoder = BoxDecoder(net)

    def train_epoch() -> float:
        total = 0.0
        for _ in range(steps_per_epoch):
            n_pos = batch * 2 // 3
            items = [positive[i] for i in rng.integers(0, len(positive), n_pos)]
            items += [negative[i] for i in rng.integers(0, len(negative), batch - n_pos)]
            images, targets = make_batch(split, items, rng)
            loss = loss_fn(net(images), targets)
            shared.optimise(optimiser, schedule, loss)
            total += loss.item()
        return total / steps_per_epoch

    def validate() -> tuple[float, str]:
        curve = froc_of(predict_boxes(decoder, validation), validation)
        cpm = curve.cpm(FROC_POINTS)
        return cpm, (
            f"validation CPM {cpm:.3f} sens@1FP {curve.sensitivity_at(1):.3f} "
            f"sens@4FP {curve.sensitivity_at(4):.3f}"
        )

    best = shared.fit(net, epochs, train_epoch, validate, shared.BestEpoch(initial=-1.0))
    return best.score, best.epoch


def export_onnx(net: NoduleNet, path: Path) -> None:
    """ONNX opset 17: input ``image`` [N,3,160,160]; output ``boxes`` [N,K,6]."""
    shared.export_onnx(BoxDecoder(net), path, ct_common.slice_spec(3).shape, ["boxes"])


def main() -> None:
    parser = shared.training_parser(
        __doc__, n_train=100, n_validation=16, n_heldout=24, epochs=14, batch=32,
        per_epoch=("--samples", 1536, "crops per epoch"),
    )  # fmt: skip
    args = parser.parse_args()

    started = shared.start_run(args.out)
    splits = ct_common.load_splits(args.n_train, args.n_validation, args.n_heldout, args.workers)
    print(f"data ready ({time.monotonic() - started:.0f} s)", flush=True)
    net = NoduleNet()
    best_cpm, best_epoch = train(
        net, splits["train"], splits["validation"], args.epochs, args.batch, args.samples
    )
    decoder = BoxDecoder(net).eval()
    validation_curve = froc_of(predict_boxes(decoder, splits["validation"]), splits["validation"])
    threshold = float(f"{max(validation_curve.threshold_at(1.0), MIN_SCORE):.6g}")

    onnx_path = args.out / f"{STEM}.onnx"
    export_onnx(net, onnx_path)
    heldout = splits["heldout"]
    torch_boxes = predict_boxes(decoder, heldout)
    boxes = onnx_boxes(onnx_path, heldout)
    difference = max(boxes_difference(a, b) for a, b in zip(boxes, torch_boxes, strict=True))
    if difference > 1e-3:
        print(
            f"warning: ONNX and torch boxes differ by up to {difference:.2e} (near-tied "
            "peaks); the card's metrics are the ONNX model's",
            flush=True,
        )
    curve = froc_of(boxes, heldout)
    large = froc_of(boxes, heldout, min_diameter_mm=6.0)
    n_nodules = int(sum(len(s.nodules) for s in heldout))
    metrics: dict[str, object] = {
        "heldout_sensitivity_at_1_fp_per_scan": curve.sensitivity_at(1.0),
        "heldout_sensitivity_at_4_fp_per_scan": curve.sensitivity_at(4.0),
        "heldout_cpm": curve.cpm(FROC_POINTS),
        "heldout_froc": froc_summary(curve),
        "heldout_sensitivity_at_4_fp_per_scan_nodules_ge_6mm": large.sensitivity_at(4.0),
        "heldout_cpm_nodules_ge_6mm": large.cpm(FROC_POINTS),
        "heldout_nodules_ge_6mm": int(sum((s.nodules[:, 3] >= 6.0).sum() for s in heldout)),
        "heldout_nodule_diameter_mm": "3-30 log-uniform (phantom default)",
        "heldout_scans": len(heldout),
        "heldout_nodules": n_nodules,
        "heldout_slices_per_scan": len(heldout[0].images),
        "heldout_seed_start": ct_common.SPLIT_SEEDS["heldout"],
        "hit_rule": "3D candidate centre within the nodule radius (at least 5 mm)",
        "candidates": "per-slice boxes with score >= 0.05 merged across adjacent slices",
        "threshold": threshold,
        "threshold_method": "score at 1 false positive per scan on validation series",
        "validation_cpm": best_cpm,
        "validation_sensitivity_at_1_fp_per_scan": validation_curve.sensitivity_at(1.0),
        "validation_scans": len(splits["validation"]),
        "validation_seed_start": ct_common.SPLIT_SEEDS["validation"],
        "onnx_torch_max_abs_difference": difference,
    }
    training = ct_common.training_table(
        started,
        n_train=len(splits["train"]),
        train_seed_start=ct_common.SPLIT_SEEDS["train"],
        torch_seed=0,
        numpy_seed=1,
        epochs=args.epochs,
        best_epoch=best_epoch,
        crops_per_epoch=args.samples,
        crop=CROP,
        batch=args.batch,
        heatmap_stride=STRIDE,
        lung_negatives=LUNG_NEGATIVES,
        top_k=TOP_K,
    )
    description = (
        "Pulmonary nodule detector for chest CT on 2.5D input (3 adjacent slices, lung window), "
        "CenterNet-style with in-graph decoding to boxes. Trained only on synthetic chest CT "
        "phantoms (dicomnode.synth.ct); metrics are FROC on held-out phantoms, not patients. "
        f"{ct_common.RESEARCH_DEMO}"
    )
    shared.write_card(
        args.out / f"{STEM}.toml",
        "train_ct_nodule.py",
        {
            "model": {
                "name": MODEL_NAME,
                "version": MODEL_VERSION,
                "task": "detection",
                "onnx": f"{STEM}.onnx",
                "description": description,
            },
            "input": ct_common.input_table(ct_common.slice_spec(3)),
            "outputs": [{"name": "boxes", "kind": "boxes", "min_score": MIN_SCORE}],
            "labels": [shared.label_table(NODULE_CODE, "nodule", threshold)],
            "select": ct_common.select_table(),
            "metrics": metrics,
            "training": training,
        },
    )
    shared.print_summary(
        {"metrics": metrics, "training": training},
        f"{onnx_path} ({onnx_path.stat().st_size} bytes) and {STEM}.toml",
    )


if __name__ == "__main__":
    main()
