"""Find or start the embedded broker in the background when no broker is configured.

The broker runs as a detached ``mqttalk broker`` process; its address and pid are recorded in
``STATE_DIR/broker.json`` so later commands (and other sessions on this machine) reuse it.
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


def running(state_dir: Path) -> BrokerAddress | None:
    """The recorded embedded broker, if it is still there."""
    try:
        rec = json.loads(_record_path(state_dir).read_text())
        host, port = str(rec["host"]), int(rec["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return BrokerAddress("mqtt", host, port) if _listening(host, port) else None


def ensure(state_dir: Path, host: str, port: int) -> tuple[BrokerAddress, bool]:
    """The embedded broker's address, starting it if needed. Returns (address, started_now)."""
    found = running(state_dir)
    if found:
        return found, False
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "broker.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions starting at once get one broker
        found = running(state_dir)
        if found:
            return found, False
        if port == 0 or _listening(host, port):
            port = _free_port(host)
        log = open(state_dir / "broker.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "mqttalk", "broker", "--host", host, "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
        )
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
        tmp = _record_path(state_dir).with_suffix(".tmp")
        tmp.write_text(json.dumps({"host": host, "port": port, "pid": proc.pid}))
        tmp.replace(_record_path(state_dir))
        return BrokerAddress("mqtt", host, port), True


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
