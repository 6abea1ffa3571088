"""Atomic checkpoint writes: everything goes to a temporary folder beside the destination, renamed into
place only once complete, so a failure at any point leaves the destination exactly as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConversionError


def check_destination(dst: str | Path, force: bool) -> Path:
    """Refuse a destination that is a file, or a non-empty folder unless ``force``; returns it as a Path."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {str(dst)!r} is a file; expected a folder path")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise ConversionError(f"destination {str(dst)!r} is not empty; pass --force (force=True) to replace it")
    return dst


@contextmanager
def atomic_folder(dst: str | Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst``; on a clean exit it replaces ``dst``, otherwise it is deleted."""
    dst = check_destination(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Beside the destination, so the final rename stays on one filesystem and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's private 0700 would otherwise become the checkpoint's mode
    try:
        yield tmp
        _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, dst: Path) -> None:
    if not dst.exists():
        os.rename(tmp, dst)
        return
    # Move the old folder aside first: if the second rename fails, it goes back untouched.
    backup = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    backup.rmdir()
    os.rename(dst, backup)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(backup, dst)
        raise
    shutil.rmtree(backup, ignore_errors=True)
