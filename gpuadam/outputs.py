"""Checks of the files and folders a command will write, made before any work starts: a benchmark
or a training run must not run for minutes and then fail on its output path.

Each check tries the real thing (creating the folder, a file in it) rather than asking
``os.access``, which answers yes to root even where the file system says no (``/proc``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot be written; the message names the flag, the path and why."""


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _probe_write(folder: Path, flag: str, path: str | os.PathLike) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".gpuadam-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"{flag}: cannot write into {str(folder)!r} ({_why(exc)}), given {str(path)!r}; "
                          "expected a path in a writable folder") from None


def check_output_file(flag: str, path: str | os.PathLike) -> None:
    """``path`` can be written as a file: its folder exists and takes a new file, and it is no folder."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{flag}: {str(path)!r} is a folder; expected a file path")
    folder = target.parent
    if not folder.is_dir():
        raise OutputError(f"{flag}: the folder of {str(path)!r} does not exist; expected a path in an existing folder")
    _probe_write(folder, flag, path)


def check_output_dir(flag: str, path: str | os.PathLike) -> None:
    """``path`` is, or can be made, a folder that takes new files (it is created when missing)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag}: {str(path)!r} is a file; expected a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{flag}: cannot create the folder {str(path)!r} ({_why(exc)}); "
                          "expected a writable folder") from None
    _probe_write(folder, flag, path)


def check_importable(flag: str, module: str, extra: str) -> None:
    """``module`` imports, else an OutputError naming the flag that needs it and the extra to install."""
    try:
        __import__(module)
    except ImportError:
        raise OutputError(f"{flag} needs {module}, which is not installed: pip install 'gpuadam[{extra}]'") from None
