"""Sealed channels on a broker where anyone can listen: snoopers learn nothing, forgers get nowhere,
and no payload, however hostile, crashes a reader or reaches the agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import Session, channel_topics, join_url, paired, until_listening
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from mqttalk import JoinURL
from mqttalk._seal import Seal
from mqttalk._wire import decode_envelope, decode_presence, new_envelope


class Snooper:
    """A client subscribed to # on the broker, as anyone on a public broker can be."""

    def __init__(self, url: str) -> None:
        join = JoinURL.parse(url)
        self.seen: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_message = lambda _c, _u, m: self.seen.append((m.topic, m.payload))
        self.client.connect(join.broker.host, join.broker.port)
        self.client.subscribe("#", qos=1)
        self.client.loop_start()
        time.sleep(0.5)

    def wait_for(self, topic: str, within: float = 15.0) -> None:
        """Until a message on ``topic`` was seen (a loaded machine can take more than a fixed sleep)."""
        deadline = time.monotonic() + within
        while not any(t == topic for t, _ in list(self.seen)) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, under: str = "") -> bytes:
        """Everything seen (on topics under ``under``): the machine's broker keeps other tests' traffic."""
        time.sleep(0.5)
        self.client.disconnect()  # (first: it wakes the network loop, which loop_stop would wait up to 1 s for)
        self.client.loop_stop()
        return b"\n".join(t.encode() + b" " + p for t, p in self.seen if t.startswith(under))


def test_a_snooper_on_hash_sees_no_plaintext(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    snoop = Snooper(broker_url + "/x/abcdefgh12345678#plain")
    url = paired(impl, tests, broker_url, "--role", "owns-src-api-users")
    channel_id = JoinURL.parse(url).channel
    impl.ok("send", "--kind", "spec", "--subject", "POST /users", "POST /users takes {email,name} CANARY-SPEC")
    tests.ok("send", "--kind", "status", "--state", "red", "tests written, all red CANARY-STATUS")
    tests.ok("recv")
    impl.ok("recv")
    impl.ok("status")
    tests.ok("leave")
    root: str = channel_topics(url).root  # type: ignore[attr-defined]
    wire = snoop.stop(under=root)
    assert wire.count(root.encode()) >= 6, "the snooper saw the session's traffic"
    for secret in (
        b"CANARY",
        b"POST /users",
        b"impl",
        b"tests",
        b"owns-src-api-users",
        b'"kind"',
        b"spec",
        b"status",
        b"red",
        channel_id.encode(),
        JoinURL.parse(url).key.encode(),
    ):  # type: ignore[union-attr]
        assert secret not in wire, f"{secret!r} visible on the wire"


def test_a_forged_presence_never_pairs(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, _ = sessions
    url = join_url(impl.ok("create", "--as", "impl", "--broker", broker_url))
    topics: Any = channel_topics(url)
    join = JoinURL.parse(url)
    presence = json.dumps(
        {
            "v": 1,
            "peer": "mallory",
            "state": "online",
            "member": "x",
            "since": "2026-01-01T00:00:00Z",
            "hb": "2026-01-01T00:00:00Z",
        }
    ).encode()
    forger = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    forger.connect(join.broker.host, join.broker.port)
    forger.loop_start()
    for payload in (presence, Seal.new().seal(topics.presence("mallory"), presence)):  # plain, or wrong key
        forger.publish(topics.presence("mallory"), payload, qos=1, retain=True).wait_for_publish(5)
    forger.disconnect()  # (first: it wakes the network loop, which loop_stop would wait up to 1 s for)
    forger.loop_stop()
    got = impl.run("recv", "--wait", "1")
    assert "PAIRED" not in got.out and "mallory" not in got.out
    assert "DECRYPT_FAIL" in got.err


def test_a_wrong_key_reaches_nobody_and_says_so(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    url = join_url(impl.ok("create", "--as", "impl", "--broker", broker_url))
    wrong = url.split("#k=")[0] + "#k=" + Seal.new().token
    res = tests.run("pair", wrong, "--as", "tests", "--wait", "1")
    assert res.code == 2  # the channel id is derived from the key: a wrong key is refused before connecting
    assert "Traceback" not in res.err and "does not belong to its channel" in res.err
    assert "PAIRED" not in impl.ok("recv").out
    broken = url[:-5]  # a key cut short when pasted
    res = tests.run("pair", broken, "--as", "tests")
    assert res.code == 2 and "channel key" in res.err and "Traceback" not in res.err


def test_plain_channels_are_readable_json_and_say_so(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    snoop = Snooper(broker_url + "/x/abcdefgh12345678#plain")
    url = paired(impl, tests, broker_url, "--plain")
    assert "#k=" not in url
    impl.ok("send", "readable by dashboards")
    wire = snoop.stop(under=channel_topics(url).root)  # type: ignore[attr-defined]
    assert b"readable by dashboards" in wire
    assert "(plain, " in tests.ok("status").out


def test_plain_on_a_public_broker_warns_loudly(sessions: tuple[Session, Session]) -> None:
    impl, _ = sessions
    # (no network here: the warning comes before the connection, which then fails)
    res = impl.run("create", "--plain", "--broker", "mqtt://broker.hivemq.com:1", "--connect-timeout", "0.5")
    assert "WARNING: a --plain channel on the public broker broker.hivemq.com" in res.err
    sealed = impl.run("create", "--broker", "mqtt://broker.hivemq.com:1", "--connect-timeout", "0.5")
    assert "WARNING" not in sealed.err


@pytest.mark.timeout(600)  # (10,000 examples of pure CPU work: minutes when the machine is shared)
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2048), st.text(max_size=512).map(str.encode)))
def test_random_payloads_never_crash_the_decoder(payload: bytes) -> None:
    seal = _SEAL
    assert seal.open("mqttalk/v1/x/msg/y", payload) is None or payload[:1] == b"\x01"
    env = decode_envelope(payload)
    assert env is None or env.id  # a valid envelope is one we could have meant; nothing else gets through
    decode_presence(payload)


_SEAL = Seal.new()
_GOOD = new_envelope("impl", "status", "tests written, all red", data={"state": "red"}).encode()
_TOPIC = "mqttalk/v1/abc/msg/impl"
_SEALED = _SEAL.seal(_TOPIC, _GOOD)


@pytest.mark.timeout(600)  # (10,000 examples of pure CPU work: minutes when the machine is shared)
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(_SEALED) - 1), st.integers(1, 255), st.integers(0, len(_GOOD) - 1), st.integers(0, 255))
def test_mutated_payloads_never_open_or_crash(at: int, flip: int, at_plain: int, byte: int) -> None:
    mutated = bytearray(_SEALED)
    mutated[at] ^= flip
    assert _SEAL.open(_TOPIC, bytes(mutated)) is None  # any change to a sealed payload is caught
    plain = bytearray(_GOOD)
    plain[at_plain] = byte
    env = decode_envelope(bytes(plain))  # a mutated plain envelope decodes or not, but never raises
    assert env is None or env.kind


def test_terminal_escapes_in_bodies_are_neutralised_on_a_terminal(
    sessions: tuple[Session, Session], broker_url: str
) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    impl.ok("send", "-", input="before\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x1b[0m after\n")
    script = subprocess.run(
        ["script", "-qec", "mqttalk recv", "/dev/null"],
        cwd=tests.cwd,
        env={**tests.env, "PATH": os.path.dirname(__import__("sys").executable) + ":" + os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "before" in script.stdout and "after" in script.stdout
    assert "\x1b" not in script.stdout.replace("\x1b[?2004l", "").replace("\x1b[?2004h", "")
    assert "\\x1b]0;pwned" in script.stdout
    raw = json.loads(tests.ok("log", "--json").lines[-1])["body"]
    assert raw.startswith("before\x1b]0;pwned")  # stored and --json untouched: programs get the real bytes


def test_a_replayed_old_presence_does_not_bring_a_peer_back(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    url = paired(impl, tests, broker_url)
    topics: Any = channel_topics(url)
    snoop = Snooper(url)  # the attacker records impl's sealed, retained presence while impl is there
    snoop.client.subscribe(topics.presence("impl"), qos=1)  # (re)delivers the retained one
    snoop.wait_for(topics.presence("impl"))
    snoop.stop()
    old = [p for t, p in snoop.seen if t == topics.presence("impl")]
    assert old, "the retained presence was on the wire"
    impl.ok("leave")
    assert "impl: left" in tests.ok("status").out
    join = JoinURL.parse(url)
    attacker = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    attacker.connect(join.broker.host, join.broker.port)
    attacker.loop_start()
    attacker.publish(topics.presence("impl"), old[0], qos=1, retain=True).wait_for_publish(5)
    attacker.disconnect()  # (first: it wakes the network loop, which loop_stop would wait up to 1 s for)
    attacker.loop_stop()
    res = tests.ok("status")
    assert "impl: left" in res.out  # the replay opens (it is genuine), but it is older than what we saw
    assert "an old presence of impl was replayed" in res.err


def test_pair_reads_the_url_from_stdin(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url, url_on_stdin=True)


def test_a_stale_or_replayed_presence_never_yields_paired(sessions: tuple[Session, Session], broker_url: str) -> None:
    """PAIRED needs a presence that answers this join's fresh challenge. impl's genuine "online"
    presence, recorded while it listened and replayed after it is gone, shows impl as online to a
    newcomer, but cannot answer: no PAIRED, however long one waits."""
    impl, tests = sessions
    url = join_url(impl.ok("create", "--as", "impl", "--broker", broker_url))
    topics: Any = channel_topics(url)
    listener = impl.start("listen", "--timeout", "60")
    until_listening(listener)
    assert "PAIRED with impl" in tests.ok("pair", url, "--as", "tests").out  # impl is live: it answers
    snoop = Snooper(url)  # the attacker records impl's live presence (it answers tests' challenge)
    snoop.client.subscribe(topics.presence("impl"), qos=1)
    snoop.wait_for(topics.presence("impl"))
    snoop.stop()
    recorded = [
        decode_presence(Seal.from_token(JoinURL.parse(url).key or "").open(topics.presence("impl"), p) or b"")
        for t, p in snoop.seen
        if t == topics.presence("impl")
    ]
    assert any(p is not None and p.state == "online" and p.answers for p in recorded)
    online = next(p for t, p in snoop.seen if t == topics.presence("impl"))
    listener.send_signal(signal.SIGINT)
    listener.communicate(timeout=20)
    # impl's machine is gone for good; the attacker puts its old "online" presence back.
    join = JoinURL.parse(url)
    attacker = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    attacker.connect(join.broker.host, join.broker.port)
    attacker.loop_start()
    attacker.publish(topics.presence("impl"), online, qos=1, retain=True).wait_for_publish(5)
    attacker.disconnect()  # (first: it wakes the network loop, which loop_stop would wait up to 1 s for)
    attacker.loop_stop()

    newcomer = Session("docs", impl.cwd.parent)  # never saw impl: the replay looks fresh and online to it
    res = newcomer.run("pair", url, "--as", "docs", "--wait", "3")
    assert res.code == 3 and "PAIRED" not in res.out
    assert "impl and tests are in the channel but did not answer the pairing challenge within 3s" in res.err
    st = newcomer.ok("status").out
    assert "impl: online (has not answered our pairing challenge yet)" in st
    again = tests.run("pair", url, "--as", "tests", "--wait", "3")  # tests pairs again: a new challenge
    assert again.code == 3 and "PAIRED with impl" not in again.out
    # (tests and docs, both genuine and each running while the other waited, may pair with each other)
    assert "PAIRED with impl" not in tests.ok("recv").out + newcomer.ok("recv").out


def test_sealed_payloads_tell_only_a_size_bucket() -> None:
    """A note of 1 character and one of 60 look the same on the wire; they still open to what was sent."""
    seal = Seal.new()
    sizes = set()
    for n in (1, 20, 60):
        env = new_envelope("impl", "note", "x" * n).encode()
        sealed = seal.seal(_TOPIC, env)
        sizes.add(len(sealed))
        assert seal.open(_TOPIC, sealed) == env
    assert len(sizes) == 1
    big = seal.seal(_TOPIC, new_envelope("impl", "note", "y" * 3000).encode())
    assert len(big) - 29 == 4096  # the next power of two (29: version, nonce and tag)
