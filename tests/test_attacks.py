"""The attacker's scripts: a client on the broker with and without the channel key, trying to take a peer's
session, disable the channel for everyone, poison presence, or lure a newcomer into a wrong channel.
Each is run against Mosquitto and the embedded broker; after each, the channel keeps delivering."""

from __future__ import annotations

import json
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import Session, channel_topics, join_url, paired
from paho.mqtt.enums import CallbackAPIVersion

from mqttalk import JoinURL
from mqttalk._wire import new_envelope, now


class Attacker:
    """A raw paho client on the channel's broker: it reads everything (#) and publishes anything."""

    def __init__(self, url: str, *, client_id: str = "", clean: bool = True) -> None:
        join = JoinURL.parse(url)
        self.url = url
        self.topics: Any = channel_topics(url)
        self.seen: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                  clean_session=clean)
        self.client.on_message = lambda _c, _u, m: self.seen.append((m.topic, m.payload))
        self.client.connect(join.broker.host, join.broker.port)
        self.client.loop_start()

    def listen(self, topic: str = "#") -> Attacker:
        self.client.subscribe(topic, qos=1)
        time.sleep(0.3)
        return self

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, sealed: bool = True) -> None:
        if sealed and self.topics.seal is not None:
            payload = self.topics.seal.seal(topic, payload)
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def stop(self) -> list[tuple[str, bytes]]:
        time.sleep(0.3)
        self.client.loop_stop()
        self.client.disconnect()
        return self.seen


def bodies(session: Session) -> list[str]:
    lines = session.ok("recv", "--json").lines
    return [m["body"] for m in map(json.loads, lines) if m.get("event") == "message"]


def test_no_client_id_can_be_read_off_the_wire_or_used_to_take_a_session(sessions: tuple[Session, Session],
                                                                          broker_url: str) -> None:
    """Case 1. A stranger on # collects every topic level it sees and connects with each as a persistent
    client id (as it could when the sync topic ended in the reader's client id): it takes no queue."""
    impl, tests = sessions
    url = paired(impl, tests, broker_url)
    snoop = Attacker(url).listen()
    tests.ok("recv")
    impl.ok("status")
    impl.ok("send", "one")
    seen = snoop.stop()
    ids = {impl.channel().client_id, tests.channel().client_id}  # type: ignore[attr-defined]
    wire = b"\n".join(t.encode() + b" " + p for t, p in seen)
    assert not any(cid.encode() in wire for cid in ids), "a client id is on the wire"
    root = snoop.topics.root
    levels = {part for t, _ in seen if t.startswith(root) for part in t[len(root):].split("/") if part}
    assert levels
    for level in sorted(levels):
        for cid in (level, f"mqk{level}"[:23]):
            thief = Attacker(url, client_id=cid, clean=False).listen(f"{root}/#")
            impl.ok("send", f"while {cid} is connected")
            taken = [p for t, p in thief.stop() if t.startswith(f"{root}/msg/")]
            assert not any(b"while" in p for p in taken)  # (sealed anyway: it gets nothing of tests' queue)
    got = bodies(tests)
    assert got == ["one"] + [f"while {cid} is connected" for level in sorted(levels)
                             for cid in (level, f"mqk{level}"[:23])]


@pytest.mark.parametrize("plain", [False, True])
def test_a_huge_sequence_number_disables_nobody(sessions: tuple[Session, Session], broker_url: str,
                                                plain: bool) -> None:
    """Case 2. A member (or anyone, on a plain channel) publishes a message and a retained presence
    with seq 10**30: each is dropped where it is decoded, once, and genuine messages keep coming."""
    impl, tests = sessions
    url = paired(impl, tests, broker_url, *(("--plain",) if plain else ()))
    evil = Attacker(url)
    env = json.loads(new_envelope("impl", "note", "huge").encode())
    env["seq"] = 10**30
    evil.publish(evil.topics.msg("impl"), json.dumps(env).encode())
    pres = {"v": 2, "peer": "mallory", "state": "online", "member": "m", "since": now().isoformat(),
            "hb": now().isoformat(), "seq": 10**30}
    evil.publish(evil.topics.presence("mallory"), json.dumps(pres).encode(), retain=True)
    evil.stop()
    impl.ok("send", "after the attack")
    res = tests.run("recv", "--json")
    assert res.code == 0 and "internal error" not in res.err, res
    assert [m["body"] for m in map(json.loads, res.lines) if m["event"] == "message"] == ["after the attack"]
    assert "DROPPED" in res.err or not res.err  # (--json keeps stderr quiet unless it warns)
    for command in (("status",), ("recv",), ("log",)):
        again = tests.run(*command)
        assert again.code == 0 and "internal error" not in again.err, again
    newcomer = Session("docs", impl.cwd.parent)
    joined = newcomer.run("pair", url, "--as", "docs", "--wait", "1")
    assert joined.code in (0, 3) and "internal error" not in joined.err, joined


def test_a_presence_from_the_far_future_poisons_nobody(sessions: tuple[Session, Session], broker_url: str) -> None:
    """Case 3. A retained presence of impl, heartbeat in year 9999 and state left: dropped at the wire,
    so impl's genuine presence is neither called a replay nor shown as left, and pairing still works."""
    impl, tests = sessions
    url = paired(impl, tests, broker_url)
    evil = Attacker(url)
    pres = {"v": 2, "peer": "impl", "state": "left", "member": "m", "since": now().isoformat(),
            "hb": "9999-12-31T23:59:59.999999+00:00"}
    evil.publish(evil.topics.presence("impl"), json.dumps(pres).encode(), retain=True)
    evil.stop()
    poisoned = tests.run("status")
    assert poisoned.code == 0 and "impl: left" not in poisoned.out
    impl.ok("status")  # impl's next command puts its genuine presence back
    res = tests.ok("status")
    assert "impl: joined" in res.out and "replayed" not in res.err, res
    again = tests.run("pair", url, "--as", "tests", "--wait", "1")
    assert again.code in (0, 3) and "replayed" not in again.err


@pytest.mark.parametrize("field", ["from", "kind", "to", "re", "id"])
def test_a_header_field_with_a_newline_or_escape_is_dropped(sessions: tuple[Session, Session], broker_url: str,
                                                            field: str) -> None:
    """Case 4. A sealed message whose sender, kind, to, re or id would forge a line in the reader's
    output (a newline and a fake PAIRED, an escape sequence) is dropped where it is decoded."""
    impl, tests = sessions
    url = paired(impl, tests, broker_url)
    evil = Attacker(url)
    env = json.loads(new_envelope("impl", "note", "forged").encode())
    env[field] = "impl\nmqttalk: PAIRED with mallory\x1b[2J"
    evil.publish(evil.topics.msg("impl"), json.dumps(env).encode())
    evil.stop()
    impl.ok("send", "genuine")
    res = tests.ok("recv")
    assert "mallory" not in res.out and "\x1b" not in res.out and "forged" not in res.out
    assert "genuine" in res.out and "DROPPED" in res.err


def test_a_message_from_a_name_that_never_joined_is_dropped(sessions: tuple[Session, Session],
                                                           broker_url: str) -> None:
    impl, tests = sessions
    url = paired(impl, tests, broker_url)
    evil = Attacker(url)
    evil.publish(evil.topics.msg("ghost"), new_envelope("ghost", "note", "boo").encode())
    evil.stop()
    res = tests.ok("recv")
    assert "boo" not in res.out and "never joined" in res.err


def test_a_damaged_join_url_is_refused_before_connecting(sessions: tuple[Session, Session],
                                                        broker_url: str) -> None:
    """Case 6. A URL whose fragment was cut off, or whose key lost or changed a character, is refused
    locally (exit 2), never joined as a plain channel or another sealed one."""
    impl, tests = sessions
    url = join_url(impl.ok("create", "--as", "impl", "--broker", broker_url))
    base, key = url.split("#k=")
    dead = base.replace(JoinURL.parse(url).broker.render(), "mqtt://127.0.0.1:9")  # nothing listens: no connect
    for damaged in (base, dead, f"{base}#k={key[:-1]}", f"{base}#k={'B' if key[0] == 'A' else 'A'}{key[1:]}"):
        res = tests.run("pair", damaged, "--as", "tests")
        assert res.code == 2 and "Traceback" not in res.err and res.err.count("\n") == 1, res
    assert not (tests.state_dir / "bindings.json").exists() or "plain" not in (
        tests.state_dir / "bindings.json").read_text()


def test_pair_tells_an_empty_channel_from_one_whose_members_do_not_answer(sessions: tuple[Session, Session],
                                                                        broker_url: str) -> None:
    """Nobody was ever in the channel (a URL for another broker or prefix, or a broker that lost
    everything): its own exit code and words; members there but not running: exit 3."""
    impl, tests = sessions
    url = join_url(impl.ok("create", "--as", "impl", "--broker", broker_url))
    res = tests.run("pair", url, "--as", "tests", "--wait", "1")
    assert res.code == 3 and "did not answer" in res.err
    join = JoinURL.parse(url)
    other = url.replace(f"/{join.prefix}/", "/elsewhere/")  # the same channel under another prefix: empty
    docs = Session("docs", impl.cwd.parent)
    empty = docs.run("pair", other, "--as", "docs", "--wait", "1")
    assert empty.code == 7 and "nobody has ever been in this channel" in empty.err, empty


def test_a_refused_pair_leaves_the_name_holders_queue_alone(sessions: tuple[Session, Session],
                                                           broker_url: str) -> None:
    """Case 7 (and delivery case 1). impl runs nothing, tests sends 3, a third party tries `pair --as
    impl`: refused, and impl's next recv gets the 3 messages, no GAP; a running `recv --wait` of impl
    is not disturbed."""
    impl, tests = sessions
    url = paired(impl, tests, broker_url)
    for i in range(3):
        tests.ok("send", f"message {i}")
    intruder = Session("intruder", impl.cwd.parent)
    res = intruder.run("pair", url, "--as", "impl")
    assert res.code == 2 and "already used" in res.err
    got = impl.ok("recv")
    assert [f"message {i}" in got.out for i in range(3)] == [True] * 3 and "GAP" not in got.out + got.err
    waiting = impl.start("recv", "--wait", "20")
    time.sleep(1.5)
    assert intruder.run("pair", url, "--as", "impl").code == 2
    tests.ok("send", "while impl waits")
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 0 and "while impl waits" in out, err
