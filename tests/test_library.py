"""The library API, in process, as a Python program would use it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import pair_in_process

import mqttalk


def test_library_create_pair_send_fetch(tmp_path: Path, broker_url: str) -> None:
    settings = mqttalk.Settings.load(broker=broker_url)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    events: list[mqttalk.Event] = []
    impl = mqttalk.create("impl", role="api", settings=settings, cwd=a_dir)
    waited: list[list[str]] = []  # impl waits for its peer (as `create --wait` does), so it answers at once
    waiting = threading.Thread(target=lambda: waited.append(impl.join(20, new_challenge=False)))
    waiting.start()
    time.sleep(0.5)
    tests = mqttalk.pair(impl.url.render(), "tests", settings=settings, cwd=b_dir, on_event=events.append)
    waiting.join(30)
    assert tests.paired == ["impl"] and waited == [["tests"]]
    assert [(e.kind, e.peer, e.role) for e in events] == [("paired", "impl", "api")]
    assert tests.binding is not None and tests.binding.directory == str(b_dir.resolve())

    sent = impl.send("tests written?", kind="question")
    spec = impl.send("v2", kind="spec", data={"subject": "POST /users", "rev": 2})
    got = tests.fetch()
    assert [m.envelope.id for m in got.messages] == [sent.id, spec.id]
    assert [m.envelope.seq for m in got.messages] == [1, 2]
    typed = got.messages[1].envelope.typed()
    assert isinstance(typed, mqttalk.SpecData) and typed.rev == 2
    assert len(tests.fetch().messages) == 2  # not marked read yet
    tests.mark_read(got)
    assert not tests.fetch()

    (b_dir / "sub").mkdir()
    bound = mqttalk.open_channel(settings, cwd=b_dir / "sub")  # nearest bound ancestor
    assert bound.me == "tests" and bound.binding is not None and bound.binding.directory == str(b_dir.resolve())

    with pytest.raises(mqttalk.errors.BadMessage):
        impl.send("x", kind="status", data={"state": "purple"})
    assert not tests.fetch(wait=0.5)  # a wait that runs out returns nothing; it does not raise


def test_library_errors_carry_exit_codes(tmp_path: Path) -> None:
    with pytest.raises(mqttalk.errors.NotBound) as err:
        mqttalk.open_channel(mqttalk.Settings.load(), cwd=tmp_path)
    assert err.value.exit_code == 4
    with pytest.raises(mqttalk.errors.BadJoinURL) as bad:
        mqttalk.pair("mqtt://h/only-one-level", "tests", cwd=tmp_path)
    assert bad.value.exit_code == 2


def test_a_message_the_library_refuses_is_refused_alone_and_at_once(tmp_path: Path, broker_url: str) -> None:
    """The 51st of 100 wait=False sends holds a lone surrogate: it raises at its own call, and the other
    99 are recorded, sent and received."""
    impl, tests = pair_in_process(tmp_path, broker_url)
    with impl.live(online=False) as live:
        for i in range(100):
            if i == 50:
                with pytest.raises(mqttalk.errors.BadMessage, match="surrogate"):
                    live.send("bad \udcff", wait=False)
                continue
            live.send(f"message {i}", wait=False)
        live.drain()
    got = tests.fetch()
    assert [m.envelope.body for m in got.messages] == [f"message {i}" for i in range(100) if i != 50]


def test_a_full_disk_loses_no_message_the_library_accepted(tmp_path: Path, broker_url: str) -> None:
    """The outbox write of a batch fails (SQLite: database or disk is full): it raises, and every message
    of the batch is still there for the next write; nothing is half-written."""
    import sqlite3

    impl, tests = pair_in_process(tmp_path, broker_url)
    store = impl.store
    with impl.live(online=False) as live:
        live.send("before", wait=True)
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from here on
        with pytest.raises(sqlite3.OperationalError, match="full"):
            for i in range(100):  # the 100th send writes the batch of 100
                live.send(f"message {i} " + "x" * 2000, wait=False)
        assert not store.pending(impl.url.channel, impl.me)  # nothing half-written
        store.db.execute("PRAGMA max_page_count = 1073741823")  # space again
        live.drain()
    got = tests.fetch()
    bodies = [m.envelope.body.split(" x")[0] for m in got.messages]
    assert bodies == ["before"] + [f"message {i}" for i in range(100)]
    assert [m.envelope.seq for m in got.messages] == list(range(1, 102))


def test_the_package_docstring_example_runs(
    tmp_path: Path, mosquitto_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example a newcomer reads first (``help(mqttalk)``) is run as a doctest against a real broker."""
    import doctest

    monkeypatch.setenv("MQTTALK_BROKER", mosquitto_url)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("MQTTALK_CHANNEL", "MQTTALK_PEER", "MQTTALK_CONFIG", "MQTTALK_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    tests = doctest.DocTestFinder(recurse=False).find(mqttalk)
    assert len(tests) == 1 and len(tests[0].examples) >= 8
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(tests[0])
    assert runner.summarize(verbose=False) == doctest.TestResults(0, len(tests[0].examples))


def test_the_public_api_is_small_and_every_name_resolves() -> None:
    assert len(mqttalk.__all__) <= 16
    for name in mqttalk.__all__:
        assert getattr(mqttalk, name) is not None
    channel = mqttalk.Channel
    assert mqttalk.create.__annotations__["return"] == mqttalk.pair.__annotations__["return"] == "Channel"
    assert mqttalk.open_channel.__annotations__["return"] == "Channel" and channel.__name__ == "Channel"
    assert issubclass(mqttalk.errors.Queued, mqttalk.MqttalkError)
