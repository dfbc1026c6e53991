"""``dicomnode models verify``: each card against its ONNX file (or, for an ensemble, its
member cards), with one clear message per problem.

Checks: the ONNX file loads and its input matches the card (``load_session``); the card's
outputs fit its task; a 2.5D card's channels equal its slices; every output, run on a blank
input of the card's shape, has the shape its kind needs (probabilities/logits (N, L), heatmap
and mask (N, L, h, w), boxes (N, K, 6), landmarks (N, L, 3), image (N, 1, H, W)) with room for
every label index; an ensemble's members exist, are not ensembles, carry every one of its labels
and verify themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicomnode.models.registry import ModelCard

# The output kinds each task needs (any one of them).
TASK_OUTPUTS: dict[str, tuple[str, ...]] = {
    "classification": ("probabilities", "logits"),
    "multi-label": ("probabilities", "logits"),
    "segmentation": ("mask",),
    "detection": ("boxes",),
    "landmark": ("landmarks",),
    "image-to-image": ("image",),
}
# Rank of each output kind and the fixed size of its last axis (None = any).
KIND_SHAPES: dict[str, tuple[int, int | None]] = {
    "probabilities": (2, None),
    "logits": (2, None),
    "heatmap": (4, None),
    "mask": (4, None),
    "boxes": (3, 6),
    "landmarks": (3, 3),
    "image": (4, None),
}
# Kinds whose axis 1 runs over the labels (by index).
PER_LABEL_KINDS = ("probabilities", "logits", "heatmap", "mask", "landmarks")


@dataclass(frozen=True)
class Verdict:
    """The outcome for one card: problems (empty = OK) and what ran it."""

    card: ModelCard
    problems: tuple[str, ...]
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        name = f"{self.card.model.name} {self.card.model.version}"
        if self.ok:
            return f"OK   {name} {self.detail}".rstrip()
        return "\n".join(f"FAIL {name}: {problem}" for problem in self.problems)


def card_problems(card: ModelCard) -> list[str]:
    """What is wrong with a card on its own (no ONNX file needed)."""
    problems = []
    task = card.model.task
    kinds = [o.kind for o in card.outputs]
    if task in TASK_OUTPUTS and not any(k in kinds for k in TASK_OUTPUTS[task]):
        problems.append(
            f"a {task} card needs an output of kind {' or '.join(TASK_OUTPUTS[task])} "
            f"(it has {', '.join(kinds)})"
        )
    if card.input.slices > 1 and card.input.shape[0] != card.input.slices:
        problems.append(
            f"2.5D input: slices = {card.input.slices} are the channels, but input.shape has "
            f"{card.input.shape[0]} channel(s)"
        )
    if task != "image-to-image" and not card.labels:
        problems.append("the card has no labels")
    return problems


def output_problems(card: ModelCard, outputs: dict[str, np.ndarray], batch: int) -> list[str]:
    """Problems of the outputs of a run on ``batch`` blank inputs, against the card."""
    problems = []
    needed = max((label.index for label in card.labels), default=-1) + 1
    for spec in card.outputs:
        value = outputs.get(spec.name)
        if value is None:
            problems.append(f"output {spec.name!r} was not returned")
            continue
        shape = tuple(np.shape(value))
        rank, last = KIND_SHAPES[spec.kind]
        where = f"output {spec.name!r} ({spec.kind}) has shape {list(shape)}"
        if len(shape) != rank:
            problems.append(f"{where}; a {spec.kind} output has {rank} dimensions")
            continue
        if shape[0] != batch:
            problems.append(f"{where} for a batch of {batch}")
        if last is not None and shape[-1] != last:
            problems.append(f"{where}; its last dimension must be {last}")
        if spec.kind in PER_LABEL_KINDS and shape[1] < needed:
            problems.append(f"{where}; the card's label indexes need {needed} along axis 1")
        if spec.kind == "image" and shape[1] != 1:
            problems.append(f"{where}; an image output has 1 channel")
        if spec.kind == "mask" and shape[2:] != tuple(card.input.shape[1:]):
            rows, cols = card.input.shape[1:]
            if rows * shape[3] != cols * shape[2]:
                problems.append(f"{where}; its aspect differs from the input's {rows} x {cols}")
        if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.isfinite(value).all():
            problems.append(f"output {spec.name!r} is not finite on a blank input")
    return problems


def _onnx_verdict(card: ModelCard, providers: list[str]) -> Verdict:
    from dicomnode.pipeline.sessions import ModelLoadError, load_session

    problems = card_problems(card)
    try:
        session = load_session(card, providers)
    except ModelLoadError as exc:
        return Verdict(card, (*problems, str(exc)))
    shape = next(i.shape for i in session.get_inputs() if i.name == card.input.name)
    batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else 2
    blank = np.zeros((batch, *card.input.shape), dtype=np.float32)
    names = [spec.name for spec in card.outputs]
    try:
        values = session.run(names, {card.input.name: blank})
    except Exception as exc:  # onnxruntime raises its own exception types
        problems.append(
            f"{card.onnx_path} fails on a blank input of shape {list(blank.shape)}: {exc}"
        )
    else:
        problems += output_problems(card, dict(zip(names, values, strict=True)), batch)
    return Verdict(card, tuple(problems), f"on {session.get_providers()[0]}")


def _ensemble_verdict(
    card: ModelCard, by_name: dict[str, ModelCard], providers: list[str]
) -> Verdict:
    assert card.ensemble is not None
    problems = []
    for name in card.ensemble.members:
        member = by_name.get(name)
        if member is None:
            problems.append(f"ensemble member {name!r} has no card (known: {sorted(by_name)})")
            continue
        if member.model.task == "ensemble":
            problems.append(f"ensemble member {name!r} is itself an ensemble")
            continue
        if member.model.task not in ("classification", "multi-label"):
            problems.append(f"ensemble member {name!r} is a {member.model.task} model")
        codes = {(lb.code_scheme, lb.code_value) for lb in member.labels}
        for label in card.labels:
            if (label.code_scheme, label.code_value) not in codes:
                problems.append(
                    f"ensemble member {name!r} has no label {label.code_scheme} "
                    f"{label.code_value} ({label.code_meaning})"
                )
        verdict = _onnx_verdict(member, providers)
        problems += [f"member {name}: {problem}" for problem in verdict.problems]
    if not card.labels:
        problems.append("the card has no labels")
    members = ", ".join(card.ensemble.members)
    return Verdict(card, tuple(problems), f"{card.ensemble.combine} of {members}")


def verify_card(card: ModelCard, by_name: dict[str, ModelCard], providers: list[str]) -> Verdict:
    """Verify one card (``by_name``: every card by model name, for ensembles)."""
    if card.model.task == "ensemble":
        return _ensemble_verdict(card, by_name, providers)
    return _onnx_verdict(card, providers)


def verify_cards(cards: list[ModelCard], providers: list[str]) -> list[Verdict]:
    """Verify every card."""
    by_name = {card.model.name: card for card in cards}
    return [verify_card(card, by_name, providers) for card in cards]
