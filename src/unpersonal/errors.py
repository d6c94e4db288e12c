"""The one error type a user should ever see.

Anything the user can fix (a bad file, a bad option, a patient in two splits) raises `UserError`
with a one-line message that names the file, row or option. The CLI prints it and exits with
code 2; every other exception is a bug in unpersonal and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or options, reported in one line (exit code 2)."""

    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C (or SIGTERM) during a resumable stage: its state is saved, rerun to resume."""

    exit_code = 130


def first_line(error: BaseException) -> str:
    """A library's error message cut to its first line (its type when it has none), for quoting
    in a one-line `UserError`."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
