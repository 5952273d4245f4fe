"""Errors meant for the person at the command line.

A `UserError` carries one line that says what is wrong and what to do; `sqllm-onnx` prints it and
exits with status 1 (`UsageError`: a bad argument, status 2). Any other exception is a bug or an
unexpected failure: the command prints its type and first line, and `--debug` shows the traceback.
"""


class UserError(Exception):
    """A failure the user can fix: bad input, a missing or damaged file, no network."""


class UsageError(UserError):
    """A bad combination of command-line arguments (exit status 2, like argparse's own errors)."""
