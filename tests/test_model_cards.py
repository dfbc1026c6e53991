"""Model cards (registry) and ONNX Runtime sessions (runtime), with real tiny ONNX models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import REPO
from onnx import TensorProto, helper

from dicomnode.models.registry import discover_cards, load_card
from dicomnode.pipeline.runtime import Runtime
from dicomnode.pipeline.sessions import ModelLoadError, load_session
from dicomnode.tomlfile import ConfigError

CARD = """\
[model]
name = "{name}"
version = "{version}"
task = "{task}"
onnx = "{onnx}"

[input]
name = "image"
shape = [1, {size}, {size}]

[[outputs]]
name = "probability"
kind = "probabilities"

[[labels]]
index = 0
code_value = "36118008"
code_scheme = "SCT"
code_meaning = "Pneumothorax"
threshold = 0.4
critical = true

[select]
modalities = ["DX", "CR"]
"""


def write_card(
    folder: Path,
    file_name: str = "tiny.toml",
    *,
    name: str = "tiny",
    version: str = "1.0",
    task: str = "classification",
    onnx_file: str = "tiny.onnx",
    size: int = 8,
    extra: str = "",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    text = CARD.format(name=name, version=version, task=task, onnx=onnx_file, size=size)
    path.write_text(text + extra, encoding="utf-8")
    return path


def write_model(path: Path, *, poison: bool = False) -> Path:
    """image [N,1,8,8] -> ReduceMean over (C,H,W) -> Sigmoid -> probability [N,1].

    ``poison`` takes the square root of the negated mean first: NaN for positive images.
    """
    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0)]
    last = "mean"
    if poison:
        nodes += [
            helper.make_node("Neg", ["mean"], ["negated"]),
            helper.make_node("Sqrt", ["negated"], ["root"]),
        ]
        last = "root"
    nodes.append(helper.make_node("Sigmoid", [last], ["probability"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


# Registry ------------------------------------------------------------------------------


def test_valid_card_loads(tmp_path: Path) -> None:
    path = write_card(tmp_path)
    card = load_card(path)
    assert card.model.name == "tiny"
    assert card.model.task == "classification"
    assert card.input.shape == (1, 8, 8)
    assert card.output("probabilities").name == "probability"
    assert card.labels[0].concept.meaning == "Pneumothorax"
    assert card.labels[0].critical
    assert card.select.modalities == ["DX", "CR"]
    assert card.onnx_path == (tmp_path / "tiny.onnx").resolve()
    assert card.model.research_demo


VALID = CARD.format(name="bad", version="1", task="classification", onnx="bad.onnx", size=8)
OUTPUTS = '[[outputs]]\nname = "probability"\nkind = "probabilities"\n'
SECOND_LABEL_0 = (
    '\n[[labels]]\nindex = 0\ncode_value = "1"\ncode_scheme = "SCT"\ncode_meaning = "X"\n'
)


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        pytest.param(VALID.replace("classification", "astrology"), "model.task", 4, id="task"),
        pytest.param(VALID.replace(OUTPUTS, ""), "outputs", None, id="missing-outputs"),
        pytest.param(
            "outputs = []\n" + VALID.replace(OUTPUTS, ""), "outputs", 1, id="empty-outputs"
        ),
        pytest.param(VALID + SECOND_LABEL_0, "labels", None, id="duplicate-label-index"),
        pytest.param(
            VALID.replace("[input]\n", "[input]\ncolour = 1\n"), "input.colour", 8, id="unknown-key"
        ),
    ],
)
def test_invalid_card_names_file_and_key(
    tmp_path: Path, text: str, key: str, line: int | None
) -> None:
    assert text != VALID
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_card(path)
    assert caught.value.path == path
    assert caught.value.key == key
    assert caught.value.line == line
    assert str(path) in str(caught.value)
    assert key in str(caught.value)


def test_later_folder_replaces_card_of_same_name(tmp_path: Path) -> None:
    write_card(tmp_path / "shipped", name="cxr", version="1.0")
    write_card(tmp_path / "shipped", "other.toml", name="other", version="3.0")
    write_card(tmp_path / "local", "override.toml", name="cxr", version="2.0")
    cards = {c.model.name: c for c in discover_cards([tmp_path / "shipped", tmp_path / "local"])}
    assert sorted(cards) == ["cxr", "other"]
    assert cards["cxr"].model.version == "2.0"
    assert cards["cxr"].card_path == (tmp_path / "local" / "override.toml").resolve()
    # A folder that does not exist is skipped.
    assert len(discover_cards([tmp_path / "absent", tmp_path / "shipped"])) == 2


# Runtime ------------------------------------------------------------------------------


def test_runtime_runs_real_onnx_model(tmp_path: Path) -> None:
    write_model(tmp_path / "tiny.onnx")
    card = load_card(write_card(tmp_path))
    session = load_session(card, ["CPUExecutionProvider"])
    assert session.get_providers()[0] == "CPUExecutionProvider"
    batch = np.stack(
        [np.zeros((1, 8, 8)), np.full((1, 8, 8), 2.0), np.linspace(-1, 3, 64).reshape(1, 8, 8)]
    )
    runtime = Runtime(["NoSuchExecutionProvider", "CPUExecutionProvider"])
    outputs = runtime.run(card, batch)
    assert list(outputs) == ["probability"]
    expected = 1 / (1 + np.exp(-batch.mean(axis=(2, 3))))
    np.testing.assert_allclose(outputs["probability"], expected, rtol=1e-5)
    assert outputs["probability"].shape == (3, 1)
    # One warm session per model.
    assert runtime.session(card) is runtime.session(card)


def test_corrupt_onnx_raises_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "tiny.onnx").write_bytes(os.urandom(4096))
    card = load_card(write_card(tmp_path))
    with pytest.raises(ModelLoadError) as caught:
        load_session(card, ["CPUExecutionProvider"])
    assert "tiny" in str(caught.value)
    assert str(tmp_path / "tiny.onnx") in str(caught.value)


def test_missing_onnx_raises_model_load_error(tmp_path: Path) -> None:
    card = load_card(write_card(tmp_path, onnx_file="gone.onnx"))
    with pytest.raises(ModelLoadError, match=r"gone\.onnx"):
        Runtime(["CPUExecutionProvider"]).run(card, np.zeros((1, 1, 8, 8), np.float32))


def test_card_input_shape_must_match_onnx(tmp_path: Path) -> None:
    write_model(tmp_path / "tiny.onnx")
    card = load_card(write_card(tmp_path, size=16))
    with pytest.raises(ModelLoadError, match=r"\[1, 8, 8\].*\[1, 16, 16\]"):
        load_session(card, ["CPUExecutionProvider"])


def test_card_output_must_exist_in_onnx(tmp_path: Path) -> None:
    write_model(tmp_path / "tiny.onnx")
    card = load_card(write_card(tmp_path, extra='\n[[outputs]]\nname = "cam"\nkind = "heatmap"\n'))
    with pytest.raises(ModelLoadError, match="'cam'"):
        load_session(card, ["CPUExecutionProvider"])


def test_nan_output_raises_value_error(tmp_path: Path) -> None:
    write_model(tmp_path / "tiny.onnx", poison=True)
    card = load_card(write_card(tmp_path))
    runtime = Runtime(["CPUExecutionProvider"])
    # Non-positive images give finite outputs; positive ones NaN.
    assert np.isfinite(runtime.run(card, np.zeros((1, 1, 8, 8)))["probability"]).all()
    with pytest.raises(ValueError, match=r"tiny.*'probability'.*NaN"):
        runtime.run(card, np.ones((2, 1, 8, 8)))


# CLI -----------------------------------------------------------------------------------


def models_verify(tmp_path: Path, folder: Path) -> subprocess.CompletedProcess:
    config = tmp_path / "node.toml"
    config.write_text(f'[models]\nfolders = ["{folder}"]\n')
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", "models", "verify", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_models_verify_passes_good_and_fails_corrupt_model(tmp_path: Path) -> None:
    good = tmp_path / "good"
    write_card(good)
    write_model(good / "tiny.onnx")
    result = models_verify(tmp_path, good)
    assert result.returncode == 0, result.stderr
    assert "OK   tiny 1.0 on CPUExecutionProvider" in result.stdout

    corrupt = tmp_path / "corrupt"
    write_card(corrupt)
    (corrupt / "tiny.onnx").write_bytes(b"\x08\x07not a protobuf" + os.urandom(512))
    result = models_verify(tmp_path, corrupt)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL tiny" in result.stderr
    assert str(corrupt / "tiny.onnx") in result.stderr


# Verify: new card kinds -----------------------------------------------------------------


def write_identity_model(path: Path, channels: int = 1, output: str = "mask") -> Path:
    """image [N,C,8,8] -> Sigmoid -> ``output`` [N,C,8,8] (a per-channel 'mask')."""
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["image"], [output])],
        "identity",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, 8, 8])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", channels, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def verdicts_of(folder: Path) -> dict[str, object]:
    from dicomnode.models.verify import verify_cards

    cards = discover_cards([folder])
    return {v.card.model.name: v for v in verify_cards(cards, ["CPUExecutionProvider"])}


ENSEMBLE = """\
[model]
name = "{name}"
version = "1.0"
task = "ensemble"

[input]
shape = [1, 8, 8]

[[outputs]]
name = "probability"
kind = "probabilities"

[[labels]]
index = 0
code_value = "{code}"
code_scheme = "SCT"
code_meaning = "Pneumothorax"

[ensemble]
members = {members}
"""


def test_verify_ensemble_members(tmp_path: Path) -> None:
    for member in ("a", "b"):
        write_card(tmp_path, f"{member}.toml", name=member, onnx_file="tiny.onnx")
    write_model(tmp_path / "tiny.onnx")
    (tmp_path / "good.toml").write_text(
        ENSEMBLE.format(name="good", code="36118008", members='["a", "b"]')
    )
    (tmp_path / "missing.toml").write_text(
        ENSEMBLE.format(name="missing", code="36118008", members='["a", "gone"]')
    )
    (tmp_path / "nested.toml").write_text(
        ENSEMBLE.format(name="nested", code="36118008", members='["a", "good"]')
    )
    (tmp_path / "otherlabel.toml").write_text(
        ENSEMBLE.format(name="otherlabel", code="56717001", members='["a", "b"]')
    )
    verdicts = verdicts_of(tmp_path)
    assert verdicts["good"].ok, verdicts["good"].problems
    assert verdicts["good"].line() == "OK   good 1.0 mean of a, b"
    assert not verdicts["missing"].ok
    assert "ensemble member 'gone' has no card" in verdicts["missing"].line()
    assert "is itself an ensemble" in verdicts["nested"].line()
    assert "has no label SCT 56717001" in verdicts["otherlabel"].line()
    # A corrupt member ONNX file fails the ensemble, naming the member and the file.
    (tmp_path / "tiny.onnx").write_bytes(b"\x08\x07not a protobuf" + os.urandom(256))
    line = verdicts_of(tmp_path)["good"].line()
    assert line.startswith("FAIL good 1.0: member a: ")
    assert str(tmp_path / "tiny.onnx") in line


MASK_OUTPUT = '[[outputs]]\nname = "mask"\nkind = "mask"\n'


def test_verify_output_kinds_against_onnx(tmp_path: Path) -> None:
    # A segmentation card whose ONNX gives a (N, 1, 8, 8) mask: OK.
    seg = tmp_path / "seg"
    write_identity_model(write_card(seg, task="segmentation").with_suffix(".onnx"))
    card_path = seg / "tiny.toml"
    card_path.write_text(card_path.read_text().replace(OUTPUTS, MASK_OUTPUT))
    assert verdicts_of(seg)["tiny"].ok, verdicts_of(seg)["tiny"].problems

    # The same file behind a card saying boxes: wrong rank; landmarks: wrong last axis.
    for kind, message in (
        ("boxes", "a boxes output has 3 dimensions"),
        ("image", None),
        ("heatmap", None),
    ):
        card_path.write_text(
            card_path.read_text()
            .replace('kind = "mask"', f'kind = "{kind}"')
            .replace('kind = "boxes"', f'kind = "{kind}"')
            .replace('kind = "image"', f'kind = "{kind}"')
        )
        verdict = verdicts_of(seg)["tiny"]
        assert not verdict.ok, kind
        assert "a segmentation card needs an output of kind mask" in verdict.line()
        if message:
            assert message in verdict.line()

    # A classification card over a (N, 1) output with a label index 3: no room for it.
    cls = tmp_path / "cls"
    write_card(cls)
    write_model(cls / "tiny.onnx")
    text = (cls / "tiny.toml").read_text().replace("index = 0", "index = 3")
    (cls / "tiny.toml").write_text(text)
    assert "label indexes need 4 along axis 1" in verdicts_of(cls)["tiny"].line()

    # A detection card whose ONNX boxes output has rows of 5 instead of 6 values.
    det = tmp_path / "det"
    det.mkdir()
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["image", "to"], ["boxes"])],
        "det",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", "K", 4])],
        [helper.make_tensor("to", TensorProto.INT64, [3], [0, 16, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, det / "tiny.onnx")
    write_card(det, task="detection")
    (det / "tiny.toml").write_text(
        (det / "tiny.toml")
        .read_text()
        .replace(OUTPUTS, '[[outputs]]\nname = "boxes"\nkind = "boxes"\n')
    )
    line = verdicts_of(det)["tiny"].line()
    assert "output 'boxes' (boxes) has shape [2, 16, 4]; its last dimension must be 6" in line


def test_verify_2_5d_slices_are_channels(tmp_path: Path) -> None:
    # Three slices as channels, and an ONNX input of 3 channels: OK.
    good = tmp_path / "good"
    write_card(good, task="segmentation")
    write_identity_model(good / "tiny.onnx", channels=3)
    text = (good / "tiny.toml").read_text().replace(OUTPUTS, MASK_OUTPUT)
    text = text.replace("shape = [1, 8, 8]", "shape = [3, 8, 8]\nslices = 3")
    (good / "tiny.toml").write_text(text)
    assert verdicts_of(good)["tiny"].ok, verdicts_of(good)["tiny"].problems
    # slices = 3 but one channel in the card: the card is inconsistent (and the ONNX differs).
    bad = tmp_path / "bad"
    write_card(bad, task="segmentation")
    write_identity_model(bad / "tiny.onnx", channels=3)
    text = (bad / "tiny.toml").read_text().replace(OUTPUTS, MASK_OUTPUT)
    (bad / "tiny.toml").write_text(
        text.replace("shape = [1, 8, 8]", "shape = [1, 8, 8]\nslices = 3")
    )
    line = verdicts_of(bad)["tiny"].line()
    assert "2.5D input: slices = 3 are the channels, but input.shape has 1 channel(s)" in line
    assert "has shape [3, 8, 8], the card says [1, 8, 8]" in line


def test_committed_model_cards_verify() -> None:
    verdicts = verdicts_of(REPO / "models")
    assert verdicts, "no model cards in models/"
    failed = [v.line() for v in verdicts.values() if not v.ok]
    assert not failed, failed


def test_models_verify_cli_reports_ensemble(tmp_path: Path) -> None:
    folder = tmp_path / "zoo"
    for member in ("a", "b"):
        write_card(folder, f"{member}.toml", name=member, onnx_file="tiny.onnx")
    write_model(folder / "tiny.onnx")
    (folder / "e.toml").write_text(ENSEMBLE.format(name="e", code="36118008", members='["a", "x"]'))
    result = models_verify(tmp_path, folder)
    assert result.returncode == 1
    assert "OK   a 1.0 on CPUExecutionProvider" in result.stdout
    assert "FAIL e 1.0: ensemble member 'x' has no card" in result.stderr
