"""Which channel and peer a directory acts for, recorded by `create`/`pair` in the state directory.

Two sessions on one machine in two checkouts are two peers: the binding is per working directory
(the nearest bound ancestor counts). Nothing is written into the user's repository.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ._errors import NotBound, UsageError


@dataclass(frozen=True)
class Binding:
    url: str  # the join URL (with credentials, without key material)
    peer: str
    member: str  # random id of this membership (tells us apart from a namesake)
    role: str | None = None
    joined: str | None = None  # ISO time the membership began
    ca_file: str | None = None  # the CA given to create/pair for this broker (--ca)
    directory: str | None = None  # where it was recorded (None: from flag/environment)


def _file(state_dir: Path) -> Path:
    return state_dir / "bindings.json"


def _read(state_dir: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(_file(state_dir).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"bindings file {_file(state_dir)} is unreadable: {exc}") from None
    return data if isinstance(data, dict) else {}


@contextmanager
def _locked(state_dir: Path) -> Iterator[dict[str, dict[str, str]]]:
    from ._state import private_dir, private_file, store_errors

    with store_errors(_file(state_dir)):  # read-only or full: one line naming the file
        private_dir(state_dir)  # 0700: it holds channel keys and broker passwords
        lock_path = private_file(state_dir / "bindings.lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _read(state_dir)
        yield data
        with store_errors(_file(state_dir)):
            tmp = private_file(_file(state_dir).with_suffix(f".{os.getpid()}.tmp"))  # 0600 whatever the umask
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(_file(state_dir))


def find(state_dir: Path, cwd: Path) -> Binding | None:
    """The binding for ``cwd`` or its nearest bound ancestor."""
    data = _read(state_dir)
    for directory in (cwd, *cwd.parents):
        entry = data.get(str(directory))
        if entry:
            return Binding(**{**entry, "directory": str(directory)})
    return None


def record(state_dir: Path, cwd: Path, binding: Binding) -> Binding:
    """Bind ``cwd`` to ``binding``'s channel and name; returns the binding as recorded (with its directory)."""
    with _locked(state_dir) as data:
        entry = asdict(binding)
        entry.pop("directory")
        data[str(cwd)] = {k: v for k, v in entry.items() if v is not None}
    return replace(binding, directory=str(cwd))


def forget(state_dir: Path, directory: str) -> None:
    with _locked(state_dir) as data:
        data.pop(directory, None)


def require(binding: Binding | None) -> Binding:
    if binding is None:
        raise NotBound(
            "no mqttalk channel for this directory",
            "run `mqttalk create --as NAME` to start one, or `mqttalk pair URL --as NAME` to join one",
        )
    return binding


def bound_peers(state_dir: Path, channel: str) -> set[str]:
    """The peer names this machine's directories are bound as in ``channel`` (its agents here)."""
    from ._url import JoinURL

    names = set()
    for entry in _read(state_dir).values():
        try:
            if JoinURL.parse(entry["url"]).channel == channel:
                names.add(entry["peer"])
        except (KeyError, TypeError, UsageError):
            continue
    return names
