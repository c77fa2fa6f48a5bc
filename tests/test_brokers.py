"""The broker compatibility matrix: pairing, messaging, offline delivery and presence, as two agent sessions
run them with the real `mqttalk` command, against every broker this machine can run for real — Mosquitto,
the embedded amqtt, NATS (MQTT listener, JetStream) and RabbitMQ (rabbitmq_mqtt) — each started by the
tests on loopback ports of their own. Then the operator files in config/, each loaded and put to work."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from _brokers import CONFIG, MatrixBroker, substitute, tail
from conftest import (
    EmbeddedBroker,
    PrivateMosquitto,
    Session,
    channel_topics,
    free_port,
    join_url,
    read_join_url,
    status_of,
)
from conftest import wait_listening as wait_port
from paho.mqtt.enums import CallbackAPIVersion

# RabbitMQ's MQTT plugin sends retained messages only to subscriptions that name the topic exactly, never to
# a wildcard one (mqttalk reads presence with PREFIX/CHANNEL/presence/+): mqttalk also keeps a retained roster
# of member names, subscribed to by its exact name, and subscribes to known members' presence topics exactly.


def _mosquitto_version() -> str:
    out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False).stdout
    return out.split("version", 1)[1].split()[0] if "version" in out else "?"


@pytest.fixture(params=["mosquitto", "amqtt", "nats", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> MatrixBroker:
    """Each broker of the matrix, with the MQTT version mqttalk must settle on for it."""
    name = request.param
    if name == "mosquitto":
        mosq: PrivateMosquitto = request.getfixturevalue("private_mosquitto")
        return MatrixBroker(name, mosq.url, _mosquitto_version(), "MQTT 5")
    if name == "amqtt":
        amqtt: EmbeddedBroker = request.getfixturevalue("amqtt_broker")
        return MatrixBroker(name, amqtt.url, version("amqtt"), "MQTT 3.1.1")
    if name == "nats":
        nats: Any = request.getfixturevalue("nats_broker")
        return MatrixBroker(name, nats.url, nats.version, "MQTT 3.1.1")
    rabbit: Any = request.getfixturevalue("rabbitmq_broker")
    return MatrixBroker(name, rabbit.url, rabbit.version, "MQTT 3.1.1")


def both_paired(impl: Session, tests: Session, broker_url: str, *create_flags: str) -> str:
    """The story's way to pair: impl creates the channel and waits, tests pairs with the join URL; both
    print PAIRED at once. Returns the join URL."""
    proc = impl.start("create", "--as", "impl", "--broker", broker_url, "--wait", "30", *create_flags)
    try:
        url = read_join_url(proc)
        res = tests.run("pair", url, "--as", "tests")
        paired_at = time.monotonic()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert res.code == 0 and "mqttalk: PAIRED with impl" in res.out, res.err
    assert proc.returncode == 0 and "mqttalk: PAIRED with tests" in out, err
    assert time.monotonic() - paired_at < 5, "the waiting creator did not stop once the peer was there"
    return url


def messages(result_lines: list[str]) -> list[dict[str, Any]]:
    return [m for m in map(json.loads, result_lines) if m["event"] == "message"]


def peer_state(session: Session, peer: str) -> str | None:
    return next(
        (
            str(p["state"])
            for p in status_of(session)["peers"]  # type: ignore[attr-defined]
            if p["name"] == peer
        ),
        None,
    )


def wait_state(session: Session, peer: str, state: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    seen = peer_state(session, peer)
    while seen != state and time.monotonic() < deadline:
        time.sleep(0.3)
        seen = peer_state(session, peer)
    assert seen == state, f"{peer} is {seen!r} to {session.name}, expected {state!r}"


# -- the matrix ----------------------------------------------------------------------------------------


def test_a_waiting_creator_and_the_joiner_both_print_paired_at_once(
    sessions: tuple[Session, Session], broker: MatrixBroker
) -> None:
    impl, tests = sessions
    both_paired(impl, tests, broker.url)
    assert "PAIRED" not in impl.ok("recv").out + tests.ok("recv").out  # told once


def test_a_creator_that_runs_nothing_pairs_when_each_side_next_runs(
    sessions: tuple[Session, Session], broker: MatrixBroker
) -> None:
    impl, tests = sessions
    url = join_url(impl.ok("create", "--as", "impl", "--role", "owns src/api/users.ts", "--broker", broker.url))
    joined = tests.run("pair", url, "--as", "tests", "--wait", "2")
    assert joined.code == 3, joined.err  # impl runs nothing: it cannot answer tests' pairing challenge yet
    assert impl.ok("recv").out.count("mqttalk: PAIRED with tests") == 1
    told = joined.out + tests.ok("recv").out  # by now impl has run a command: tests is told, once
    assert told.count("mqttalk: PAIRED with impl (owns src/api/users.ts)") == 1, told
    assert "PAIRED" not in impl.ok("recv").out + tests.ok("recv").out


def test_status_lists_both_peers_over_the_right_mqtt_version(
    sessions: tuple[Session, Session], broker: MatrixBroker
) -> None:
    impl, tests = sessions
    both_paired(impl, tests, broker.url)
    for me in (impl, impl, tests, tests):  # and again: status reads presence, it does not use it up
        st = status_of(me)
        assert st["protocol"] == broker.protocol, f"{broker.name} {broker.version}"
        peers = {p["name"]: p["state"] for p in st["peers"]}  # type: ignore[attr-defined]
        assert set(peers) == {"impl", "tests"} and "left" not in peers.values(), peers
        # ("away" is possible: amqtt at times fires the will of a client that disconnected cleanly)


def test_spec_and_status_messages_travel_both_ways_with_their_typed_fields(
    sessions: tuple[Session, Session], broker: MatrixBroker
) -> None:
    impl, tests = sessions
    both_paired(impl, tests, broker.url)
    spec = json.loads(
        impl.ok(
            "send",
            "--json",
            "--kind",
            "spec",
            "--subject",
            "POST /users",
            "takes {email,name}, returns {id, created_at}, 409 on duplicate",
        ).out
    )
    got = messages(tests.ok("recv", "--json").lines)
    assert [(m["kind"], m["id"], m["from"]) for m in got] == [("spec", spec["id"], "impl")]
    assert got[0]["data"] == {"subject": "POST /users", "rev": 1, "state": "proposed"}
    assert got[0]["body"] == "takes {email,name}, returns {id, created_at}, 409 on duplicate"
    tests.ok("send", "--kind", "spec", "--subject", "POST /users", "--state", "agreed", "--re", spec["id"], "ok")
    tests.ok(
        "send", "--kind", "status", "--state", "red", "--commit", "abc1234", "-", input="tests written,\nall red\n"
    )
    back = messages(impl.ok("recv", "--json").lines)
    assert [(m["kind"], m["data"]) for m in back] == [
        ("spec", {"subject": "POST /users", "rev": 1, "state": "agreed"}),
        # (the one agreed subject: the status is against its revision in force, even agreed the old way)
        ("status", {"state": "red", "commit": "abc1234", "spec": "POST /users", "rev": 1}),
    ]
    assert back[0]["re"] == spec["id"] and back[1]["body"] == "tests written,\nall red\n"
    assert messages(impl.ok("recv", "--json").lines) == []  # shown once


def test_messages_sent_while_the_reader_is_not_running_arrive_once_in_order(
    sessions: tuple[Session, Session], broker: MatrixBroker
) -> None:
    impl, tests = sessions
    both_paired(impl, tests, broker.url)
    for i in range(12):  # tests runs no process: the broker queues for its persistent session
        impl.ok("send", f"message {i}")
    got = messages(tests.ok("recv", "--json").lines)
    assert [m["body"] for m in got] == [f"message {i}" for i in range(12)]
    assert [m["seq"] for m in got] == list(range(1, 13))
    assert messages(tests.ok("recv", "--json").lines) == []  # exactly once


def drop_session(broker_url: str, client_id: str) -> None:
    """Connect with a clean session under ``client_id``: the broker discards that session and its queue,
    as a broker restarted without persistence, an overflowing queue or a take-over would."""
    from mqttalk._url import parse_broker

    address = parse_broker(broker_url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True)
    if address.username:
        client.username_pw_set(address.username, address.password)
    client.connect(address.host, address.port)
    client.loop_start()
    time.sleep(0.5)
    client.disconnect()
    client.loop_stop()


def test_messages_a_broker_lost_are_repaired_from_the_sender(
    sessions: tuple[Session, Session], broker: MatrixBroker
) -> None:
    """The broker is a cache: what it lost of a reader's queue, the reader asks the sender for, and the
    sender's next command sends again from its store. Every message shown once, in order, no GAP."""
    impl, tests = sessions
    both_paired(impl, tests, broker.url)
    for i in range(10):
        impl.ok("send", f"message {i}")
    drop_session(broker.url, tests.channel().client_id)  # type: ignore[attr-defined]
    first = tests.ok("recv", "--json")  # finds impl's presence saying 10 were sent, and asks impl for them
    assert messages(first.lines) == [] and "gap" not in first.out
    impl.ok("status")  # impl's next command reads the request and sends the 10 again
    got = messages(tests.ok("recv", "--json").lines)
    assert [m["body"] for m in got] == [f"message {i}" for i in range(10)]
    again = tests.ok("recv", "--json")
    assert messages(again.lines) == [] and "gap" not in again.out.lower()


def test_a_late_joiner_is_not_shown_what_a_repair_sends_again(
    sessions: tuple[Session, Session], broker: MatrixBroker
) -> None:
    """A repair sends old messages to the whole channel again: a member who joined after they were
    first sent does not get them (they were not sent to it), while the member who missed them does."""
    impl, tests = sessions
    url = both_paired(impl, tests, broker.url)
    for i in range(5):
        impl.ok("send", f"before docs {i}")
    drop_session(broker.url, tests.channel().client_id)  # type: ignore[attr-defined]
    docs = Session("docs", impl.cwd.parent)
    assert docs.run("pair", url, "--as", "docs", "--wait", "2").code in (0, 3)
    tests.ok("recv")  # asks impl for the 5
    impl.ok("status")  # impl sends them again, to the channel
    got = [m["body"] for m in messages(tests.ok("recv", "--json").lines)]
    assert got == [f"before docs {i}" for i in range(5)]
    impl.ok("send", "after docs joined")
    assert [m["body"] for m in messages(docs.ok("recv", "--json").lines)] == ["after docs joined"]


def test_what_the_creator_sent_before_anyone_joined_reaches_the_first_to_join(
    sessions: tuple[Session, Session], broker: MatrixBroker
) -> None:
    """The creator proposes before the other session has pasted the URL: the first peer to join gets it
    (it asks, the creator's next command sends it again), once; a third member joining later does not."""
    impl, tests = sessions
    res = impl.ok("create", "--as", "impl", "--broker", broker.url)
    url = join_url(res)
    sent = impl.ok("send", "--kind", "spec", "--subject", "POST /users", "takes {email,name}")
    assert "nobody else has joined this channel yet: the first peer to join gets this message" in sent.err
    assert tests.run("pair", url, "--as", "tests", "--wait", "2").code in (0, 3)  # impl runs nothing now
    impl.ok("recv")  # impl's next command: pairs, and sends again what tests asks for
    got = [m["body"] for m in messages(tests.ok("recv", "--json").lines)]
    assert got == ["takes {email,name}"]
    assert "nobody else has joined" not in impl.ok("send", "for both").err
    assert [m["body"] for m in messages(tests.ok("recv", "--json").lines)] == ["for both"]
    docs = Session("docs", impl.cwd.parent)
    assert docs.run("pair", url, "--as", "docs", "--wait", "2").code in (0, 3)
    impl.ok("recv")
    tests.ok("recv")
    impl.ok("send", "after docs joined")
    assert [m["body"] for m in messages(docs.ok("recv", "--json").lines)] == ["after docs joined"]
    assert [m["body"] for m in messages(tests.ok("recv", "--json").lines)] == ["after docs joined"]


def test_a_listening_peer_shows_online_and_sees_the_other_leave(
    sessions: tuple[Session, Session], broker: MatrixBroker
) -> None:
    impl, tests = sessions
    both_paired(impl, tests, broker.url)
    listener = tests.start("listen", "--timeout", "60")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(listener.stdout or []), daemon=True)
    reader.start()
    try:
        wait_state(impl, "tests", "online")
        assert "mqttalk: LEFT channel" in impl.ok("leave").out
        deadline = time.monotonic() + 20
        while not any("OFFLINE impl" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        listener.send_signal(signal.SIGINT)
        listener.wait(15)
        reader.join(5)
    assert "mqttalk: OFFLINE impl (left)" in [line.strip() for line in lines]
    assert peer_state(tests, "impl") == "left"


def _retained_roster(channel: Any) -> set[str]:
    """The member names in the channel's retained roster, as a newcomer would read them now."""
    from mqttalk._wire import decode_roster

    got: list[Any] = []
    with channel.link(on_messages=got.extend) as link:
        link.subscribe([channel.topics.roster])
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            link.pump(0.2)
    assert got, "no retained roster"
    return decode_roster(channel.unwrap(got[-1].topic, got[-1].payload) or b"")


def test_a_member_left_out_of_the_roster_by_a_concurrent_joiner_puts_itself_back(
    sessions: tuple[Session, Session], broker: MatrixBroker
) -> None:
    """Two members joining at once each publish the roster they read plus themselves, and the later
    retained one wins. On RabbitMQ a newcomer finds members only by that roster: the member left out
    must notice (it holds a live connection) and publish it again with itself in it."""
    from mqttalk._wire import encode_roster

    impl, tests = sessions
    both_paired(impl, tests, broker.url)
    assert _retained_roster(tests.channel()) == {"impl", "tests"}
    listener = impl.start("listen", "--timeout", "60")
    try:
        wait_state(tests, "impl", "online")
        writer: Any = tests.channel()
        with writer.link() as link:  # what a joiner that read the roster before impl was in it writes
            link.publish(
                writer.topics.roster, writer.wrap(writer.topics.roster, encode_roster({"tests", "late"})), retain=True
            )
        deadline = time.monotonic() + 15
        roster = _retained_roster(tests.channel())
        while "impl" not in roster and time.monotonic() < deadline:
            time.sleep(0.2)
            roster = _retained_roster(tests.channel())
    finally:
        listener.send_signal(signal.SIGINT)
        listener.wait(15)
    assert roster == {"impl", "tests", "late"}


def test_a_killed_listener_is_shown_away(sessions: tuple[Session, Session], broker: MatrixBroker) -> None:
    impl, tests = sessions
    both_paired(impl, tests, broker.url)
    listener = tests.start("listen", env={"MQTTALK_HEARTBEAT": "1"})  # amqtt fires no will: the heartbeat tells
    try:
        wait_state(impl, "tests", "online")
    finally:
        listener.send_signal(signal.SIGKILL)
        listener.wait()
    wait_state(impl, "tests", "away")


def test_nats_refuses_a_prefix_with_a_dot_and_mqttalk_says_why(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    nats: Any = request.getfixturevalue("nats_broker")
    res = Session("impl", tmp_path).run("create", "--as", "impl", "--broker", nats.url, "--prefix", "plant.7/mqttalk")
    assert res.code == 5 and "refused subscription" in res.err and "'.'" in res.err and "--prefix" in res.err


# -- config/ -------------------------------------------------------------------------------------------


class FencedMosquitto(PrivateMosquitto):
    """A Mosquitto started from config/mosquitto.conf and config/mosquitto.acl, with a password file of
    the test's users (made with mosquitto_passwd, as an operator would)."""

    def __init__(self, directory: Path, users: dict[str, str]) -> None:
        super().__init__(directory)
        if shutil.which("mosquitto_passwd") is None:
            pytest.skip("mosquitto_passwd is not installed (apt-get install mosquitto)")
        passwd = self.dir / "mqttalk.passwd"
        for n, (user, password) in enumerate(users.items()):
            subprocess.run(
                ["mosquitto_passwd", "-b", *(["-c"] if n == 0 else []), str(passwd), user, password],
                check=True,
                capture_output=True,
            )
        self.conf.write_text(
            substitute(
                (CONFIG / "mosquitto.conf").read_text(),
                {
                    r"^listener .*$": f"listener {self.port} 127.0.0.1",
                    r"^password_file .*$": f"password_file {passwd}",
                    r"^acl_file .*$": f"acl_file {CONFIG / 'mosquitto.acl'}",
                    r"^persistence_location .*$": f"persistence_location {self.dir}/",
                },
            )
            + f"user root\nlog_dest file {self.dir}/mosquitto.log\n"
        )

    def broker(self, user: str, password: str) -> str:
        return f"mqtt://{user}:{password}@127.0.0.1:{self.port}"


class RawClient:
    """A plain paho client with its own credentials, to poke at the broker the way another user could."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.granted: list[int] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, password)
        self.client.on_message = lambda _c, _u, m: self.seen.append((m.topic, bytes(m.payload)))
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: self.granted.extend(c.value for c in codes)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def subscribe(self, topic: str) -> int:
        before = len(self.granted)
        self.client.subscribe(topic, qos=1)
        deadline = time.monotonic() + 10
        while len(self.granted) == before and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.granted[before]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()  # (first: it wakes the network loop, which loop_stop would wait up to 1 s for)
        self.client.loop_stop()


@pytest.fixture
def fenced(tmp_path: Path) -> Iterator[FencedMosquitto]:
    broker = FencedMosquitto(tmp_path / "fenced", {"alice": "alice-pw", "bob": "bob-pw"})
    broker.start()
    yield broker
    broker.stop()


def test_the_mosquitto_acl_keeps_each_user_in_its_own_channels(tmp_path: Path, fenced: FencedMosquitto) -> None:
    impl, tests = Session("impl", tmp_path), Session("tests", tmp_path)
    alice = fenced.broker("alice", "alice-pw")
    # Under the default prefix (or anyone else's) alice is refused, and told why: Mosquitto grants the
    # subscription but delivers nothing from it, and refuses her publishes (MQTT 5: "Not authorized").
    refused = impl.run("create", "--as", "impl", "--broker", alice)
    assert refused.code == 5 and "Not authorized" in refused.err and "ACL" in refused.err, refused.err
    # Her own prefix works, for both of her sessions, through the join URL (it carries her credentials).
    url = both_paired(impl, tests, alice, "--prefix", "mqttalk/alice")
    assert url.startswith(alice + "/mqttalk/alice/")
    topics: Any = channel_topics(url)
    snoop = RawClient(fenced.port, "bob", "bob-pw")
    owner = RawClient(fenced.port, "alice", "alice-pw")
    try:
        snoop.subscribe(f"{topics.root}/#")  # granted or not, the ACL lets nothing of alice's through to him
        snoop.subscribe("#")
        assert owner.subscribe(f"{topics.root}/#") < 0x80
        forged = b"bob was here"
        snoop.publish(topics.msg("impl"), forged)  # dropped: he may not write there
        snoop.publish(topics.presence("impl"), forged, retain=True)
        impl.ok("send", "--kind", "spec", "--subject", "POST /users", "for alice's eyes only")
        got = messages(tests.ok("recv", "--json").lines)
        assert [m["body"] for m in got] == ["for alice's eyes only"]
        time.sleep(0.5)
        assert [t for t, _ in snoop.seen if t.startswith("mqttalk/alice/")] == []
        assert owner.seen and all(payload != forged for _, payload in owner.seen)
    finally:
        snoop.close()
        owner.close()
    # bob, with the whole join URL but his own credentials, cannot join alice's channel.
    bob = Session("bob", tmp_path)
    stolen = url.replace("alice:alice-pw@", "bob:bob-pw@")
    res = bob.run("pair", stolen, "--as", "bob")
    assert res.code == 5 and "Not authorized" in res.err, res.err
    # ... while his own prefix is his.
    bob_url = join_url(
        bob.ok("create", "--as", "bob", "--broker", fenced.broker("bob", "bob-pw"), "--prefix", "mqttalk/bob")
    )
    assert "/mqttalk/bob/" in bob_url
    # A wrong password is refused at the door.
    wrong = bob.run("create", "--as", "bob", "--broker", fenced.broker("bob", "nope"), "--prefix", "mqttalk/bob")
    assert wrong.code == 5 and "refused the connection" in wrong.err


def test_the_embedded_brokers_reference_yaml_is_what_it_runs_and_keeps_offline_messages(tmp_path: Path) -> None:
    from mqttalk_broker import CONFIG_FILE, broker_config

    reference = CONFIG / "mqttalk-broker.yaml"
    assert yaml.safe_load(reference.read_text()) == yaml.safe_load(CONFIG_FILE.read_text())
    config = broker_config(port=1, config_file=reference)
    assert config["plugins"] == {"mqttalk_broker.auth.QueueingAuthPlugin": {}}
    # Run an embedded broker from the reference file, and check what its settings are for: a peer that
    # runs no process still gets what was sent meanwhile (QueueingAuthPlugin, session expiry).
    port = free_port()
    script = (
        "import sys; from pathlib import Path; from mqttalk_broker import run; "
        "run(port=int(sys.argv[1]), config_file=Path(sys.argv[2]), db=Path(sys.argv[3]))"
    )
    log = open(tmp_path / "broker.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(port), str(reference), str(tmp_path / "b.sqlite3")], stdout=log, stderr=log
    )
    log.close()
    try:
        wait_port(port, proc)
        impl, tests = Session("impl", tmp_path), Session("tests", tmp_path)
        both_paired(impl, tests, f"mqtt://127.0.0.1:{port}")
        for i in range(3):
            impl.ok("send", f"while tests was away {i}")
        assert [m["body"] for m in messages(tests.ok("recv", "--json").lines)] == [
            f"while tests was away {i}" for i in range(3)
        ]
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode is not None, tail(tmp_path / "broker.log")


def test_rabbitmq_from_the_config_snippet_admits_only_its_users(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rabbit: Any = request.getfixturevalue("rabbitmq_broker")
    impl = Session("impl", tmp_path)
    anonymous = impl.run("create", "--as", "impl", "--broker", f"mqtt://127.0.0.1:{rabbit.port}")
    assert anonymous.code == 5 and "refused the connection" in anonymous.err  # mqtt.allow_anonymous = false
    wrong = impl.run("create", "--as", "impl", "--broker", rabbit.url.replace(rabbit.password, "wrong"))
    assert wrong.code == 5 and "refused the connection" in wrong.err
    assert join_url(impl.ok("create", "--as", "impl", "--broker", rabbit.url)).startswith(rabbit.url + "/")


def test_a_late_joiner_sees_the_agreed_spec_on_every_broker(
    sessions: tuple[Session, Session], broker: MatrixBroker, tmp_path: Path
) -> None:
    """The contract is kept as retained state, which each broker of the matrix hands a newcomer (RabbitMQ
    only to a subscription by exact name: a reader asks for the members' states by name there)."""
    impl, tests = sessions
    url = both_paired(impl, tests, broker.url)
    impl.ok("spec", "propose", "POST /users", "takes {email, name}")
    tests.ok("spec", "agree", "POST /users")
    late = Session("late", tmp_path)
    res = late.run("pair", url, "--as", "late", "--wait", "0")
    assert res.code in (0, 3), res
    got = [json.loads(line) for line in late.ok("spec", "list", "--json").lines]
    assert [(o["subject"], o["rev"], o["state"]) for o in got] == [("POST /users", 1, "agreed")]
    assert late.ok("spec", "show", "POST /users").out == "takes {email, name}"
