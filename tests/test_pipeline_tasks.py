"""The pipeline's per-task paths (detection, 2.5D detection, landmarks, segmentation,
image-to-image, ensemble) with small ONNX graphs whose answers follow the image.

Each graph is built with onnx.helper from a handful of operators, so that the test knows where
the answer must land: a bright spot painted into a phantom at a known place must come back at
that place in source pixels, in the SR, GSPS, SEG and overlay, and every object passes dciodvfy.
The demo models themselves are tested in their own files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pydicom
import pytest
from conftest import spool_and_index
from dciodvfy import dciodvfy_errors
from onnx import TensorProto, helper
from sqlalchemy import select

from dicomnode.config import Settings
from dicomnode.db.models import FindingRow
from dicomnode.findings import ModelRun
from dicomnode.models.registry import ModelCard, discover_cards
from dicomnode.pipeline.analyse import StageTimes, analyse_study
from dicomnode.pipeline.outputs import result_objects
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.tasks import run_model
from dicomnode.synth.ct import make_ct_series
from dicomnode.synth.cxr import make_cxr

SIDE = 128
NOTICE = 'description = "pipeline test graph; research demo, not for clinical use"\n'


def _const(name: str, value, dtype=TensorProto.FLOAT) -> onnx.NodeProto:
    array = np.asarray(value, dtype=np.float32 if dtype == TensorProto.FLOAT else np.int64)
    tensor = helper.make_tensor(name, dtype, array.shape, array.flatten().tolist())
    return helper.make_node("Constant", [], [name], value=tensor)


def _argmax_nodes(source: str, prefix: str) -> list[onnx.NodeProto]:
    """Nodes giving {prefix}col, {prefix}row (N,1 float) and {prefix}max (N,1) of ``source``
    (N,1,H,W)."""
    p = prefix
    return [
        helper.make_node("Flatten", [source], [p + "flat"], axis=1),
        helper.make_node("ArgMax", [p + "flat"], [p + "idx"], axis=1, keepdims=1),
        helper.make_node("ReduceMax", [p + "flat"], [p + "max"], axes=[1], keepdims=1),
        _const(p + "w", [SIDE], TensorProto.INT64),
        helper.make_node("Div", [p + "idx", p + "w"], [p + "row_i"]),
        helper.make_node("Mod", [p + "idx", p + "w"], [p + "col_i"]),
        helper.make_node("Cast", [p + "row_i"], [p + "row"], to=TensorProto.FLOAT),
        helper.make_node("Cast", [p + "col_i"], [p + "col"], to=TensorProto.FLOAT),
    ]


def _score(source: str, out: str, offset: float, gain: float) -> list[onnx.NodeProto]:
    return [
        _const(out + "_o", [offset]),
        _const(out + "_g", [gain]),
        helper.make_node("Sub", [source, out + "_o"], [out + "_s"]),
        helper.make_node("Mul", [out + "_s", out + "_g"], [out + "_m"]),
        helper.make_node("Sigmoid", [out + "_m"], [out]),
    ]


def _save(nodes: list, channels: int, output: str, shape: list, path: Path) -> None:
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, SIDE, SIDE])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _spot_input(channels: int) -> list[onnx.NodeProto]:
    """'spot' (N,1,H,W): the image itself, or for 3 slices the centre slice minus the mean of its
    neighbours (what is on the analysed slice only)."""
    if channels == 1:
        return [helper.make_node("Identity", ["image"], ["spot"])]
    return [
        _const("c0", [0], TensorProto.INT64),
        _const("c1", [1], TensorProto.INT64),
        _const("c2", [2], TensorProto.INT64),
        _const("c3", [3], TensorProto.INT64),
        _const("axis", [1], TensorProto.INT64),
        helper.make_node("Slice", ["image", "c0", "c1", "axis"], ["before"]),
        helper.make_node("Slice", ["image", "c1", "c2", "axis"], ["centre"]),
        helper.make_node("Slice", ["image", "c2", "c3", "axis"], ["after"]),
        helper.make_node("Add", ["before", "after"], ["sides"]),
        _const("half", [0.5]),
        helper.make_node("Mul", ["sides", "half"], ["mean_sides"]),
        helper.make_node("Sub", ["centre", "mean_sides"], ["spot"]),
    ]


def _detector(path: Path, channels: int) -> None:
    """One box of 11 x 11 model pixels around the brightest pixel; score from its value."""
    nodes = _spot_input(channels) + _argmax_nodes("spot", "a_")
    nodes += _score("a_max", "score", 0.9 if channels == 1 else 0.6, 20.0)
    nodes += [_const("r", [5.0]), _const("r1", [6.0]), _const("zero", [[0.0]])]
    nodes += [
        helper.make_node("Sub", ["a_col", "r"], ["x0"]),
        helper.make_node("Sub", ["a_row", "r"], ["y0"]),
        helper.make_node("Add", ["a_col", "r1"], ["x1"]),
        helper.make_node("Add", ["a_row", "r1"], ["y1"]),
        helper.make_node("Mul", ["score", "zero"], ["label"]),
        helper.make_node("Concat", ["x0", "y0", "x1", "y1", "score", "label"], ["rows"], axis=1),
        helper.make_node("Unsqueeze", ["rows", "axis1"], ["boxes"]),
        _const("axis1", [1], TensorProto.INT64),
    ]
    # Constants must precede their use.
    nodes = [n for n in nodes if n.op_type == "Constant"] + [
        n for n in nodes if n.op_type != "Constant"
    ]
    _save(nodes, channels, "boxes", ["N", 1, 6], path)


def _landmark(path: Path) -> None:
    nodes = _spot_input(1) + _argmax_nodes("spot", "a_") + _score("a_max", "score", 0.9, 20.0)
    nodes += [
        _const("axis1", [1], TensorProto.INT64),
        helper.make_node("Concat", ["a_col", "a_row", "score"], ["rows"], axis=1),
        helper.make_node("Unsqueeze", ["rows", "axis1"], ["landmarks"]),
    ]
    nodes = [n for n in nodes if n.op_type == "Constant"] + [
        n for n in nodes if n.op_type != "Constant"
    ]
    _save(nodes, 1, "landmarks", ["N", 1, 3], path)


def _segmenter(path: Path) -> None:
    """Mask = bright (> 0.95 after 3 x 3 smoothing)."""
    nodes = [
        helper.make_node(
            "AveragePool", ["image"], ["smooth"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        ),
        *_score("smooth", "mask", 0.95, 200.0),
    ]
    _save(nodes, 1, "mask", ["N", 1, SIDE, SIDE], path)


def _smoother(path: Path) -> None:
    nodes = [
        helper.make_node(
            "AveragePool", ["image"], ["restored"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        )
    ]
    _save(nodes, 1, "restored", ["N", 1, SIDE, SIDE], path)


def _classifier(path: Path, offset: float, gain: float) -> None:
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0),
        *_score("mean", "probability", offset, gain),
    ]
    _save(nodes, 1, "probability", ["N", 1], path)


def _card(name: str, task: str, onnx_file: str, body: str, channels: int = 1) -> str:
    # Radiographs: the full stored range (the painted spot is the only pixel at the top).
    slices = (
        f"slices = {channels}\nwindow = [-600, 1500]\n"
        if channels > 1
        else "window_percentiles = [0.0, 100.0]\n"
    )
    return (
        f'[model]\nname = "{name}"\nversion = "0.1"\ntask = "{task}"\nonnx = "{onnx_file}"\n'
        f'{NOTICE}[input]\nname = "image"\nshape = [{channels}, {SIDE}, {SIDE}]\n'
        f'normalisation = "unit"\n{slices}{body}'
    )


NODULE = (
    '[[labels]]\nindex = 0\ncode_value = "786838002"\ncode_scheme = "SCT"\n'
    'code_meaning = "Pulmonary nodule"\nthreshold = 0.5\ncritical = true\n'
)
CXR = '[select]\nmodalities = ["DX", "CR"]\n'


@pytest.fixture(scope="module")
def cards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelCard]:
    folder = tmp_path_factory.mktemp("graphs")
    _detector(folder / "det.onnx", 1)
    _detector(folder / "det25.onnx", 3)
    _landmark(folder / "tip.onnx")
    _segmenter(folder / "seg.onnx")
    _smoother(folder / "smooth.onnx")
    _classifier(folder / "cls_a.onnx", 0.4, 10.0)
    _classifier(folder / "cls_b.onnx", 0.3, 4.0)
    boxes = '[[outputs]]\nname = "boxes"\nkind = "boxes"\n'
    texts = {
        "det": _card("t-det", "detection", "det.onnx", boxes + NODULE + CXR),
        "det25": _card(
            "t-ct-det",
            "detection",
            "det25.onnx",
            boxes + NODULE + '[select]\nmodalities = ["CT"]\n',
            3,
        ),
        "tip": _card(
            "t-tip",
            "landmark",
            "tip.onnx",
            '[[outputs]]\nname = "landmarks"\nkind = "landmarks"\n[[labels]]\nindex = 0\n'
            'code_value = "RID49538"\ncode_scheme = "RADLEX"\ncode_meaning = "Catheter tip"\n'
            "threshold = 0.5\n" + CXR,
        ),
        "seg": _card(
            "t-seg",
            "segmentation",
            "seg.onnx",
            '[[outputs]]\nname = "mask"\nkind = "mask"\n[[labels]]\nindex = 0\n'
            'code_value = "39607008"\ncode_scheme = "SCT"\ncode_meaning = "Lung"\n'
            + CXR
            + '[results]\nproduce = ["seg", "overlay"]\n',
        ),
        "smooth": _card(
            "t-smooth",
            "image-to-image",
            "smooth.onnx",
            '[[outputs]]\nname = "restored"\nkind = "image"\n' + CXR,
        ),
    }
    for name, onnx_file in {"cls-a": "cls_a.onnx", "cls-b": "cls_b.onnx"}.items():
        texts[name] = _card(
            f"t-{name}",
            "classification",
            onnx_file,
            '[[outputs]]\nname = "probability"\nkind = "probabilities"\n[[labels]]\nindex = 0\n'
            'code_value = "154283005"\ncode_scheme = "SCT"\n'
            'code_meaning = "Pulmonary tuberculosis"\n' + CXR,
        ).replace('version = "0.1"', 'version = "0.1"\nstandalone = false')
    texts["ensemble"] = (
        '[model]\nname = "t-ensemble"\nversion = "0.1"\ntask = "ensemble"\n'
        + NOTICE
        + '[input]\nname = "image"\nshape = [1, 128, 128]\n'
        '[[outputs]]\nname = "probability"\nkind = "probabilities"\n[[labels]]\nindex = 0\n'
        'code_value = "154283005"\ncode_scheme = "SCT"\ncode_meaning = "Pulmonary tuberculosis"\n'
        + CXR
        + '[ensemble]\nmembers = ["t-cls-a", "t-cls-b"]\n'
    )
    for name, text in texts.items():
        (folder / f"{name}.toml").write_text(text)
    return {card.model.name: card for card in discover_cards([folder])}


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime(["CPUExecutionProvider"])


def _spotted_cxr(row: int, col: int) -> pydicom.Dataset:
    """A 512 x 400 (non-square) 12-bit phantom with a 17 x 17 spot of the largest stored value
    (brighter than anything else on it) centred on (row, col)."""
    ds, _ = make_cxr(11, size=512, columns=400, bits=12, photometric="MONOCHROME2")
    pixels = ds.pixel_array.copy()
    assert pixels.max() < 4095
    pixels[row - 8 : row + 9, col - 8 : col + 9] = 4095
    # Without the header's window the card's percentiles (0, 100) map the spot alone to 1.
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = pixels.tobytes()
    return ds


def _valid(objects: list[tuple[str, pydicom.Dataset]]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for kind, ds in objects:
        assert dciodvfy_errors(ds) == [], kind
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _run(card: ModelCard, images: list, runtime: Runtime, cards=None) -> ModelRun:
    return run_model(card, images, runtime, StageTimes(), cards)


def test_detection_box_lands_on_the_spot_in_source_pixels(cards, runtime) -> None:
    ds = _spotted_cxr(300, 120)
    card = cards["t-det"]
    run = _run(card, [ds], runtime)
    (finding,) = run.images[0].findings
    assert finding.present and finding.box is not None
    col0, row0, col1, row1 = finding.box
    # 11 model pixels at a scale of 128/512 = 44 source pixels around the spot.
    assert col0 < 120 < col1 and row0 < 300 < row1
    assert 30 < col1 - col0 < 60 and 30 < row1 - row0 < 60
    kinds = _valid(result_objects(run, card))
    assert kinds == {"sr": 1, "overlay": 1, "gsps": 1, "kos": 1}


def test_landmark_point_lands_on_the_spot(cards, runtime) -> None:
    ds = _spotted_cxr(200, 260)
    card = cards["t-tip"]
    run = _run(card, [ds], runtime)
    (finding,) = run.images[0].findings
    assert finding.point is not None
    col, row = finding.point
    assert abs(col - 260) <= 10 and abs(row - 200) <= 10  # one model pixel = 4 source pixels
    kinds = _valid(result_objects(run, card))
    assert kinds == {"sr": 1, "overlay": 1, "gsps": 1}  # not critical: no KOS


def test_segmentation_mask_maps_back_to_the_source_grid(cards, runtime) -> None:
    ds = _spotted_cxr(100, 300)
    card = cards["t-seg"]
    run = _run(card, [ds], runtime)
    (segmentation,) = run.segmentations
    (segment,) = segmentation.segments
    assert segment.probabilities.shape == (1, 512, 400)
    mask = segment.mask[0]
    assert mask[100, 300] and not mask[400, 60]
    kinds = _valid(result_objects(run, card))
    assert kinds == {"seg": 1, "overlay": 1}


def test_two_radiographs_of_one_series_get_a_segmentation_each(cards, runtime) -> None:
    """A PA and its retake in one series: without a patient coordinate system a SEG cannot
    cover both (highdicom refuses it, which failed the study's whole results job)."""
    first, retake = _spotted_cxr(100, 300), _spotted_cxr(300, 100)
    retake.SOPInstanceUID = retake.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    retake.InstanceNumber = 2
    assert retake.SeriesInstanceUID == first.SeriesInstanceUID
    card = cards["t-seg"]
    run = _run(card, [first, retake], runtime)
    assert [[ds.SOPInstanceUID for ds in s.sources] for s in run.segmentations] == [
        [first.SOPInstanceUID],
        [retake.SOPInstanceUID],
    ]
    assert [s.segments[0].mask[0][100, 300] for s in run.segmentations] == [True, False]
    assert _valid(result_objects(run, card)) == {"seg": 2, "overlay": 2}


def test_image_to_image_gives_a_derived_image_in_the_source_range(cards, runtime) -> None:
    ds, _ = make_cxr(12, size=256, bits=12)
    card = cards["t-smooth"]
    run = _run(card, [ds], runtime)
    (derived,) = run.derived
    assert derived.pixels.shape == ds.pixel_array.shape
    assert derived.pixels.min() >= 0 and derived.pixels.max() < 4096
    # A 3 x 3 smoothing at 128 px: close to the source, not equal to it.
    difference = np.abs(derived.pixels.astype(float) - ds.pixel_array.astype(float))
    assert 0 < np.median(difference) < 0.1 * float(np.ptp(ds.pixel_array))
    assert _valid(result_objects(run, card)) == {"derived": 1}


def test_ensemble_averages_its_members(cards, runtime, sessions, tmp_path: Path) -> None:
    ds, _ = make_cxr(13, size=256)
    members = [_run(cards[name], [ds], runtime) for name in ("t-cls-a", "t-cls-b")]
    run = _run(cards["t-ensemble"], [ds], runtime, cards)
    expected = np.mean([m.images[0].findings[0].probability for m in members])
    assert run.images[0].findings[0].probability == pytest.approx(expected, abs=1e-6)
    # Members are not standalone: a study analysed with every card runs the ensemble, not them.
    settings = Settings(storage={"path": tmp_path / "storage"})
    with sessions() as session:
        study_id, _ = spool_and_index(session, settings.storage_path, ds)
        analyse_study(session, settings, list(cards.values()), runtime, study_id)
        names = set(
            session.scalars(select(FindingRow.model_name).where(FindingRow.study_id == study_id))
        )
    assert "t-ensemble" in names and "t-cls-a" not in names and "t-cls-b" not in names


def test_25d_stacks_neighbouring_slices_in_position_order(cards, runtime) -> None:
    series = make_ct_series(21, rows=128, slices=9, nodules=(0, 0))
    series = list(series[0] if isinstance(series, tuple) else series)
    # A bright blob on one slice only: only its centre slice differs from its neighbours.
    target = sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2]))[4]
    pixels = target.pixel_array.copy()
    pixels[60:66, 40:46] = pixels.max()
    target.PixelData = pixels.tobytes()
    shuffled = series[::2] + series[1::2]  # arrival order is not slice order
    card = cards["t-ct-det"]
    run = _run(card, shuffled, runtime)
    present = [e for e in run.images if any(f.present for f in e.findings)]
    assert [e.source.SOPInstanceUID for e in present] == [target.SOPInstanceUID]
    (finding,) = [f for f in present[0].findings if f.present]
    col0, row0, col1, row1 = finding.box
    assert col0 < 43 < col1 and row0 < 63 < row1
    kinds = _valid(result_objects(run, card))
    assert kinds["sr"] == 1 and kinds["gsps"] == 1 and kinds["overlay"] == 1


def test_colour_secondary_capture_radiograph_gets_an_overlay_but_no_gsps(cards, runtime) -> None:
    """A chest X-ray that arrives as an RGB secondary capture (scanned film, screen capture):
    analysed on its grey presentation, drawn on, but given no presentation state."""
    grey = _spotted_cxr(250, 200)
    stored = grey.pixel_array.astype(np.float64)
    rgb = np.repeat((stored / 4095 * 255).astype(np.uint8)[..., None], 3, axis=2)
    ds = grey.copy()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    card = cards["t-det"]
    run = _run(card, [ds], runtime)
    (finding,) = run.images[0].findings
    col0, row0, col1, row1 = finding.box
    assert col0 < 200 < col1 and row0 < 250 < row1
    kinds = _valid(result_objects(run, card))
    assert kinds == {"sr": 1, "overlay": 1, "kos": 1}


def test_a_series_chunks_run_at_once_and_come_back_in_order(tmp_path: Path) -> None:
    """infer runs a long series' chunks as many at once as the model runs batches (on the CPU
    a chunk per core) and returns every output row in the samples' order."""
    import threading

    from test_runtime_batching import alone, make_model

    from dicomnode.config import InferenceSettings
    from dicomnode.pipeline.tasks import MAX_BATCH, infer

    card = make_model(tmp_path, "tiny")
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(in_flight=2, batch_size=4))
    threads: set[str] = set()
    real_run = runtime.run
    # The first two chunks wait for each other: run one at a time, infer breaks the barrier
    # (10 s) and fails; however slow the machine, two at once always meet.
    both_running = threading.Barrier(2, timeout=10)
    calls = iter(range(1_000))

    def run(card: ModelCard, batch: np.ndarray) -> dict[str, np.ndarray]:
        threads.add(threading.current_thread().name)
        if next(calls) < 2:
            both_running.wait()
        return real_run(card, batch)

    runtime.run = run  # type: ignore[method-assign]
    rng = np.random.default_rng(7)
    samples = [(rng.uniform(0, 2, (1, 8, 8)).astype(np.float32), None) for _ in range(70)]
    outputs = infer(card, samples, runtime, StageTimes())  # type: ignore[arg-type]
    expected = alone(card, np.stack([array for array, _ in samples]))
    np.testing.assert_allclose(outputs["cam"], expected["cam"], rtol=1e-6)
    np.testing.assert_allclose(outputs["probability"], expected["probability"], rtol=1e-6)
    assert len(samples) > 2 * MAX_BATCH
    assert len(threads) == 2 and all(name.startswith("dicomnode-chunks") for name in threads)
    assert infer(card, [], runtime, StageTimes()) == {}
