"""Files written whole: to a temporary file next to the target, then renamed over it in one step
(os.replace), so that a reader, or a write stopped halfway (a full disk, a timeout), finds the old
file or the whole new one, never a part. Used by the monitor's flight record and the bench."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

# Random hex digits in a temporary file's name: two writers of the same path never share one.
_TOKEN_BYTES = 4


def write_whole(path: Path, write: Callable[[Path], None]) -> Path:
    """Makes path's folder, calls write(temporary path) and renames the temporary file to path
    (os.replace: readers see the old file or the whole new one, never a part). On any error the
    temporary file is removed and the error raised; path is then as it was."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # said with the folder: the reason alone ("File exists") is a riddle
        raise type(exc)(exc.errno, f"cannot make the folder {path.parent}: {exc.strerror}") from exc
    # The temporary name keeps the suffix: writers that pick the format from it (matplotlib) do.
    temporary = path.with_name(f".{path.stem}.{secrets.token_hex(_TOKEN_BYTES)}.tmp{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return path


def failure(exc: BaseException) -> str:
    """Why a write failed, in words: the system's reason for an OSError ("No space left on
    device"), else the error's own text."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"{type(exc).__name__}: {why}"
