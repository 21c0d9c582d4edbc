"""`hf-fsad demo`: score a generated toy dataset and write a report."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="score a generated toy dataset and write a report")
    parser.add_argument(
        "--out", default="demo_output", help="directory for report.md and heatmaps (default %(default)s)"
    )
    parser.add_argument(
        "--backbone",
        default="openai/clip-vit-base-patch16",
        help="CLIP Hub id or local directory (default %(default)s; offline and not cached: a random one)",
    )
    parser.add_argument("--k", type=int, default=2, help="number of normal references (default %(default)s)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from hf_fsad.demo import VERDICT_CLASS_NAME, run_demo

    result = run_demo(Path(args.out), backbone=args.backbone, k=args.k)
    print(f"report: {result.report}")
    print(*result.verdicts, sep="\n")
    hub_note = "" if result.pretrained else " (needs the Hub or a cached backbone)"
    print(
        f"next{hub_note}: hf-fsad score {result.queries_dir} --model winclip@{args.backbone} --reference {result.good_dir} "
        f"--class-name {VERDICT_CLASS_NAME!r} --output results.jsonl  (or your own good/ and queries/)"
    )
    return 0
