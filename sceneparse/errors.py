"""The one exception type for user mistakes.

Raise `SceneparseError` when the *user* got something wrong (a missing file, a bad label value, a
wrong class count, an unknown config key...). Its message names the file or setting and says what
to do. The CLI prints it without a traceback and exits with status 2. Bugs stay ordinary exceptions.
"""
from __future__ import annotations

from pathlib import Path


class SceneparseError(Exception):
    """A user-facing error: `str(err)` is the whole message, `hint` is the fix (optional)."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")


class UnreadableFileError(SceneparseError):
    """A weights file that cannot be read at all (truncated, corrupt, not a state_dict): the zoo
    deletes such a cached download, unlike a file that reads but does not fit."""


def first_line(err: BaseException) -> str:
    """An exception's first non-empty line (its type's name if it has none): the part worth showing
    of a library error whose next lines are internals (tracer guards, C++ frames)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def ensure_writable(folder: Path, what: str, fix: str) -> None:
    """Create `folder` and write a probe file there, so that a read-only or full disk, or a file
    where the folder should be, is found before hours of work rather than when saving it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise SceneparseError(f"cannot write {what} to {folder}: {err.strerror or err}", fix) from None


def user_message(err: BaseException) -> str:
    """The text to show for `err`, also when a DataLoader worker raised it: torch re-raises a
    worker's exception in the main process with the worker's whole traceback as its message.
    Then only the original error's own lines are kept (a SceneparseError's without its type)."""
    text = str(err)
    lines = [line for line in text.splitlines() if line.strip()]
    if "Original Traceback" in text:
        # The re-raised text ends with "<Type>: <message>" (and maybe a "fix:" line): keep those.
        for i in range(len(lines) - 1, -1, -1):
            if not lines[i].startswith(" ") and ": " in lines[i]:
                kind, first = lines[i].split(": ", 1)
                if kind.rsplit(".", 1)[-1] == SceneparseError.__name__:
                    return "\n".join([first, *lines[i + 1 :]])
                return "\n".join(lines[i:])
    return "\n".join(lines) or type(err).__name__
