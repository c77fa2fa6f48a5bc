"""File locks that let the processes of one peer on one machine agree without talking: who holds its
broker session (one live process at a time), who sends its outbox (one sender at a time), who is
handing unread messages to the agent right now (one reader at a time: see ``Channel.reading``)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

LockName = Literal["session", "outbox", "read"]


def lock_path(state_dir: Path, channel: str, peer: str, what: LockName) -> Path:
    """Where the lock ``what`` of ``peer`` in ``channel`` lives (one file per peer and purpose)."""
    name = hashlib.sha256(f"{channel}\n{peer}".encode()).hexdigest()[:24]
    return state_dir / "locks" / f"{name}.{what}.lock"


class FileLock:
    """An exclusive, non-blocking file lock held for as long as its owner wants it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self) -> bool:
        """Take the lock if it is free (never blocks); whether we hold it now."""
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "w")  # noqa: SIM115 - kept open while the lock is held
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                return False
            self._fh = fh
        return True

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@contextlib.contextmanager
def try_lock(path: Path) -> Iterator[bool]:
    """Hold the lock at ``path`` for a ``with`` block if it is free; yields whether we got it."""
    lock = FileLock(path)
    try:
        yield lock.acquire()
    finally:
        lock.release()


def held(path: Path) -> bool:
    """Whether some process holds the lock at ``path`` right now."""
    if not path.exists():
        return False
    with try_lock(path) as got:
        return not got


@contextlib.contextmanager
def waiting_lock(path: Path, timeout: float) -> Iterator[bool]:
    """Hold the lock at ``path`` for a ``with`` block, waiting up to ``timeout`` seconds for it; yields
    whether we got it (after the timeout the block runs anyway: a reader stuck elsewhere must not stop
    this one for good)."""
    lock = FileLock(path)
    deadline = time.monotonic() + timeout
    try:
        while not lock.acquire() and time.monotonic() < deadline:
            time.sleep(0.005)
        yield lock.held
    finally:
        lock.release()
