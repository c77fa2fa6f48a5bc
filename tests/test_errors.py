"""Bad input gets one clear line on stderr and a non-zero exit: never a traceback, never a hang."""

from __future__ import annotations

import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import Session, channel_topics, free_port, join_url, paired
from paho.mqtt.enums import CallbackAPIVersion

from mqttalk import JoinURL


def one_clear_line(res: object, code: int, *needles: str) -> None:
    err = res.err  # type: ignore[attr-defined]
    assert res.code == code, f"exit {res.code}, expected {code}: {err}"  # type: ignore[attr-defined]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("mqttalk: error: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("mqtt//broken", "scheme"),
        ("http://example.com/mqttalk/v1/abcdefgh12345678#plain", "unsupported scheme"),
        ("mqtt://127.0.0.1:1883", "no channel"),
        ("mqtt://127.0.0.1:notaport/mqttalk/v1/abcdefgh12345678#plain", "malformed"),
        ("mqtt://127.0.0.1/mqttalk/v1/bad!channel", "not valid"),
    ],
)
def test_malformed_join_url(sessions: tuple[Session, Session], url: str, needle: str) -> None:
    _, tests = sessions
    one_clear_line(tests.run("pair", url, "--as", "tests"), 2, needle)


def test_unreachable_broker_fails_fast_and_clearly(sessions: tuple[Session, Session]) -> None:
    impl, tests = sessions
    port = free_port()  # nothing listens there
    started = time.monotonic()
    one_clear_line(
        impl.run("create", "--as", "impl", "--broker", f"mqtt://127.0.0.1:{port}"), 5, "nothing is listening", str(port)
    )
    one_clear_line(
        tests.run("pair", f"mqtt://127.0.0.1:{port}/mqttalk/v1/abcdefgh12345678#plain"), 5, "nothing is listening"
    )
    one_clear_line(
        tests.run("pair", "mqtt://no-such-host.invalid:1883/mqttalk/v1/abcdefgh12345678#plain"), 5, "cannot resolve"
    )
    assert time.monotonic() - started < 10


def test_silent_broker_times_out_within_the_connect_timeout(sessions: tuple[Session, Session]) -> None:
    import socket

    _, tests = sessions
    with socket.socket() as silent:  # accepts TCP, never speaks MQTT
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        res = tests.run("pair", f"mqtt://127.0.0.1:{port}/mqttalk/v1/abcdefgh12345678#plain", "--connect-timeout", "1")
        took = time.monotonic() - started
    one_clear_line(res, 5, "no MQTT answer")
    assert took < 8


def test_commands_without_a_binding_say_how_to_get_one(sessions: tuple[Session, Session]) -> None:
    impl, _ = sessions
    for args in (["send", "hi"], ["recv"], ["status"], ["leave"]):
        one_clear_line(impl.run(*args), 4, "no mqttalk channel for this directory", "mqttalk create", "mqttalk pair")


def test_bad_messages_are_refused_before_connecting(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    one_clear_line(impl.run("send", ""), 2, "empty message")
    one_clear_line(impl.run("send", "-", input=""), 2, "empty message")
    one_clear_line(impl.run("send"), 2, "empty message")
    one_clear_line(impl.run("send", "--kind", "shout", "hi"), 2, "unknown kind", "note, spec")
    one_clear_line(impl.run("send", "--kind", "status", "x"), 2, "needs --state")
    one_clear_line(impl.run("send", "--kind", "status", "--state", "purple", "x"), 2, "state")
    one_clear_line(impl.run("send", "--kind", "answer", "x"), 2, "--re")
    one_clear_line(impl.run("send", "--state", "red", "x"), 2, "only applies")
    one_clear_line(impl.run("send", "--to", "Bad Name", "x"), 2, "peer name")
    one_clear_line(impl.run("send", "--file", "/no/such/file"), 2, "cannot read")
    one_clear_line(impl.run("send", "-", input="x" * 300_000), 2, "limit")
    one_clear_line(impl.run("send", "--bogus"), 2, "No such option")
    one_clear_line(impl.run("frobnicate"), 2, "No such command")
    assert "MESSAGE" not in tests.ok("recv").out  # nothing half-sent


def test_bad_names_and_settings(sessions: tuple[Session, Session]) -> None:
    impl, _ = sessions
    one_clear_line(impl.run("create", "--as", "Impl Team"), 2, "peer name")
    one_clear_line(impl.run("create", "--as", "impl", "--broker", "ftp://x"), 2, "scheme")
    one_clear_line(impl.run("create", "--as", "impl", "--prefix", "a/+/b"), 2, "prefix")
    assert not (impl.state_dir / "broker.json").exists()  # no embedded broker started for a bad prefix
    one_clear_line(impl.run("status", env={"MQTTALK_CONNECT_TIMEOUT": "-1"}), 2, "connect_timeout")


def test_garbage_on_a_plain_channel_is_dropped_not_delivered(
    sessions: tuple[Session, Session], broker_url: str
) -> None:
    impl, tests = sessions
    url = paired(impl, tests, broker_url, "--plain")
    topics: Any = channel_topics(url)
    junk = [
        b"not json",
        b"\x00\xff" * 10,
        b'{"id":"x"}',
        b"[1,2,3]",
        b'{"v":1,"id":"y","ts":"2026-01-01T00:00:00Z","from":"someone-else","kind":"note","body":"spoof"}',
    ]
    _publish_raw(
        url, [(topics.msg("impl"), p, False) for p in junk] + [(topics.presence("ghost"), b"garbage presence", True)]
    )
    impl.ok("send", "the real one")
    res = tests.ok("recv")
    assert "the real one" in res.out
    assert "spoof" not in res.out
    assert res.out.count("mqttalk: MESSAGE") == 1
    # five messages and the presence, told in one summary line (a flood costs one line, not thousands)
    assert res.err.count("mqttalk: DROPPED") == 1
    assert f"mqttalk: DROPPED {len(junk) + 1} payloads" in res.err
    assert "Traceback" not in res.err
    assert "ghost" not in tests.ok("status").out


def test_payloads_that_do_not_open_are_dropped_and_reported(sessions: tuple[Session, Session], broker_url: str) -> None:
    from mqttalk._seal import Seal

    impl, tests = sessions
    url = paired(impl, tests, broker_url)
    topics: Any = channel_topics(url)
    forged = Seal.new()  # a forger who knows the topics (say, from a leaked URL without the key) but not the key
    env = b'{"v":1,"id":"f1","ts":"2026-01-01T00:00:00Z","from":"impl","kind":"note","body":"forged"}'
    _publish_raw(
        url,
        [
            (topics.msg("impl"), b"plain text, not sealed", False),
            (topics.msg("impl"), forged.seal(topics.msg("impl"), env), False),
            # a genuine sealed payload moved to another topic does not open either
            (topics.msg("impl"), topics.seal.seal(topics.msg("tests"), env), False),
            (topics.presence("ghost"), forged.seal(topics.presence("ghost"), b"{}"), True),
        ],
    )
    impl.ok("send", "the real one")
    res = tests.ok("recv")
    assert res.out.count("mqttalk: MESSAGE") == 1 and "the real one" in res.out and "forged" not in res.out
    assert res.err.count("mqttalk: DECRYPT_FAIL") == 1 and "mqttalk: DECRYPT_FAIL 4 payloads" in res.err
    assert "ghost" not in tests.ok("status").out


def _publish_raw(url: str, items: list[tuple[str, bytes, bool]]) -> None:
    """Publish as a hostile client would: raw paho, straight onto the channel's topics."""
    join = JoinURL.parse(url)
    hostile = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    hostile.connect(join.broker.host, join.broker.port)
    hostile.loop_start()
    for topic, payload, retain in items:
        hostile.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    hostile.disconnect()  # (first: it wakes the network loop, which loop_stop would wait up to 1 s for)
    hostile.loop_stop()


def test_help_teaches_the_story() -> None:
    import subprocess

    from conftest import MQTTALK

    out = subprocess.run([MQTTALK, "--help"], capture_output=True, text=True, check=True).stdout
    for needle in (
        "mqttalk create --as impl",
        "mqttalk pair URL",
        "--kind status --state red",
        "recv --wait",
        "Exit codes",
    ):
        assert needle in out
    send_help = subprocess.run([MQTTALK, "send", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--kind" in send_help and "stdin" in send_help


def test_create_without_broker_starts_the_embedded_one(sessions: tuple[Session, Session]) -> None:
    impl, tests = sessions
    port = free_port()
    env = {"MQTTALK_EMBEDDED_PORT": str(port)}
    try:
        url = paired(impl, tests, None, env=env)
        assert url.startswith(f"mqtt://127.0.0.1:{port}/")
        again = impl.run("create", "--as", "impl2", env=env)  # reuses the running broker
        assert join_url(again).startswith(f"mqtt://127.0.0.1:{port}/")
    finally:
        from mqttalk._embedded import stop

        assert stop(impl.state_dir)
