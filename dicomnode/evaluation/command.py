"""``dicomnode models eval MODEL --data DIR [--out DIR]``: the command around
:func:`dicomnode.evaluation.evaluate.evaluate`."""

from __future__ import annotations

import sys
from pathlib import Path

from dicomnode import RESEARCH_DEMO_NOTICE
from dicomnode.models.registry import ModelCard, discover_cards, load_card
from dicomnode.tomlfile import ConfigError


def resolve_card(model: str, cards: list[ModelCard]) -> tuple[ModelCard, dict[str, ModelCard]]:
    """The card named ``model`` (a model name or a card file) and every card by name (the
    configured ones, plus those beside a card file), for ensembles."""
    by_name = {card.model.name: card for card in cards}
    path = Path(model)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"model card {path} does not exist")
        card = load_card(path)
        for sibling in discover_cards([path.resolve().parent]):
            by_name.setdefault(sibling.model.name, sibling)
        by_name[card.model.name] = card
        return card, by_name
    if model not in by_name:
        known = ", ".join(sorted(by_name)) or "none"
        raise LookupError(f"no model card named {model!r} (configured cards: {known})")
    return by_name[model], by_name


def run(model: str, data_folder: Path, out: Path | None, cards: list[ModelCard]) -> int:
    """Evaluate, write metrics.json and plots, print the table; 2 on a usage error."""
    from dicomnode.evaluation import dataset

    try:
        card, members = resolve_card(model, cards)
        data = dataset.load_data(data_folder)
    except (LookupError, FileNotFoundError, ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Imported once the arguments are known good: the pipeline, onnxruntime and matplotlib
    # take ~2 s to import, which a mistyped model name or folder need not wait for.
    from dicomnode.evaluation import evaluate

    out = out or data_folder / "eval" / card.model.name

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{card.model.name}: {done}/{total} cases", end="", file=sys.stderr)

    try:
        result = evaluate.evaluate(card, data, members=members, progress=progress)
    except (KeyError, ValueError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    if sys.stderr.isatty():
        print(file=sys.stderr)
    files = evaluate.write_outputs(result, out)
    print(evaluate.table(result))
    print(f"wrote {', '.join(str(f) for f in files)}")
    if card.model.research_demo:
        print(RESEARCH_DEMO_NOTICE)
    return 0
