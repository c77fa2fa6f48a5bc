"""The state directory is private: 0700, and the files in it that hold secrets 0600, whatever the umask.

It holds decrypted messages (the store, long bodies), channel keys and broker passwords (bindings).
And when the store cannot be opened (damaged, read-only, disk full), the user gets one line naming the
file and what to do, never an internal error: see :func:`store_errors`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ._errors import StoreError

DIR_MODE = 0o700
FILE_MODE = 0o600
STORE_SIDE_FILES = ("-wal", "-shm", "-journal")  # SQLite creates these with the database file's mode

_opened: list[Path] = []  # the store this process opened last (named by errors raised later on)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) and make ``path`` itself 0700, whatever the umask or an
    older mqttalk left it as. Parents above it are not ours to change (the user's ~/.local/state)."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    _chmod(path, DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` if missing, 0600 whatever the umask; an existing file is made 0600.

    An existing file is changed by its path, never opened: closing any descriptor of a database file
    drops every POSIX lock this process holds on it, SQLite's included (another thread's connection
    would go on as if it held them, and other processes would take it for gone)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    except FileExistsError:
        _chmod(path, FILE_MODE)
        return path
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:  # the umask took more than it should
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return path


def private_store(path: Path) -> None:
    """Before SQLite opens ``path``: its directory 0700, the database 0600, and any -wal/-shm it left
    0600 too (SQLite gives new ones the database file's mode)."""
    _opened[:] = [path]
    private_dir(path.parent)
    private_file(path)
    for suffix in STORE_SIDE_FILES:
        side = path.with_name(path.name + suffix)
        with suppress(FileNotFoundError):
            _chmod(side, FILE_MODE)


def _chmod(path: Path, mode: int) -> None:
    if stat.S_IMODE(path.stat().st_mode) != mode:
        path.chmod(mode)


@contextmanager
def store_errors(path: Path | None = None) -> Iterator[None]:
    """Turn what SQLite or the file system raise about the store into one :class:`StoreError`."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        error = store_error(exc, path)
        if error is None:
            raise
        raise error from None


def store_error(exc: BaseException, path: Path | None = None) -> StoreError | None:
    """The one line for ``exc`` if it is about the store (sqlite3 errors, OSError), else None."""
    import sqlite3

    path = path or (_opened[0] if _opened else None)
    where = str(path) if path else "the message store (store.sqlite3 in the state directory)"
    directory = str(path.parent) if path else "the state directory"
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    low = reason.lower()
    if "full" in low or (isinstance(exc, OSError) and exc.errno == 28) or ("i/o" in low and _full(path)):
        return StoreError(
            f"cannot write {where}: the disk is full ({reason})",
            f"free space on the disk that holds {directory}, or set MQTTALK_STATE_DIR elsewhere",
        )
    if (
        "readonly" in low
        or "read-only" in low
        or "permission" in low
        or "unable to open" in low
        or isinstance(exc, PermissionError)
        or (isinstance(exc, OSError) and exc.errno == 30)
    ):
        if _read_only(path):
            reason = f"{directory} is on a read-only file system"
        return StoreError(
            f"cannot write {where}: {reason}",
            f"make {directory} writable by you, or set MQTTALK_STATE_DIR to a directory that is",
        )
    if "i/o" in low:
        return StoreError(
            f"cannot read or write {where} ({reason})",
            f"check the disk that holds {directory}; if the error stays, move the file aside (mv "
            f"{where} {where}.damaged) and run the command again: a new store is made",
        )
    if isinstance(exc, sqlite3.DatabaseError):  # not a database, malformed, truncated
        return StoreError(
            f"the message store {where} is damaged ({reason})",
            f"move it aside with mv {where} {where}.damaged and run the command again: a new store "
            "is made; the old file keeps this machine's history and unsent messages",
        )
    if isinstance(exc, OSError):
        return StoreError(f"cannot use {where}: {reason}", f"check {directory}, or set MQTTALK_STATE_DIR elsewhere")
    return None


def _full(path: Path | None, room: int = 1 << 20) -> bool:
    """Whether the file system holding ``path`` has less than ``room`` bytes left (SQLite reports a full
    disk as a "disk I/O error" when it cannot grow its shared-memory file)."""
    if path is None:
        return False
    try:
        fs = os.statvfs(path.parent)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < room


def _read_only(path: Path | None) -> bool:
    """Whether the file system holding ``path`` is mounted read-only."""
    if path is None:
        return False
    try:
        return bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY)
    except OSError:
        return False
