"""`hf-fsad` command line: score, calibrate, fit, convert, export, benchmark, push, push-bank, push-space,
demo.

One module per command (as transformers' `cli/`): each declares its options (`register(commands)`) beside
its `run(args)`, which imports what the command needs, so building the parser (`hf-fsad --help`) loads
neither torch nor transformers. A command stops by raising `CliError`; `main` prints it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hf_fsad import __version__, registry

from ..deprecation import moved_names
from . import benchmark, calibrate, convert, demo, export, fit, hub, score
from ._errors import CliError

# in the order `hf-fsad --help` lists them
COMMANDS = (score, calibrate, fit, convert, export, benchmark, hub, demo)

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
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command `argv` (default: the process's arguments) names; its exit status. The methods are
    registered with transformers first: `import hf_fsad` leaves that to this function in the console script."""
    args = build_parser().parse_args(argv)
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
