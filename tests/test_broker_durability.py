"""The embedded broker keeps what it acknowledged (issue 13, case 2): stopped with SIGTERM or killed with
SIGKILL mid-delivery and started again from the same database, it delivers every message whose PUBACK
the sender got, exactly once; and a dead embedded broker is started again by the next command.

Real processes and sockets throughout: `mqttalk broker` (the conftest EmbeddedBroker: restarted on the
same port with the same database), `mqttalk listen` as the live reader, the library as the sender."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import EmbeddedBroker, Session, paired, status_of

COUNT = 2000  # enough that the broker holds hundreds acknowledged but undelivered when it goes


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker(tmp_path / "amqtt-state")
    b.start()
    try:
        yield b
    finally:
        b.stop()


def _messages(session: Session) -> list[dict[str, Any]]:
    res = session.ok("recv", "--json")
    return [m for m in map(json.loads, res.lines) if m.get("event") == "message"]


class Sender:
    """The library sender of the issue: `live.send(wait=False)` x COUNT then `drain()`, in a thread.
    A broker that goes away ends it (the unacknowledged rest stays in the outbox)."""

    def __init__(self, session: Session, count: int = COUNT) -> None:
        self.channel: Any = session.channel()
        self.count = count
        self.ids: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.channel.live(online=False) as live:
                for i in range(self.count):
                    self.ids.append(live.send(f"message {i}", wait=False).id)
                live.drain(timeout=60)
        except Exception as exc:  # noqa: BLE001 - the broker went away mid-stream: expected
            self.error = exc

    def acknowledged(self) -> set[str]:
        ch = self.channel
        return set(self.ids) - {p.id for p in ch.store.pending(ch.url.channel, ch.me)}

    def finish(self) -> None:
        """Send what the outbox still holds (the broker is back)."""
        self.thread.join(60)
        assert not self.thread.is_alive(), "the sender hung"
        with self.channel.live(online=False) as live:
            live.drain(timeout=60)
        assert len(self.ids) == self.count
        assert not self.acknowledged() ^ set(self.ids), "the outbox is not empty after the broker came back"


class Listener:
    """`mqttalk listen` for a session, counting the MESSAGE lines it prints."""

    def __init__(self, session: Session) -> None:
        self.proc = session.start("listen", "--timeout", "120")
        self.shown = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout or []:
            if line.split()[1:2] == ["MESSAGE"]:
                self.shown += 1

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)


def _wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _wait_online(session: Session, peer: str) -> None:
    def online() -> bool:
        time.sleep(0.2)
        return any(p["name"] == peer and p["state"] == "online" for p in status_of(session)["peers"])

    _wait_for(online, 20, f"{peer} online")


def _assert_all_once(tests: Session, acknowledged: set[str], ids: list[str]) -> None:
    msgs = _messages(tests)
    got = [m["id"] for m in msgs]
    lost = acknowledged - set(got)
    assert not lost, f"{len(lost)} of the {len(acknowledged)} acknowledged before the broker went never arrived"
    missing = set(ids) - set(got)
    assert not missing, f"{len(missing)} of {len(ids)} never arrived"
    assert len(got) == len(set(got)), "a message was shown twice"
    assert _messages(tests) == []


def _wait_delivered(tests: Session, listener: Listener | None, count: int) -> None:
    """Until a live reader has shown ``count`` messages, or shows no more for 10 s (then `recv` tells)."""
    if listener is not None:
        last, since = -1, time.monotonic()
        while listener.shown < count and time.monotonic() - since < 10:
            if listener.shown != last:
                last, since = listener.shown, time.monotonic()
            time.sleep(0.05)
        listener.stop()


@pytest.mark.parametrize("reader", ["live", "offline"])
def test_sigterm_mid_delivery_loses_nothing_acknowledged(
    sessions: tuple[Session, Session], broker: EmbeddedBroker, reader: str
) -> None:
    impl, tests = sessions
    paired(impl, tests, broker.url)
    listener = Listener(tests) if reader == "live" else None
    if listener is not None:
        _wait_online(impl, "tests")
    sender = Sender(impl)
    try:
        if listener is not None:
            _wait_for(lambda: listener.shown >= 300, 30, "the listener to show 300 messages")
        else:
            _wait_for(lambda: len(sender.acknowledged()) >= COUNT // 2, 30, "half the messages acknowledged")
        broker.stop()  # SIGTERM, mid-delivery
        sender.thread.join(30)
        acknowledged = sender.acknowledged()
        assert len(acknowledged) >= 300
        broker.start()  # same port, same database
        sender.finish()
        _wait_delivered(tests, listener, COUNT)
    finally:
        if listener is not None:
            listener.stop()
    _assert_all_once(tests, acknowledged, sender.ids)


def test_kill_9_mid_delivery_loses_nothing_acknowledged(
    sessions: tuple[Session, Session], broker: EmbeddedBroker
) -> None:
    """kill -9 while the reader collects what was queued for it while it was away.

    (A kill -9 while a live reader keeps up, or is stalled with SIGSTOP, lost nothing even before the
    fix: the sender is paced by the reader, and what the broker wrote to a stalled reader waits in the
    kernel's socket buffers, which outlive the broker. So this is the kill -9 case that did lose.)"""
    impl, tests = sessions
    paired(impl, tests, broker.url)
    sender = Sender(impl)
    sender.thread.join(60)
    assert sender.error is None and len(sender.acknowledged()) == COUNT
    listener = Listener(tests)
    try:
        _wait_for(lambda: listener.shown >= 200, 30, "the listener to show 200 messages")
        assert broker.proc is not None
        broker.proc.kill()  # SIGKILL mid-delivery: no chance to save anything
        broker.proc.wait()
        broker.start()
        sender.finish()
        _wait_delivered(tests, listener, COUNT)
    finally:
        listener.stop()
    _assert_all_once(tests, set(sender.ids), sender.ids)


def test_a_dead_embedded_broker_is_started_again_by_the_next_command(sessions: tuple[Session, Session]) -> None:
    impl, tests = sessions
    env = {"MQTTALK_EMBEDDED_PORT": "0"}  # a free port: never the developer's 1884
    for s in (impl, tests):
        s.env.update(env)
    paired(impl, tests, None)
    record = impl.state_dir / "broker.json"
    before = json.loads(record.read_text())
    try:
        for i in range(3):
            impl.ok("send", f"before the crash {i}")
        os.kill(before["pid"], signal.SIGKILL)
        _wait_for(lambda: not _listening(before["port"]), 10, "the broker to die")
        res = impl.run("send", "after the crash")
        assert res.code == 0, f"send exited {res.code}: {res.err}"
        after = json.loads(record.read_text())
        assert after["port"] == before["port"] and after["pid"] != before["pid"]
        assert [m["body"] for m in _messages(tests)] == [
            *(f"before the crash {i}" for i in range(3)),
            "after the crash",
        ]
        # and recv, status, listen... as well: another crash, then recv of the other peer's reply
        tests.ok("send", "reply")
        os.kill(after["pid"], signal.SIGKILL)
        _wait_for(lambda: not _listening(after["port"]), 10, "the broker to die again")
        assert [m["body"] for m in _messages(impl)] == ["reply"]
    finally:
        _stop_recorded(record)


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop_recorded(record: Path) -> None:
    try:
        pid = int(json.loads(record.read_text())["pid"])
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, KeyError):
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    subprocess.run(["kill", "-9", str(pid)], check=False)
