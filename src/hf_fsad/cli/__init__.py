"""`hf-fsad` command line: score, calibrate, fit, convert, export, benchmark, reproduce, push, push-bank,
push-space, demo.

One module per command (as transformers' `cli/`): each declares its options (`register(commands)`) beside
its `run(args)`, which imports what the command needs, so building the parser (`hf-fsad --help`) loads
neither torch nor transformers. A command stops by raising `CliError`; `main` prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

from hf_fsad import __version__, registry

from ..deprecation import moved_names
from . import benchmark, calibrate, convert, demo, export, fit, hub, reproduce, score
from ._errors import CliError

# in the order `hf-fsad --help` lists them
COMMANDS = (score, calibrate, fit, convert, export, benchmark, reproduce, hub, demo)

__all__ = ["CliError", "build_parser", "main"]

# Names the single-module command line (hf_fsad/cli.py) defined, kept for one release: name -> new home.
# Its handlers `score`, `fit`, `benchmark`, `convert`, `export` and `demo` are now the command modules.
_DEPRECATED = {
    "DEFAULT_FALSE_ALARM_RATE": "hf_fsad.calibration_policy.DEFAULT_FALSE_ALARM_RATE",
    "push": "hf_fsad.cli.hub.run_push",
    "push_bank": "hf_fsad.cli.hub.run_push_bank",
    "push_space": "hf_fsad.cli.hub.run_push_space",
}


__getattr__ = moved_names(__name__, _DEPRECATED)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-fsad", description="Few-shot image anomaly detection with CLIP."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-v", "--verbose", action="store_true", help="debug messages too (default: progress and warnings)"
    )
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command `argv` (default: the process's arguments) names; its exit status. The methods are
    registered with transformers first: `import hf_fsad` leaves that to this function in the console script."""
    args = build_parser().parse_args(argv)
    with configured_logging(args.verbose, args.quiet):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if getattr(args, "batch_size", 1) < 1:
            raise CliError("--batch-size must be at least 1")
        registry.register()
        if hasattr(args, "device"):
            from hf_fsad.distributed import resolve_device

            args.device = resolve_device(args.device, getattr(args, "runtime", "torch"))
        return args.handler(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_status


@contextlib.contextmanager
def configured_logging(verbose: bool = False, quiet: bool = False) -> Iterator[None]:
    """hf_fsad's log messages on stderr for one command: INFO by default (a benchmark's finished cells, a
    fit's losses and checkpoints, beside the progress bars), DEBUG with `verbose`, WARNING with `quiet`, which
    also turns the progress bars of hf_fsad, transformers and huggingface_hub off; all restored afterwards."""
    logger = logging.getLogger("hf_fsad")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    with contextlib.ExitStack() as restore:
        restore.callback(logger.removeHandler, handler)
        restore.callback(logger.setLevel, saved_level)
        if quiet:
            restore.enter_context(_progress_bars_off())
        yield


@contextlib.contextmanager
def _progress_bars_off() -> Iterator[None]:
    import huggingface_hub.utils as hub
    import transformers.utils.logging as transformers

    from hf_fsad import progress

    switches = [
        (progress.are_progress_bars_enabled(), progress.enable_progress_bars, progress.disable_progress_bars),
        (not hub.are_progress_bars_disabled(), hub.enable_progress_bars, hub.disable_progress_bars),
        (
            transformers.is_progress_bar_enabled(),
            transformers.enable_progress_bar,
            transformers.disable_progress_bar,
        ),
    ]
    for _, _, disable in switches:
        disable()
    try:
        yield
    finally:
        for was_enabled, enable, _ in switches:
            if was_enabled:
                enable()
