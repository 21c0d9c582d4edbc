"""`hf-fsad reproduce`: run a paper's tables with its protocol and put the published values beside ours."""

from __future__ import annotations

import argparse

from hf_fsad.reproduction.protocols import PAPERS

from ._errors import CliError
from ._options import add_batch_size, add_device


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "reproduce", help="reproduce a paper's tables: published values beside ours (docs/reproduce.md)"
    )
    parser.add_argument("paper", nargs="?", choices=list(PAPERS), help="the paper whose tables run")
    parser.add_argument("--list", action="store_true", help="list the papers, tables and what each needs")
    parser.add_argument("--table", nargs="+", help="the tables to run, e.g. 'Table 2' (default: all)")
    parser.add_argument(
        "--data-root",
        help="folder holding one folder per dataset, named as load_benchmark names it (mvtec_ad, visa, ...)",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        default=[],
        metavar="METHOD:TRAINED_ON=PATH",
        help="trained or converted models, e.g. afclip:mvtec_ad=afclip-official-mvtec (hf-fsad convert "
        "--afclip-official); a model not given is trained here by its recipe",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="seeds of the reference draws (default: one per run the paper states)",
    )
    parser.add_argument(
        "--out", help="output directory (results.md, results.json, paper_vs_ours.png, cells/)"
    )
    parser.add_argument(
        "--backbone",
        help="CLIP directory or Hub id instead of the paper's (a converted ViT-B/16+; tests: a tiny one)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="METHOD.SECTION.KEY=VALUE",
        help="override a method's model or training setting (YAML value), reported as ours",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one dataset, category, seed and shot per table and one training update (plumbing checks)",
    )
    add_batch_size(parser)
    add_device(parser)
    parser.set_defaults(handler=run)


def parse_weights(entries: list[str]) -> dict[tuple[str, str], str]:
    """`METHOD:TRAINED_ON=PATH` entries -> {(method, trained_on): path}."""
    weights = {}
    for entry in entries:
        key, equals, path = entry.partition("=")
        method, colon, trained_on = key.partition(":")
        if not (equals and colon and method and trained_on and path):
            raise CliError(f"--weights {entry!r} is not METHOD:TRAINED_ON=PATH (e.g. afclip:mvtec_ad=DIR)")
        weights[(method, trained_on)] = path
    return weights


def run(args: argparse.Namespace) -> int:
    from hf_fsad.reproduction.report import list_text

    if args.list:
        print(list_text(), end="")
        return 0
    if args.paper is None or args.data_root is None or args.out is None:
        raise CliError("reproduce needs PAPER, --data-root and --out (or --list)")
    from hf_fsad.io import prepare_output_dir
    from hf_fsad.reproduction.harness import ReproductionRun, reproduce

    paper = PAPERS[args.paper]
    weights = parse_weights(args.weights)
    for method, trained_on in weights:
        if method != paper.trained_method:
            raise CliError(
                f"--weights {method}:{trained_on}: {args.paper} trains no {method!r} (weights are for "
                f"{paper.trained_method or 'none of its methods'})"
            )
    try:
        for name in args.table or []:
            paper.table(name)
        out = prepare_output_dir(args.out, "--out")
        settings = ReproductionRun(
            args.data_root,
            out,
            weights,
            args.table,
            args.seeds,
            args.backbone,
            args.set,
            args.smoke,
            args.device,
            args.batch_size,
        )
        results = reproduce(args.paper, settings)
    except ValueError as error:
        raise CliError(str(error)) from None
    rows = results["rows"]
    compared = [row for row in rows if row["within_tolerance"] is not None]
    within = sum(row["within_tolerance"] for row in compared)
    print(
        f"{len(compared)} of {len(rows)} published cells compared, {within} within tolerance -> {out / 'results.md'}"
    )
    return 0
