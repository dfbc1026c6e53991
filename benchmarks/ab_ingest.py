"""A/B of two node builds on the same CT slices, fed alternately: the change against a base.

    git worktree add /tmp/wt-base <base commit>
    flock /tmp/dicomnode-cpu.lock python benchmarks/ab_ingest.py --base /tmp/wt-base \
        [--senders 4] [--rounds 10] [--slices 100] [--per-association]

Two nodes run side by side (``dicomnode serve`` as ``ingest.py`` starts it: SQLite, no
workers): one from the base tree (put first on ``PYTHONPATH``), one from this tree. Each
round sends the next ``--slices`` CT slices of ``ingest.py``'s workload to one node, then
the same slices to the other (which goes first alternates), in ``--senders`` concurrent
``storescu`` (with ``--per-association``, each slice in its own association, one
``storescu`` after another, as a modality that sends each image as it is made). The script
prints each round's seconds and the nodes' CPU per slice, and the median of the rounds'
new/base ratios.

Why not two ``ingest.py`` runs: this VM's speed drifts by 30-50 % within minutes, which
swamps a change of a few per cent between runs made minutes apart; rounds of a second or two,
alternating, see the same drift on both sides. Each node receives every slice once
(``--rounds`` x ``--slices`` <= the workload's 1,000), so no round stores duplicates.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ingest  # benchmarks/ingest.py, beside this file

CT_SLICES = 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="work tree of the base build")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--slices", type=int, default=100, help="CT slices per round")
    parser.add_argument("--listeners", type=int, default=4)
    parser.add_argument("--per-association", action="store_true", help="one association per slice")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/dicomnode-bench-ingest"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/dicomnode-bench-ab"))
    args = parser.parse_args()
    if args.rounds * args.slices > CT_SLICES:
        parser.error(f"--rounds x --slices must not exceed {CT_SLICES} (no duplicates)")
    files = ingest.files_of(ingest.workload(args.cache, "ct", CT_SLICES))
    builds = {"base": str(args.base.resolve()), "new": None}
    nodes: dict[str, ingest.Node] = {}
    sent = dict.fromkeys(builds, 0)
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in builds}
    with contextlib.ExitStack() as stack:
        for name, path in builds.items():
            # The node's processes inherit the environment they are started with.
            if path:
                os.environ["PYTHONPATH"] = path
            else:
                os.environ.pop("PYTHONPATH", None)
            nodes[name] = ingest.Node(args.work / name, args.listeners, None, 0)
            stack.enter_context(nodes[name].running())
        os.environ.pop("PYTHONPATH", None)
        for index in range(args.rounds):
            chunk = files[index * args.slices : (index + 1) * args.slices]
            order = ("base", "new") if index % 2 == 0 else ("new", "base")
            for name in order:
                seconds, node_cpu, _ = ingest.send_counted(
                    nodes[name],
                    chunk,
                    args.senders,
                    per_association=args.per_association,
                    held_before=sent[name],
                )
                sent[name] += len(chunk)
                rounds[name].append((seconds, node_cpu / len(chunk) * 1e3))
    for name, measured in rounds.items():
        print(f"{name:4s} seconds       " + " ".join(f"{s:6.2f}" for s, _ in measured))
        print(f"{name:4s} CPU ms/slice  " + " ".join(f"{c:6.2f}" for _, c in measured))
    pairs = list(zip(rounds["base"], rounds["new"], strict=True))
    wall = statistics.median(new[0] / base[0] for base, new in pairs)
    cpu = statistics.median(new[1] / base[1] for base, new in pairs)
    print(
        f"new/base, median of {args.rounds} rounds of {args.slices} slices, "
        f"{args.senders} sender(s){', one association a slice' if args.per_association else ''}: "
        f"seconds {wall:.3f}, node CPU {cpu:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
