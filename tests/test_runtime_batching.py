"""The inference runtime batches concurrent callers of the same model into one session.run,
with real ONNX models built here: each caller gets exactly its own rows, a failing batch fails
every caller, a NaN fails only the caller whose rows it is in, IO binding and thread settings
take effect."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from dicomnode.config import InferenceSettings
from dicomnode.models.registry import ModelCard, load_card
from dicomnode.pipeline import sessions
from dicomnode.pipeline.batching import MicroBatcher, batch_buckets, output_specs
from dicomnode.pipeline.runtime import Runtime

CARD = """\
[model]
name = "{name}"
version = "1.0"
task = "classification"
onnx = "{name}.onnx"

[input]
name = "image"
shape = [1, 8, 8]

[[outputs]]
name = "probability"
kind = "probabilities"

[[outputs]]
name = "cam"
kind = "heatmap"

[[labels]]
index = 0
code_value = "36118008"
code_scheme = "SCT"
code_meaning = "Pneumothorax"
threshold = 0.5
critical = true
"""


def make_model(
    folder: Path, name: str, *, batch: int | str = "N", guard: bool = False
) -> ModelCard:
    """image [N,1,8,8] -> probability = sigmoid(mean) [N,1], cam = sqrt(image) [N,1,8,8].

    cam is NaN where a pixel is negative. ``guard`` adds sigmoid's input a Gather whose
    index is the image's maximum: images with a pixel >= 3 make the run fail (index out of
    bounds), as a real model fails on input it cannot take. ``batch`` fixes the batch axis.
    """
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0),
        helper.make_node("Sqrt", ["image"], ["cam"]),
    ]
    initializers = []
    logits = "mean"
    if guard:
        initializers.append(helper.make_tensor("table", TensorProto.FLOAT, [3], [0.0, 0.0, 0.0]))
        nodes += [
            helper.make_node("ReduceMax", ["image"], ["peak"], axes=[2, 3], keepdims=0),
            helper.make_node("Cast", ["peak"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["offset"]),
            helper.make_node("Add", ["mean", "offset"], ["guarded"]),
        ]
        logits = "guarded"
    nodes.append(helper.make_node("Sigmoid", [logits], ["probability"]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [
            helper.make_tensor_value_info("probability", TensorProto.FLOAT, [batch, 1]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, [batch, 1, 8, 8]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / f"{name}.onnx"))
    card = folder / f"{name}.toml"
    card.write_text(CARD.format(name=name), encoding="utf-8")
    return load_card(card)


def images(seed: int, count: int, low: float = 0.0, high: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, (count, 1, 8, 8)).astype(np.float32)


def alone(card: ModelCard, batch: np.ndarray) -> dict[str, np.ndarray]:
    """What a bare onnxruntime session gives for ``batch``, one image at a time."""
    session = ort.InferenceSession(str(card.onnx_path), providers=["CPUExecutionProvider"])
    rows = [
        session.run(["probability", "cam"], {"image": batch[i : i + 1]}) for i in range(len(batch))
    ]
    return {
        "probability": np.concatenate([r[0] for r in rows]),
        "cam": np.concatenate([r[1] for r in rows]),
    }


class CountingRuns:
    """Counts the real session.run calls of a session (and the images in each)."""

    def __init__(self, session: ort.InferenceSession):
        self.sizes: list[int] = []
        real = session.run

        def run(names, feeds, *args, **kwargs):
            self.sizes.append(len(feeds["image"]))
            return real(names, feeds, *args, **kwargs)

        session.run = run


def concurrently(runtime: Runtime, card: ModelCard, batches: list[np.ndarray]) -> list:
    """Each batch from its own thread, all released at once; outputs or the exception."""
    results: list = [None] * len(batches)
    start = threading.Barrier(len(batches))

    def call(index: int) -> None:
        start.wait()
        try:
            results[index] = runtime.run(card, batches[index])
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def registered_analyses(
    runtime: Runtime, analyses: list[tuple[ModelCard, float]]
) -> tuple[list, float]:
    """Each analysis in its own thread, registered with the runtime, runs its model on one
    image (``images(index, 1)``) after its delay (its preprocessing); their outputs (or the
    exception) and the seconds until all had returned."""
    registered = threading.Barrier(len(analyses))
    results: list = [None] * len(analyses)

    def analysis(index: int, model: ModelCard, delay: float) -> None:
        with runtime.caller():
            registered.wait()
            time.sleep(delay)
            try:
                results[index] = runtime.run(model, images(index, 1))
            except Exception as exc:
                results[index] = exc

    threads = [
        threading.Thread(target=analysis, args=(index, model, delay))
        for index, (model, delay) in enumerate(analyses)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results, time.monotonic() - started


def test_concurrent_callers_get_exactly_their_own_rows(tmp_path: Path) -> None:
    card = make_model(tmp_path, "tiny")
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(batch_size=8, max_wait_ms=500))
    counted = CountingRuns(runtime.session(card))
    # 12 callers, 1 or 2 images each: 18 images, at most 8 per run.
    batches = [images(seed, 1 + seed % 2) for seed in range(12)]

    results = concurrently(runtime, card, batches)

    for batch, outputs in zip(batches, results, strict=True):
        assert isinstance(outputs, dict), outputs
        expected = alone(card, batch)
        assert outputs["probability"].shape == (len(batch), 1)
        assert outputs["cam"].shape == (len(batch), 1, 8, 8)
        np.testing.assert_allclose(outputs["probability"], expected["probability"], rtol=1e-5)
        np.testing.assert_allclose(outputs["cam"], expected["cam"], rtol=1e-5)
    # Coalesced: fewer runs than callers, none above the batch size, every image run once.
    assert sum(counted.sizes) == 18
    assert max(counted.sizes) <= 8
    assert len(counted.sizes) < 12
    assert len(counted.sizes) >= 3
    stats = runtime.stats(card)
    assert (stats.runs, stats.requests, stats.images) == (len(counted.sizes), 12, 18)


def test_a_full_batch_runs_without_waiting(tmp_path: Path) -> None:
    card = make_model(tmp_path, "tiny")
    # A minute's wait would time the test out; a full batch must not wait at all.
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(batch_size=4, max_wait_ms=60_000))
    batch = images(1, 4)
    outputs = runtime.run(card, batch)
    np.testing.assert_allclose(outputs["cam"], alone(card, batch)["cam"], rtol=1e-5)


def test_a_failing_batch_fails_every_caller(tmp_path: Path) -> None:
    card = make_model(tmp_path, "guarded", guard=True)
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(batch_size=2, max_wait_ms=5_000))
    counted = CountingRuns(runtime.session(card))
    good, bad = images(1, 1), images(2, 1, low=4.0, high=5.0)

    results = concurrently(runtime, card, [good, bad])

    assert counted.sizes == [2]
    for result in results:
        assert isinstance(result, Exception), result
        assert "out of" in str(result) and "bounds" in str(result)
    assert type(results[0]) is type(results[1])
    # The runtime goes on: the good image alone runs.
    outputs = runtime.run(card, good)
    np.testing.assert_allclose(
        outputs["probability"], 1 / (1 + np.exp(-good.mean(axis=(2, 3)))), rtol=1e-5
    )


def test_nan_check_fails_only_the_caller_whose_output_is_nan(tmp_path: Path) -> None:
    card = make_model(tmp_path, "tiny")
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(batch_size=2, max_wait_ms=5_000))
    counted = CountingRuns(runtime.session(card))
    finite, negative = images(3, 1), images(4, 1, low=-2.0, high=-1.0)

    results = concurrently(runtime, card, [finite, negative])

    assert counted.sizes == [2]
    assert isinstance(results[1], ValueError)
    assert "'cam' contains NaN" in str(results[1])
    np.testing.assert_allclose(results[0]["cam"], alone(card, finite)["cam"], rtol=1e-5)


def test_nan_rows_fail_their_request_and_outputs_are_checked_once_a_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = make_model(tmp_path, "tiny")
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(batch_size=5, max_wait_ms=5_000))
    counted = CountingRuns(runtime.session(card))
    checks: list[int] = []
    real_isfinite = np.isfinite

    def isfinite(value: np.ndarray) -> np.ndarray:
        if np.ndim(value) >= 2:  # the model's outputs (not a scalar checked elsewhere)
            checks.append(len(value))
        return real_isfinite(value)

    monkeypatch.setattr(np, "isfinite", isfinite)
    # Requests of 2, 1 and 2 images; the third's second image gives NaN in cam.
    clean, single = images(5, 2), images(6, 1)
    mixed = np.concatenate([images(7, 1), images(8, 1, low=-2.0, high=-1.0)])

    results = concurrently(runtime, card, [clean, single, mixed])

    assert counted.sizes == [5]
    assert isinstance(results[2], ValueError) and "'cam' contains NaN" in str(results[2])
    for batch, outputs in zip([clean, single], results, strict=False):
        np.testing.assert_allclose(outputs["cam"], alone(card, batch)["cam"], rtol=1e-5)
    # One look at each output of the batch of 5 (and the rows of the one with NaN), not one
    # per caller.
    assert checks == [5, 5]


def test_model_with_fixed_batch_axis_is_never_batched(tmp_path: Path) -> None:
    card = make_model(tmp_path, "single", batch=1)
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(batch_size=8, max_wait_ms=50))
    counted = CountingRuns(runtime.session(card))
    batches = [images(seed, 1) for seed in range(4)]

    results = concurrently(runtime, card, batches)

    assert counted.sizes == [1, 1, 1, 1]
    for batch, outputs in zip(batches, results, strict=True):
        np.testing.assert_allclose(outputs["probability"], alone(card, batch)["probability"])


@pytest.mark.parametrize("bound_outputs", ["auto", "off"])
def test_io_binding_gives_the_plain_run_outputs(tmp_path: Path, bound_outputs: str) -> None:
    card = make_model(tmp_path, "tiny")
    settings = InferenceSettings(io_binding="on", bound_outputs=bound_outputs)
    bound = Runtime(["CPUExecutionProvider"], settings)
    plain = Runtime(["CPUExecutionProvider"], InferenceSettings(io_binding="off"))
    batch = images(5, 3)
    # IO binding bypasses session.run: a run through it is not counted here.
    counted = CountingRuns(bound.session(card))
    with_binding, without = bound.run(card, batch), plain.run(card, batch)
    assert counted.sizes == []
    # Outputs of known shape are written into the dispatcher's reused buffers ("auto").
    reused = bound._model(card).batcher.outputs is not None
    assert reused == (bound_outputs == "auto")
    for name in ("probability", "cam"):
        np.testing.assert_allclose(with_binding[name], without[name], rtol=1e-6)
    # The buffers of this shape are reused: the next batch gets its own outputs, and the
    # first caller's outputs stay its own.
    second = images(6, 3)
    np.testing.assert_allclose(bound.run(card, second)["cam"], alone(card, second)["cam"])
    np.testing.assert_allclose(with_binding["cam"], alone(card, batch)["cam"], rtol=1e-6)
    np.testing.assert_allclose(with_binding["probability"], without["probability"], rtol=1e-6)


def test_warm_up_falls_back_when_outputs_cannot_be_bound_to_host_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Should a provider refuse to write outputs into host buffers, warm-up finds it out and
    the model's outputs are copied back after each run instead: studies are not failed."""
    card = make_model(tmp_path, "tiny")
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(io_binding="on"))
    real = Runtime._execute_bound

    def refusing(model, batch, names, out):
        if out is not None:
            raise RuntimeError("output bound to an unsupported location")
        return real(model, batch, names, out)

    monkeypatch.setattr(Runtime, "_execute_bound", staticmethod(refusing))
    assert runtime._model(card).batcher.outputs is not None
    runtime.warm_up(card)
    assert runtime._model(card).batcher.outputs is None
    assert "does not write outputs into host buffers" in caplog.text
    batch = images(7, 2)
    np.testing.assert_allclose(runtime.run(card, batch)["cam"], alone(card, batch)["cam"])


def test_output_buffers_are_made_only_for_outputs_of_known_shape(tmp_path: Path) -> None:
    card = make_model(tmp_path, "tiny")
    session = ort.InferenceSession(str(card.onnx_path), providers=["CPUExecutionProvider"])
    assert output_specs(session, ["cam", "probability"]) == [
        ((1, 8, 8), np.dtype(np.float32)),
        ((1,), np.dtype(np.float32)),
    ]
    # A fixed batch axis, or another axis of free size: onnxruntime allocates them.
    (tmp_path / "fixed").mkdir()
    fixed = make_model(tmp_path / "fixed", "fixed", batch=1)
    assert output_specs(ort.InferenceSession(str(fixed.onnx_path)), ["cam"]) is None
    free = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["cam"])],
        "free",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", 1, "H", "W"])],
    )
    model = helper.make_model(free, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "free.onnx"
    onnx.save(model, str(path))
    assert output_specs(ort.InferenceSession(str(path)), ["cam"]) is None


def test_thread_settings_and_providers_are_logged_and_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    card = make_model(tmp_path, "tiny")
    settings = InferenceSettings(intra_op_threads=1, inter_op_threads=2, execution_mode="parallel")
    caplog.set_level(logging.INFO, logger="dicomnode.runtime")
    session = Runtime(["CUDAExecutionProvider", "CPUExecutionProvider"], settings).session(card)
    options = session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 2)
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert session.get_providers()[0] == "CPUExecutionProvider"
    assert "tiny 1.0 loaded, running on CPUExecutionProvider" in caplog.text
    assert "CUDAExecutionProvider is not used; it runs on CPUExecutionProvider" in caplog.text


def _host(monkeypatch: pytest.MonkeyPatch, cores: int, quota: int | None = None) -> None:
    """A host of 8 CPUs of which this process may run on ``cores`` (its affinity), with a
    container's CPU quota of ``quota`` CPUs (None: no quota)."""
    import loky.backend.context as loky_context

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(
        loky_context, "_cpu_count_cgroup", lambda count: count if quota is None else quota
    )
    monkeypatch.delenv(sessions.WORKERS_ON_HOST, raising=False)


def test_cpu_runs_one_thread_each_and_a_batch_per_core_by_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU a run takes one thread and as many batches run at once as there are cores
    (for the small demo models more images per second than one run on every core); set
    thread counts are kept, and in_flight follows them."""
    card = make_model(tmp_path, "tiny")
    _host(monkeypatch, cores=4)
    caplog.set_level(logging.INFO, logger="dicomnode.runtime")
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings())
    assert runtime.session(card).get_session_options().intra_op_num_threads == 1
    assert runtime.in_flight(card) == 4
    assert "intra-op threads 1," in caplog.text
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(intra_op_threads=2))
    assert runtime.session(card).get_session_options().intra_op_num_threads == 2
    assert runtime.in_flight(card) == 2
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(in_flight=1))
    assert runtime.in_flight(card) == 1
    # Several batches at once still give every caller exactly its own rows.
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(batch_size=2))
    batches = [images(seed, 1) for seed in range(32)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda batch: runtime.run(card, batch), batches))
    for result, batch in zip(got, batches, strict=True):
        want = alone(card, batch)
        np.testing.assert_allclose(result["probability"], want["probability"], rtol=1e-6)
        np.testing.assert_allclose(result["cam"], want["cam"], rtol=1e-6)
    assert runtime.stats(card).largest == 2


def test_runs_at_once_follow_a_container_quota_and_the_workers_sharing_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container limited to 1.5 CPUs of a host whose 8 cores it may run on gets 2 runs at
    once, not 8; workers started together by serve share the cores between them."""
    card = make_model(tmp_path, "tiny")
    _host(monkeypatch, cores=8, quota=2)  # loky rounds a quota of 1.5 CPUs up to 2
    assert Runtime(["CPUExecutionProvider"], InferenceSettings()).in_flight(card) == 2
    _host(monkeypatch, cores=8)
    assert Runtime(["CPUExecutionProvider"], InferenceSettings()).in_flight(card) == 8
    monkeypatch.setenv(sessions.WORKERS_ON_HOST, "3")
    assert Runtime(["CPUExecutionProvider"], InferenceSettings()).in_flight(card) == 2
    monkeypatch.setenv(sessions.WORKERS_ON_HOST, "16")
    assert Runtime(["CPUExecutionProvider"], InferenceSettings()).in_flight(card) == 1


def test_a_lone_registered_caller_does_not_wait(tmp_path: Path) -> None:
    card = make_model(tmp_path, "tiny")
    # A minute's wait would time the test out: with every registered analysis already waiting
    # on the runtime, nobody else can join the batch.
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(batch_size=8, max_wait_ms=60_000))
    batch = images(2, 1)
    with runtime.caller():
        outputs = runtime.run(card, batch)
    np.testing.assert_allclose(outputs["cam"], alone(card, batch)["cam"], rtol=1e-5)


def test_registered_callers_wait_for_each_other_but_not_longer(tmp_path: Path) -> None:
    card = make_model(tmp_path, "tiny")
    other = make_model(tmp_path, "other")
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(batch_size=8, max_wait_ms=60_000))
    counted = CountingRuns(runtime.session(card))
    runtime.session(other)
    # Two analyses on the same model, the second 0.3 s later; a third waits on another model.
    results, seconds = registered_analyses(runtime, [(card, 0.0), (card, 0.3), (other, 0.1)])
    assert seconds < 10
    assert all(isinstance(r, dict) for r in results), results
    # The first caller waited for the second (one run of two images), not for max_wait.
    assert counted.sizes == [2]
    for index in (0, 1):
        expected = alone(card, images(index, 1))
        np.testing.assert_allclose(results[index]["cam"], expected["cam"], rtol=1e-5)


def test_gpu_batch_sizes_are_powers_of_two_up_to_the_limit() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)


def test_a_padded_batch_gives_each_caller_only_its_own_rows(tmp_path: Path) -> None:
    card = make_model(tmp_path, "tiny")
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(batch_size=8, max_wait_ms=500))
    # As on a GPU provider: batches padded to powers of two.
    runtime._model(card).batcher.buckets = batch_buckets(8)
    fed: list[np.ndarray] = []
    session = runtime.session(card)
    real = session.run
    session.run = lambda names, feeds: fed.append(feeds["image"].copy()) or real(names, feeds)
    alone_batch = images(8, 3)
    together = [images(9, 2), images(10, 1), images(11, 2)]

    outputs = runtime.run(card, alone_batch)
    results = concurrently(runtime, card, together)

    # 3 images padded to 4; then 5 images in one run, padded to 8 (or fewer, smaller runs).
    assert len(fed[0]) == 4
    assert not fed[0][3].any()
    assert all(len(f) in (1, 2, 4, 8) for f in fed)
    assert sum(len(f) for f in fed[1:]) >= 5
    for batch, result in [(alone_batch, outputs), *zip(together, results, strict=True)]:
        assert isinstance(result, dict), result
        assert result["probability"].shape == (len(batch), 1)
        expected = alone(card, batch)
        for name in ("probability", "cam"):
            np.testing.assert_allclose(result[name], expected[name], rtol=1e-5)


def test_warm_up_runs_every_gpu_batch_size_once(tmp_path: Path) -> None:
    card = make_model(tmp_path, "tiny")
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(batch_size=8))
    counted = CountingRuns(runtime.session(card))
    runtime.warm_up(card)
    assert counted.sizes == [1]
    runtime._model(card).batcher.buckets = batch_buckets(8)
    runtime.warm_up(card)
    assert counted.sizes == [1, 1, 2, 4, 8]


def test_the_last_registered_caller_of_a_model_runs_the_batch_at_once(tmp_path: Path) -> None:
    card = make_model(tmp_path, "tiny")
    # A minute's wait would time the test out: the second of two registered analyses on the
    # same model completes the batch; nobody else can come.
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(batch_size=8, max_wait_ms=60_000))
    counted = CountingRuns(runtime.session(card))
    results, seconds = registered_analyses(runtime, [(card, 0.0), (card, 0.2)])
    assert seconds < 5
    assert counted.sizes == [2]
    for index in range(2):
        np.testing.assert_allclose(results[index]["cam"], alone(card, images(index, 1))["cam"])


def test_a_batch_wakes_its_callers_once_the_full_batch_behind_it_is_joined() -> None:
    """Woken at once, a finished batch's callers took the GIL and a core from the next
    batch's join; they are woken after it, each with its own rows."""
    runs: list[list[float]] = []
    second_queued = threading.Event()

    def execute(batch: np.ndarray, out: list[np.ndarray] | None) -> list[np.ndarray]:
        runs.append(sorted(batch[:, 0].tolist()))
        if len(runs) == 1:
            second_queued.wait(10)  # the first batch runs until the second is queued
        return [batch * 2]

    batcher = MicroBatcher(execute, max_batch=2, max_wait=60.0)
    joined_at: list[float] = []
    real_join = batcher._join

    def slow_join(group: list) -> np.ndarray:
        if runs:
            time.sleep(0.3)  # the second batch's join, while the first's callers wait
        joined = real_join(group)
        joined_at.append(time.monotonic())
        return joined

    batcher._join = slow_join
    returned: dict[float, tuple[float, float]] = {}

    def call(value: float) -> None:
        rows = batcher.submit(np.full((1, 1), value, np.float32))[0]
        returned[value] = (time.monotonic(), float(rows[0, 0]))

    first = [threading.Thread(target=call, args=(v,)) for v in (1.0, 2.0)]
    for thread in first:
        thread.start()
    deadline = time.monotonic() + 10
    while not runs and time.monotonic() < deadline:
        time.sleep(0.01)
    second = [threading.Thread(target=call, args=(v,)) for v in (3.0, 4.0)]
    for thread in second:
        thread.start()
    while batcher._queued < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    second_queued.set()
    for thread in first + second:
        thread.join(timeout=10)

    assert runs == [[1.0, 2.0], [3.0, 4.0]]
    assert {value: doubled for value, (_, doubled) in returned.items()} == {
        1.0: 2.0,
        2.0: 4.0,
        3.0: 6.0,
        4.0: 8.0,
    }
    assert min(returned[1.0][0], returned[2.0][0]) >= joined_at[1]


def test_waking_a_batcher_with_nothing_queued_takes_no_lock() -> None:
    """Every analysis wakes every other model's batcher each time it waits on one: those
    with nothing queued have no dispatcher collecting, and are not locked for nothing."""
    batcher = MicroBatcher(lambda batch, out: [batch], max_batch=4, max_wait=60.0)
    notified: list[int] = []

    class Counting(threading.Condition):
        def notify_all(self) -> None:
            notified.append(len(batcher._queue))
            super().notify_all()

    batcher._cond = Counting()
    batcher.wake()
    assert notified == []
    # A request waits for a full batch (a minute): a wake reaches its dispatcher.
    caller = threading.Thread(target=batcher.submit, args=(np.zeros((1, 2), np.float32),))
    caller.start()
    deadline = time.monotonic() + 10
    while not batcher._queue and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher.wake()
    assert notified == [1]
    batcher.max_batch = 1  # its batch is full now: let it go
    batcher.wake()
    caller.join(timeout=10)
    assert not caller.is_alive()


def test_an_idle_dispatcher_ends_and_a_new_request_starts_another(tmp_path: Path) -> None:
    card = make_model(tmp_path, "tiny")
    runtime = Runtime(["CPUExecutionProvider"], InferenceSettings(batch_size=2, max_wait_ms=0))
    batcher = runtime._model(card).batcher
    # Long enough that none has ended by the check after the first run, however slowly a
    # loaded machine gets there (0.2 s need not be).
    batcher.IDLE_SECONDS = 2.0
    first, second = images(12, 1), images(13, 1)
    np.testing.assert_allclose(runtime.run(card, first)["cam"], alone(card, first)["cam"])
    assert batcher.dispatchers == batcher.in_flight >= 1
    deadline = time.monotonic() + 30
    while batcher.dispatchers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batcher.dispatchers == 0
    np.testing.assert_allclose(runtime.run(card, second)["cam"], alone(card, second)["cam"])


class OverlappingRuns:
    """Makes each session.run of a session take ``seconds`` longer and records how many
    were running at once. The first ``meet`` runs wait for each other (at most 10 s), so
    that that many at once is seen however slowly a loaded machine starts them; fewer at
    once break the barrier and the runs fail."""

    def __init__(self, session: ort.InferenceSession, seconds: float, meet: int = 1):
        self.running = 0
        self.most = 0
        started = 0
        lock = threading.Lock()
        first = threading.Barrier(meet, timeout=10)
        real = session.run

        def run(names, feeds, *args, **kwargs):
            nonlocal started
            with lock:
                self.running += 1
                self.most = max(self.most, self.running)
                started += 1
                meets = started <= meet
            try:
                if meets:
                    first.wait()
                time.sleep(seconds)
                return real(names, feeds, *args, **kwargs)
            finally:
                with lock:
                    self.running -= 1

        session.run = run


@pytest.mark.parametrize("in_flight", [1, 2])
def test_in_flight_batches_of_one_model_run_at_once(tmp_path: Path, in_flight: int) -> None:
    card = make_model(tmp_path, "tiny")
    settings = InferenceSettings(batch_size=2, max_wait_ms=50, in_flight=in_flight)
    runtime = Runtime(["CPUExecutionProvider"], settings)
    overlapping = OverlappingRuns(runtime.session(card), 0.2, meet=in_flight)
    batches = [images(40 + seed, 1) for seed in range(8)]  # four full batches

    results = concurrently(runtime, card, batches)

    for batch, outputs in zip(batches, results, strict=True):
        assert isinstance(outputs, dict), outputs
        np.testing.assert_allclose(outputs["cam"], alone(card, batch)["cam"], rtol=1e-5)
    assert overlapping.most == in_flight
    assert runtime._model(card).batcher.dispatchers == in_flight


def test_batches_in_flight_through_io_binding_keep_their_own_buffers(tmp_path: Path) -> None:
    card = make_model(tmp_path, "tiny")
    settings = InferenceSettings(batch_size=4, max_wait_ms=1, io_binding="on", in_flight=3)
    runtime = Runtime(["CPUExecutionProvider"], settings)
    session = runtime.session(card)
    real = session.run_with_iobinding

    def slow_run(binding, *args, **kwargs):
        time.sleep(0.02)  # between filling the bound buffer and running on it
        return real(binding, *args, **kwargs)

    session.run_with_iobinding = slow_run
    # Rounds of 12 callers with 1-3 images each: batches of the same size run at once in
    # three threads; a buffer shared between them would hand callers others' rows.
    for round_ in range(5):
        batches = [images(100 * round_ + seed, 1 + seed % 3) for seed in range(12)]
        results = concurrently(runtime, card, batches)
        for batch, outputs in zip(batches, results, strict=True):
            assert isinstance(outputs, dict), outputs
            np.testing.assert_allclose(outputs["cam"], alone(card, batch)["cam"], rtol=1e-5)
            np.testing.assert_allclose(
                outputs["probability"], alone(card, batch)["probability"], rtol=1e-5
            )


def test_gpu_join_buffers_are_pinned_once_and_unpinned_when_the_dispatcher_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dicomnode.pipeline.batching as batching

    pinned: list[int] = []
    unpinned: list[int] = []
    monkeypatch.setattr(batching, "pin", lambda a: pinned.append(a.ctypes.data) or True)
    monkeypatch.setattr(batching, "unpin", lambda a: unpinned.append(a.ctypes.data))

    def doubled_into(batch: np.ndarray, out: list[np.ndarray] | None) -> list[np.ndarray]:
        assert out is not None and out[0].shape == batch.shape
        np.multiply(batch, 2, out=out[0])
        return out

    spec = [((1, 8, 8), np.dtype(np.float32))]
    doubled = MicroBatcher(doubled_into, 4, 0.001, buckets=(4,), pinned=True, outputs=spec)
    # The dispatcher lives through the three rounds (0.2 s could end it between two on a
    # loaded machine: pinned again, 4 pins), then ends.
    doubled.IDLE_SECONDS = 2.0
    for _ in range(3):  # every batch is padded to 4: joined, always in the same buffers
        batches = [images(seed, 1) for seed in range(3)]
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(doubled.submit, batches))
        for batch, outputs in zip(batches, results, strict=True):
            np.testing.assert_array_equal(outputs[0], batch * 2)
    # The join buffer and the output buffer, each pinned once; the callers' rows are copies.
    assert len(pinned) == 2
    assert all(outputs[0].base is None for outputs in results)
    deadline = time.monotonic() + 30
    while doubled.dispatchers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(unpinned) == sorted(pinned)


def test_without_a_cuda_runtime_nothing_is_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomnode.pipeline import pinned

    monkeypatch.setattr(pinned, "cuda_runtime", lambda: None)
    assert pinned.pin(np.zeros((4, 4), np.float32)) is False
    pinned.unpin(np.zeros((4, 4), np.float32))  # nothing to undo, no error


def test_the_workers_serve_starts_know_how_many_share_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve's workers each size their CPU runs by their share of the cores: every worker it
    starts, and one it restarts, is told how many there are."""
    import subprocess

    from dicomnode.serve import WorkerPool

    started: list[dict[str, str]] = []

    class Recorded:
        def __init__(self, command: list[str], env: dict[str, str]) -> None:
            started.append(env)

        def poll(self) -> int:
            return 1

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    pool = WorkerPool(tmp_path / "dicomnode.toml", 3)
    assert [env[sessions.WORKERS_ON_HOST] for env in started] == ["3", "3", "3"]
    stop = threading.Event()
    monkeypatch.setattr(stop, "wait", lambda seconds: len(started) > 3)
    pool.supervise(stop)
    assert started[3][sessions.WORKERS_ON_HOST] == "3"
    assert started[3]["PATH"] == os.environ["PATH"]
