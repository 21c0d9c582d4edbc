"""The one error a command raises to stop: `hf_fsad.cli.main` prints it and exits with its status."""

from __future__ import annotations


class CliError(Exception):
    """Why a command cannot go on; `main` prints `error: MESSAGE` on stderr and returns `exit_status`
    (2: the run could not start, 1: none of its images could be read or an upload failed)."""

    def __init__(self, message: str, exit_status: int = 2) -> None:
        super().__init__(message)
        self.exit_status = exit_status
