"""Writes that are all or nothing: a file or folder is built under a temporary name, then `os.replace`d.

A run killed mid-write leaves the previous file (or none) and a `.partial-*` leftover, never a
truncated file under the real name that a resumed run would read as finished.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)` beside `path`, then move the result onto `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".partial-{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(Path(name))
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """`path.write_text(text)`, all or nothing."""
    return write_file(path, lambda tmp: tmp.write_text(text))


def write_folder(path: Path, fill: Callable[[Path], None]) -> Path:
    """Call `fill(temporary_folder)` beside `path`, then put it in place of `path` (an old one is removed
    only after the new one is complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".partial-{path.name}.", dir=path.parent))
    try:
        fill(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():  # a folder cannot be os.replace'd onto a full one: move the old one aside first
        old = Path(tempfile.mkdtemp(prefix=f".old-{path.name}.", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(staging, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, path)
    return path
