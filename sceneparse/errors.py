"""The one exception type for user mistakes.

Raise `SceneparseError` when the *user* got something wrong (a missing file, a bad label value, a
wrong class count, an unknown config key...). Its message names the file or setting and says what
to do. The CLI prints it without a traceback and exits with status 2. Bugs stay ordinary exceptions.
"""
from __future__ import annotations


class SceneparseError(Exception):
    """A user-facing error: `str(err)` is the whole message, `hint` is the fix (optional)."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")
