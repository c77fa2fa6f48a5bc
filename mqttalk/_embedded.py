"""Find or start the embedded broker in the background when no broker is configured.

The broker runs as a detached ``mqttalk broker`` process; its address, pid and database are
recorded in ``STATE_DIR/broker.json`` so later commands (and other sessions on this machine) reuse
it. When it has died (a crash, ``kill -9``, a reboot), the next command with a channel on it starts it
again on the same port from the same database (:func:`revive`), so the channel's URL stays valid and
what the broker had acknowledged is delivered. Nothing here imports the broker (amqtt).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ._errors import BrokerUnreachable
from ._url import BrokerAddress

START_TIMEOUT = 20.0


def _record_path(state_dir: Path) -> Path:
    return state_dir / "broker.json"


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _recorded(state_dir: Path) -> tuple[str, int, int | None, Path] | None:
    """(host, port, pid, database) of the recorded embedded broker, or None."""
    try:
        rec = json.loads(_record_path(state_dir).read_text())
        host, port = str(rec["host"]), int(rec["port"])
        pid = int(rec["pid"]) if rec.get("pid") else None
        db = Path(rec["db"]) if rec.get("db") else default_db(state_dir, port)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return host, port, pid, db


def default_db(state_dir: Path, port: int) -> Path:
    """Where ``mqttalk broker --port PORT`` keeps its state when not told (see cli.broker)."""
    return state_dir / f"broker-{port}.sqlite3"


def _alive(pid: int | None) -> bool:
    """Whether process ``pid`` still runs (a zombie does not; on Linux, nor does a pid reused by
    something that is not mqttalk)."""
    if pid is None:
        return False
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            return state not in ("Z", "X") and b"mqttalk" in (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: it exists
    return True


def running(state_dir: Path) -> BrokerAddress | None:
    """The recorded embedded broker, if it is still there."""
    rec = _recorded(state_dir)
    if rec is None:
        return None
    host, port, _, _ = rec
    return BrokerAddress("mqtt", host, port) if _listening(host, port) else None


def still_recorded(state_dir: Path) -> BrokerAddress | None:
    """The recorded embedded broker if its process lives or something listens at its address (a busy
    machine can make a live broker miss :func:`running`'s half-second connect)."""
    rec = _recorded(state_dir)
    if rec is None:
        return None
    host, port, pid, _ = rec
    return BrokerAddress("mqtt", host, port) if _alive(pid) or _listening(host, port) else None


def revive(state_dir: Path, address: BrokerAddress) -> bool:
    """If ``address`` is the recorded embedded broker and its process has died, start it again on the
    same port from the same database (under the lock ``ensure`` takes, so concurrent commands start one).

    Returns True if it was started. Cheap when it runs (reads broker.json and /proc, no connection). Never
    raises: a broker that will not start leaves the command to fail or queue as it would have anyway."""
    rec = _recorded(state_dir)
    if address.scheme != "mqtt" or rec is None or (rec[0], rec[1]) != (address.host, address.port) or _alive(rec[2]):
        return False
    try:
        with _locked(state_dir):
            rec = _recorded(state_dir)  # another command may have started it meanwhile
            if rec is None or (rec[0], rec[1]) != (address.host, address.port) or _alive(rec[2]):
                return False
            host, port, _, db = rec
            if _listening(host, port):
                return False  # something listens there already (a broker started by hand)
            _start(state_dir, host, port, db)
            return True
    except (OSError, BrokerUnreachable):
        return False


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "broker.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions starting at once get one broker
        yield


def ensure(state_dir: Path, host: str, port: int) -> tuple[BrokerAddress, bool]:
    """The embedded broker's address, starting it if needed. Returns (address, started_now)."""
    found = running(state_dir)
    if found:
        return found, False
    with _locked(state_dir):
        found = running(state_dir)
        if found:
            return found, False
        if port == 0 or _listening(host, port):
            port = _free_port(host)
        _start(state_dir, host, port, default_db(state_dir, port))
        return BrokerAddress("mqtt", host, port), True


def _start(state_dir: Path, host: str, port: int, db: Path) -> None:
    """Start ``mqttalk broker`` in the background (the caller holds the lock) and record it."""
    log = open(state_dir / "broker.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqttalk", "broker", "--host", host, "--port", str(port), "--db", str(db)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        close_fds=True,
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while not _listening(host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(OSError):
                proc.kill()
            raise BrokerUnreachable(
                f"the embedded broker did not start on {host}:{port}",
                f"see {state_dir / 'broker.log'}; or give a broker with --broker mqtt://HOST:PORT",
            )
        time.sleep(0.05)
    record(state_dir, host, port, proc.pid, db)


def record(state_dir: Path, host: str, port: int, pid: int, db: Path | None) -> None:
    """Write where a broker listens and keeps its state (atomically: a reader never sees half a file), so
    later commands reuse it and one that finds it dead starts it again from the same database (:func:`revive`)."""
    tmp = _record_path(state_dir).with_name(f"broker.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"host": host, "port": port, "pid": pid, "db": str(db) if db else None}))
    tmp.replace(_record_path(state_dir))


def stop(state_dir: Path) -> bool:
    """Stop the recorded background broker; True if one was stopped."""
    try:
        pid = int(json.loads(_record_path(state_dir).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return False
    finally:
        _record_path(state_dir).unlink(missing_ok=True)
    return True
