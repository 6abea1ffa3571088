"""Atomic checkpoint writes: everything goes to a temporary folder beside the destination, swapped into place
only once complete, so a failure or a kill at any point leaves the destination exactly as it was.

- The work happens in ``.DST.tmp-<pid>-<token>/checkpoint/``; the outer folder also holds a marker file with the
  same random token. Only a folder holding that marker is ever removed as debris (by a later run, once its
  process is gone): a user's folder that merely matches the name pattern is never touched. The one exception is
  a process killed between making the folder and finishing its marker: a folder of exactly our name left holding
  nothing, or only a marker cut short, is removed too (nothing is in it to lose). Names are cut to fit the
  filesystem's limit on one name (NAME_MAX), whatever DST's length.
- The swap takes place only if DST is still what was checked. Without ``force`` it was absent or an empty
  folder: an empty one is removed with ``rmdir`` (which fails if anything was put in it meanwhile) and the new
  folder renamed onto the absent name with ``renameat2(RENAME_NOREPLACE)`` (which fails if anything took that
  name meanwhile, such as a second conversion's result). Either failure ends in one line naming DST, with the
  other's files left as they are. With ``force``, an existing DST is replaced by one atomic
  ``renameat2(RENAME_EXCHANGE)`` on Linux: at every instant DST is either the old folder or the new one, never
  missing; the old one lands inside the marked temporary folder and is deleted with it. Elsewhere (or on a
  filesystem without renameat2) the old folder is moved into the temporary folder first and moved back if the
  second rename fails; and a plain rename, which fails onto a non-empty folder, stands in for RENAME_NOREPLACE.
- SIGINT, SIGTERM and SIGHUP are recorded, not acted on, during the swap and the removal of the old folder,
  so a signal cannot split them; one that arrived then came after the commit and is reported as a warning.
  Before the swap, the CLI turns those signals into exceptions, and the temporary folder is deleted on the
  way out.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConversionError

_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_MARKER = ".hf-glu-temporary"  # inside each temporary folder: "hf-glu <token>", the folder's own token
_TOKEN_HEX = 16
_PID_DIGITS = 10  # room for any pid, so a name's cut does not depend on the pid
_INNER = "checkpoint"


def _name_max(folder: Path) -> int:
    """The longest name (in bytes) the filesystem holding ``folder`` takes."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer: POSIX's usual limit
        return 255


def _resolved(path: Path, given: str) -> Path:
    """``path`` with every link followed; a link loop is bad input, named."""
    loop = ConversionError(
        f"destination {given!r} lies in a symlink loop; expected a folder path whose links lead somewhere"
    )
    try:
        resolved = path.resolve()
    except RuntimeError:  # "Symlink loop from …", up to Python 3.12
        raise loop from None
    try:
        os.stat(resolved)  # from Python 3.13 a loop resolves without an error: stat meets it
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise loop from None
        # missing (to be made), a file on the way or a name too long: the checks that follow name those
    return resolved


def check_destination(dst: str | Path, force: bool, src: str | Path | None = None) -> Path:
    """Refuse a destination that is a file, lies under a file, is a non-empty folder without ``force``, or
    overlaps the source ``src`` (its folder, or the Hub cache for a Hub id: the same folder, inside it or
    above it, where replacing it would delete the source); returns the path to write. A link to a folder is
    followed: its target is replaced and the link kept, so nothing is left beside either."""
    if not isinstance(dst, (str, Path)) or not str(dst).strip():
        raise ConversionError(f"destination {dst!r} is invalid; expected a folder path")
    given = str(dst)
    dst = Path(dst)
    resolved = _resolved(dst, given)
    _check_name_lengths(resolved, given)  # before any other look at the path, which a long name would fail
    if dst.is_symlink():
        dst = resolved
    if src is not None:
        _check_apart(given, resolved, _source_location(src))
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {given!r} is a file; expected a folder path")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise ConversionError(f"destination {given!r} is not empty; pass --force (force=True) to replace it")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():  # otherwise the write fails with a bare "[Errno 20] Not a directory"
        raise ConversionError(
            f"destination {given!r} lies under {str(parent)!r}, which is a file; expected a folder path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"destination {given!r} cannot be written: {str(parent)!r} is read-only to us")
    return dst


def _check_name_lengths(path: Path, given: str) -> None:
    """Refuse a name longer than its filesystem takes (NAME_MAX), which would otherwise fail only when made."""
    folder = Path(path.anchor)
    for part in path.parts[1:]:
        limit = _name_max(folder)
        if len(os.fsencode(part)) > limit:
            raise ConversionError(
                f"destination {given!r} has a name of {len(os.fsencode(part))} bytes; expected at most {limit} "
                "bytes per name (the filesystem's limit)"
            )
        if os.path.isdir(folder / part):  # below the first missing folder, names go on the last one's filesystem
            folder = folder / part


def _source_location(src: str | Path) -> Path:
    """Where the source's files are: its folder, or for a Hub id the Hub cache its snapshot is read from."""
    if Path(src).exists():
        return Path(src).resolve()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).resolve()


def _check_apart(given: str, dst: Path, src: Path) -> None:
    """``dst`` and ``src`` (both resolved, links followed) must be apart: neither inside the other."""
    if dst == src:
        relation = "is SRC itself"
    elif dst.is_relative_to(src):
        relation = f"lies inside SRC {str(src)!r}"
    elif src.is_relative_to(dst):
        relation = f"holds SRC {str(src)!r}, which replacing it would delete"
    else:
        return
    raise ConversionError(f"destination {given!r} {relation}; expected a folder outside SRC that does not contain it")


@contextmanager
def writing_to(dst: Path) -> Iterator[None]:
    """Turn a failed write (disk full, quota, I/O error; safetensors reports these as SafetensorError) into
    one line naming the destination."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        raise ConversionError(
            f"destination {str(dst)!r} cannot be written ({type(e).__name__}: {e}); expected a folder with room "
            "for the checkpoint and write permission"
        ) from None


def _temporary_name(dst: Path, pid: int, token: str) -> str:
    return f"{_stem(dst)}.tmp-{pid}-{token}"


def _stem(dst: Path) -> str:
    """``.DST``, DST's name cut so that ``.DST.tmp-<pid>-<token>`` fits NAME_MAX whatever the pid."""
    room = _name_max(dst.parent) - len(f"..tmp-{'9' * _PID_DIGITS}-{'f' * _TOKEN_HEX}")
    encoded = os.fsencode(dst.name)
    return "." + (dst.name if len(encoded) <= room else os.fsdecode(encoded[: max(room, 1)]))


def stale_siblings(dst: Path) -> list[Path]:
    """Temporary folders beside ``dst`` that this tool made (their marker holds the token in their name) for
    conversions whose process is gone. A folder that only has a matching name is not one of them."""
    pattern = re.compile(rf"^{re.escape(_stem(dst))}\.tmp-(\d+)-([0-9a-f]{{{_TOKEN_HEX}}})$")
    stale = []
    for path in sorted(dst.parent.iterdir()) if dst.parent.is_dir() else []:
        match = pattern.match(path.name)
        if match and _is_ours(path, match.group(2), unfinished=True) and not _alive(int(match.group(1))):
            stale.append(path)
    return stale


def _marker_content(token: str) -> bytes:
    return f"hf-glu {token}\n".encode()


def _is_ours(folder: Path, token: str, unfinished: bool = False) -> bool:
    """Whether ``folder`` is a real folder holding our marker with ``token`` (links are not followed). With
    ``unfinished``, also a folder a kill left between its mkdir and its marker: empty, or holding only a marker
    cut short (a prefix of ours)."""
    marker = folder / _MARKER
    try:
        if folder.is_symlink() or not folder.is_dir():
            return False
        names = os.listdir(folder) if unfinished else None
        if names == []:
            return True
        if marker.is_symlink() or not marker.is_file():
            return False
        content = marker.read_bytes()
        if names == [_MARKER]:
            return _marker_content(token).startswith(content)
        return content == _marker_content(token)
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:  # not a pid at all
        return False
    return True


def _remove_ours(folder: Path) -> None:
    """Remove a marked temporary folder: its contents first and the marker last, so that an interrupted removal
    leaves a folder still provably ours."""
    for path in folder.iterdir():
        if path.name != _MARKER:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
    with contextlib.suppress(OSError):
        (folder / _MARKER).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()  # fails, keeping everything, if anything but our own files was in it


def _make_temporary(dst: Path) -> Path:
    """A fresh marked temporary folder beside ``dst`` (same filesystem, so the final rename is atomic)."""
    while True:
        token = secrets.token_hex(_TOKEN_HEX // 2)
        folder = dst.parent / _temporary_name(dst, os.getpid(), token)
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # a 64-bit token met an existing name: draw again
            continue
        try:
            (folder / _MARKER).write_bytes(_marker_content(token))
        except BaseException:
            folder.rmdir()
            raise
        return folder


@contextmanager
def atomic_folder(dst: str | Path, force: bool, src: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst``; on a clean exit it replaces ``dst``, otherwise it is deleted
    together with the parent folders made for it. ``src``: the source, which ``dst`` must not overlap.
    Without ``force``, ``dst`` must still be what was checked here (absent, or this same empty folder) when the
    swap comes, or nothing is replaced and the error names it."""
    dst = check_destination(dst, force, src)
    seen = _identity(dst)  # None: absent; else the empty folder checked (a non-empty one needs force)
    made = [p for p in (dst.parent, *dst.parent.parents) if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    for path in stale_siblings(dst):  # debris of killed runs
        _remove_ours(path)
    container = None
    try:
        # A stop signal between the folder's mkdir and `container` being set would leave a folder nobody removes:
        # it is held until the folder is ours to clean up, then acted on.
        with _signals_deferred() as arrived:
            container = _make_temporary(dst)
            tmp = container / _INNER
            tmp.mkdir()  # mkdir's mode follows the umask: the checkpoint gets the user's usual permissions
        for signum in arrived:
            signal.raise_signal(signum)
        yield tmp
        with _signals_deferred() as late:
            _swap_in(tmp, dst, force, seen)
            _remove_ours(container)
        if late:
            # The swap is the commit: a stop signal that arrived during it came too late to stop anything;
            # acted on now, it would report "stopped" with the new folder already in place.
            warnings.warn(
                f"{signal.Signals(late[0]).name} arrived while {str(dst)!r} was being swapped in; the conversion "
                "had completed, so it was not stopped",
                stacklevel=2,
            )
    except BaseException:
        if container is not None:
            _remove_ours(container)
        for folder in made:  # innermost first: a refusal leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _swap_in(tmp: Path, dst: Path, force: bool, seen: tuple[int, int] | None) -> None:
    if force:
        _replace(tmp, dst, tmp.parent / "replaced")
    else:
        _move_onto_what_was_checked(tmp, dst, seen)


def _move_onto_what_was_checked(tmp: Path, dst: Path, seen: tuple[int, int] | None) -> None:
    """Rename ``tmp`` to ``dst`` if ``dst`` is still absent, or still the empty folder ``seen``; otherwise refuse,
    leaving whatever is at ``dst`` as it is."""

    def changed(expected: str) -> ConversionError:
        return ConversionError(
            f"destination {str(dst)!r} changed while this conversion was writing (another process or user put "
            f"something there); it was left as it is and nothing was written; expected it to stay {expected}: "
            "convert again, into an empty folder, or with --force to replace it"
        )

    if seen is not None:
        if _identity(dst) != seen:
            raise changed("the empty folder it was")
        try:
            os.rmdir(dst)  # atomic: fails if anything was put in it meanwhile
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise changed("empty") from None
            raise
    try:
        _rename_noreplace(tmp, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise changed("absent" if seen is None else "empty") from None
        raise


def _replace(tmp: Path, dst: Path, aside: Path) -> None:
    """``tmp`` becomes ``dst``, whatever is there (``force``); the old ``dst`` ends at ``aside``, in the marked
    temporary folder, to be removed with it."""
    if not os.path.lexists(dst):
        _rename_noreplace(tmp, dst)
        return
    if _renameat2(tmp, dst, _RENAME_EXCHANGE):  # tmp, in the temporary folder, now holds the old one
        return
    # Move the old folder aside first: if the second rename fails, it goes back untouched.
    os.rename(dst, aside)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(aside, dst)
        raise


def _rename_noreplace(a: Path, b: Path) -> None:
    """Rename ``a`` to ``b``, failing (EEXIST) if ``b`` exists: atomically with Linux ``renameat2``; elsewhere a
    plain rename, which fails onto a file or a non-empty folder and replaces only an empty one."""
    try:
        if _renameat2(a, b, _RENAME_NOREPLACE):
            return
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # EINVAL: a filesystem without the flag
            raise
    if os.path.lexists(b):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(b))
    os.rename(a, b)


@contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM/SIGHUP during the block instead of acting on them (main thread only); yields the
    list they are recorded in. If the block fails, they are raised again afterwards.

    Python handlers rather than a signal mask: a mask holds signals for the calling thread only, and a signal
    sent to the process goes to any thread that does not block it (torch starts several), so a masked
    main thread still ran the stop handler in the middle of the swap."""
    arrived: list[int] = []
    try:
        previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in _HELD_SIGNALS}
    except ValueError:  # not the main thread: signals are the main thread's business
        yield arrived
        return
    failed = True
    try:
        yield arrived
        failed = False
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if failed:
            for signum in arrived:
                signal.raise_signal(signum)


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux ``renameat2(a, b, flags)``: True once done, False where unavailable; raises OSError if it fails."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL) and flags == _RENAME_EXCHANGE:  # not on this kernel or filesystem
        return False
    raise OSError(code, os.strerror(code), str(b))
