"""`hf-fsad push`, `push-bank` and `push-space`: upload a saved model (with its model card), a reference bank,
or the Gradio Space to the Hub; `--dry-run` only stages the upload folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ._errors import CliError


def register(commands: argparse._SubParsersAction) -> None:
    push_parser = commands.add_parser("push", help="upload a saved model with a model card to the Hub")
    push_parser.add_argument("model_dir", help="a directory written by save_pretrained")
    push_parser.add_argument("repo_id", help="Hub model repo, e.g. user/winclip-bottle")
    push_parser.add_argument(
        "--results", help="benchmark results.json whose cells go into the card's model-index"
    )
    push_parser.add_argument("--method", help="the method label of those cells (default: the model type)")
    push_parser.set_defaults(handler=run_push)
    bank_parser = commands.add_parser("push-bank", help="upload a reference bank (.safetensors) to the Hub")
    bank_parser.add_argument("bank", help="a bank saved with --save-bank or ReferenceBank.save")
    bank_parser.add_argument("repo_id", help="Hub model repo, e.g. user/bottle-bank")
    bank_parser.set_defaults(handler=run_push_bank)
    space_parser = commands.add_parser(
        "push-space", help="upload the Gradio Space (spaces/) with the package"
    )
    space_parser.add_argument("repo_id", help="Hub Space repo, e.g. user/hf-fsad-demo")
    space_parser.set_defaults(handler=run_push_space)
    for parser in (push_parser, bank_parser, space_parser):
        parser.add_argument(
            "--private",
            action="store_true",
            help="create the repo as private (default: public; an existing repo keeps its visibility)",
        )
        parser.add_argument(
            "--dry-run",
            metavar="DIR",
            help="only build the upload folder in DIR, upload nothing (no token needed)",
        )


def run_push(args: argparse.Namespace) -> int:
    from hf_fsad.hub import stage_model

    return _push(
        args, lambda folder: stage_model(args.model_dir, folder, args.repo_id, args.results, args.method)
    )


def run_push_bank(args: argparse.Namespace) -> int:
    from hf_fsad.hub import stage_bank

    return _push(args, lambda folder: stage_bank(args.bank, folder))


def run_push_space(args: argparse.Namespace) -> int:
    from hf_fsad.hub import stage_space

    return _push(args, stage_space, repo_type="space")


def _push(args: argparse.Namespace, stage: Callable[[Path], Path], repo_type: str = "model") -> int:
    """Stage the upload folder (in --dry-run or a temporary folder), then upload it unless --dry-run."""
    import tempfile

    from hf_fsad.hub import upload

    with tempfile.TemporaryDirectory() as temporary:
        try:
            folder = stage(Path(args.dry_run) if args.dry_run else Path(temporary) / "upload")
        except ValueError as error:
            raise CliError(str(error)) from None
        files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
        if args.dry_run:
            print(f"staged {len(files)} files for {args.repo_id} in {folder} (not uploaded)", file=sys.stderr)
            return 0
        try:
            url = upload(folder, args.repo_id, repo_type=repo_type, private=args.private)
        except Exception as error:  # noqa: BLE001  (the transport library's errors vary; report any, never the token)
            raise CliError(
                f"upload to {args.repo_id} failed ({type(error).__name__}): {error}", exit_status=1
            ) from None
    print(f"pushed {len(files)} files to {args.repo_id}: {url}", file=sys.stderr)
    return 0
