"""The library API, in process, as a Python program would use it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

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
    tests, others = mqttalk.pair(impl.url.render(), "tests", settings=settings, cwd=b_dir, on_event=events.append)
    waiting.join(30)
    assert others == ["impl"] and waited == [["tests"]]
    assert [(e.kind, e.peer, e.detail) for e in events] == [("paired", "impl", "api")]

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
    bound, binding = mqttalk.open_channel(settings, cwd=b_dir / "sub")  # nearest bound ancestor
    assert bound.me == "tests" and binding is not None and binding.directory == str(b_dir.resolve())

    with pytest.raises(mqttalk.BadMessage):
        impl.send("x", kind="status", data={"state": "purple"})
    assert not tests.fetch(wait=0.5)  # a wait that runs out returns nothing; it does not raise


def test_library_errors_carry_exit_codes(tmp_path: Path) -> None:
    with pytest.raises(mqttalk.NotBound) as err:
        mqttalk.open_channel(mqttalk.Settings.load(), cwd=tmp_path)
    assert err.value.exit_code == 4
    with pytest.raises(mqttalk.BadJoinURL) as bad:
        mqttalk.pair("mqtt://h/only-one-level", "tests", cwd=tmp_path)
    assert bad.value.exit_code == 2

