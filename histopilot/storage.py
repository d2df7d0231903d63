"""Writes that are all-or-nothing: a failed build never leaves a half-written file or folder.

Everything is written beside its destination under a temporary name and renamed into place at
the end; ``os.replace`` is atomic on one file system, so readers see the old version or the new
one, never a mixture.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from histopilot.errors import OutputError


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``."""
    path = Path(path)
    _make_parent(path)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
    try:
        yield tmp
        tmp.replace(path)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from error
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it becomes ``path``.

    An existing ``path`` is swapped out only after the new folder is complete, and removed
    after the swap.
    """
    path = Path(path)
    _make_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp creates 0700; give the folder the usual permissions
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.replace(old)
        tmp.replace(path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create {path.parent}: {error.strerror or error}") from error


def check_new_output_folder(path: Path, *, what: str, replaceable_marker: str | None) -> None:
    """Refuse to build ``what`` where ``atomic_directory`` would delete someone's files.

    An absent or empty folder is fine; so is an earlier ``what`` (recognised by the file
    ``replaceable_marker`` inside it) when rebuilding one is allowed at all.
    """
    if path.is_file():
        raise OutputError(f"{path} is a file; choose a folder for the {what}.")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if replaceable_marker is not None and (path / replaceable_marker).is_file():
        return
    raise OutputError(
        f"{path} already exists and is not empty, so building the {what} there would delete "
        "its contents; choose a new folder."
    )
