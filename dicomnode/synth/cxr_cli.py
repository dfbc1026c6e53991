"""``dicomnode synth cxr``: its options and the command (imports numpy only when run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicomnode.synth.cxr_names import FINDINGS, MODALITIES, PHOTOMETRICS, VIEWS


def _names(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    wrong = [name for name in names if name not in allowed]
    if wrong or not names:
        raise argparse.ArgumentTypeError(
            f"{what} must be a comma-separated list of {', '.join(allowed)}; got {text!r}"
        )
    return names


def _views(text: str) -> tuple[str, ...]:
    return _names(text.upper(), VIEWS, "--views")


def _findings(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("all", ""):
        return FINDINGS if text.strip() else ()
    return _names(text.lower(), FINDINGS, "--findings")


def _prevalence(text: str) -> float | dict[str, float]:
    """ "0.3" (every finding) or "nodule=0.3,effusion=0.2"."""
    try:
        if "=" not in text:
            value = float(text)
            if not 0.0 <= value <= 1.0:
                raise ValueError
            return value
        rates = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip().lower()
            if name not in FINDINGS or not 0.0 <= float(value) <= 1.0:
                raise ValueError
            rates[name] = float(value)
        return rates
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prevalence must be a fraction 0..1 or name=fraction,...; got {text!r}"
        ) from None


def _bounded(low: int, high: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{what} must be an integer {low}..{high}, got {text!r}"
            )
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``synth cxr``."""
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="first seed (image i has seed+i)")
    parser.add_argument(
        "--findings",
        type=_findings,
        default=("pneumothorax",),
        help="comma-separated findings to draw, or 'all' "
        f"({', '.join(FINDINGS)}; default pneumothorax)",
    )
    parser.add_argument(
        "--prevalence",
        type=_prevalence,
        default=None,
        help="fraction of images with each finding: one number or name=fraction,... "
        "(default 0.5; pneumothorax: --pneumothorax-fraction)",
    )
    parser.add_argument(
        "--pneumothorax-fraction",
        type=float,
        default=0.5,
        help="fraction of images with a pneumothorax, 0..1 (default %(default)s; "
        "--prevalence, when it gives one, wins)",
    )
    parser.add_argument(
        "--views", type=_views, default=("PA",), help="comma-separated PA,AP,LATERAL (default PA)"
    )
    parser.add_argument(
        "--modality", choices=list(MODALITIES), default="DX", help="(default %(default)s)"
    )
    parser.add_argument(
        "--bits", type=_bounded(8, 16, "--bits"), default=12, help="Bits Stored 8..16 (default 12)"
    )
    parser.add_argument(
        "--photometric",
        choices=[*sorted(PHOTOMETRICS), "mixed"],
        default="MONOCHROME2",
        help="Photometric Interpretation; mixed: some of each (default %(default)s)",
    )
    parser.add_argument(
        "--size",
        type=_bounded(64, 4096, "--size"),
        default=512,
        help="rows (512..3000 typical; default 512)",
    )
    parser.add_argument(
        "--columns",
        type=_bounded(64, 4096, "--columns"),
        default=None,
        help="columns for a non-square image (default: --size)",
    )
    parser.add_argument(
        "--transfer-syntax",
        choices=["explicit", "jpeg-baseline", "jpeg2000"],
        default="explicit",
        help="explicit VR little endian, JPEG baseline (lossy, needs --bits 8) or JPEG 2000 "
        "lossless (default %(default)s)",
    )
    parser.add_argument("--no-masks", action="store_true", help="skip the truth/*.npz masks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Write the phantoms ``args`` describe; 2 on a bad combination of options."""
    from dicomnode.synth.cxr_dicom import check_encoding
    from dicomnode.synth.truth import write_dataset

    try:
        check_encoding(args.bits, args.transfer_syntax)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    csv_path = write_dataset(
        Path(args.out),
        n=args.n,
        seed=args.seed,
        pneumothorax_fraction=args.pneumothorax_fraction,
        size=args.size,
        progress=not args.no_progress,
        findings=args.findings,
        prevalence=args.prevalence,
        views=args.views,
        modality=args.modality,
        bits=args.bits,
        photometric=args.photometric,
        columns=args.columns,
        transfer_syntax=args.transfer_syntax,
        masks=not args.no_masks,
    )
    print(
        f"wrote {args.n} chest X-ray phantoms to {args.out}; ground truth in {csv_path} "
        f"and {csv_path.with_name('ground_truth.jsonl')}"
    )
    return 0
