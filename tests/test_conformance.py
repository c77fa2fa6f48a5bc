"""MQTT 3.1.1 conformance of the embedded broker, checked against a private Mosquitto in the same tests.

Each test follows numbered normative statements of the MQTT 3.1.1 specification ([MQTT-x.x.x-y]) and talks
to the broker with the minimal raw client below, which shows what paho hides (DUP and RETAIN flags, packet
ids, session present, SUBACK codes, PUBREL resends). Both brokers run with the same limits: Mosquitto with
``max_packet_size`` and ``max_queued_messages``, the embedded one from a copy of broker/mqttalk-broker.yaml
with a smaller queue and CONNECT timeout (so the tests stay fast). The patches tested are
mqttalk_broker._conformance's; each test names the patch it needs.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from conftest import ConfiguredEmbedded, PrivateMosquitto, running

QUEUE = 30  # both brokers' queue per absent session in these tests
MAX_PACKET = 1024 * 1024
_ids = itertools.count()

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@dataclass
class Packet:
    """One packet as received: type, the fixed header's flags, and the rest."""

    type: int
    flags: int
    body: bytes

    @property
    def dup(self) -> bool:
        return bool(self.flags & 8)

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 3

    @property
    def retain(self) -> bool:
        return bool(self.flags & 1)

    @property
    def topic(self) -> str:
        n = struct.unpack("!H", self.body[:2])[0]
        return self.body[2 : 2 + n].decode()

    @property
    def packet_id(self) -> int:
        if self.type == PUBLISH:
            n = struct.unpack("!H", self.body[:2])[0]
            return struct.unpack("!H", self.body[2 + n : 4 + n])[0] if self.qos else 0
        return struct.unpack("!H", self.body[:2])[0]

    @property
    def payload(self) -> bytes:
        n = struct.unpack("!H", self.body[:2])[0]
        return self.body[2 + n + (2 if self.qos else 0) :]


class Raw:
    """A raw MQTT 3.1.1 client over one socket: packets in and out exactly as on the wire."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""

    def send(self, type_: int, flags: int, body: bytes) -> None:
        self.sock.sendall(bytes([type_ << 4 | flags]) + _length(len(body)) + body)

    def connect(
        self,
        client_id: str,
        clean: bool = True,
        keepalive: int = 60,
        will: tuple[str, bytes, int, bool] | None = None,
        username: str | None = None,
    ) -> tuple[int, int]:
        flags = 2 if clean else 0
        payload = _str(client_id)
        if will:
            flags |= 4 | will[2] << 3 | (32 if will[3] else 0)
            payload += _str(will[0]) + _str(will[1])
        if username is not None:
            flags |= 128
            payload += _str(username)
        self.send(CONNECT, 0, _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload)
        p = self.recv()
        assert p is not None and p.type == CONNACK, p
        return p.body[0] & 1, p.body[1]

    def subscribe(self, pid: int, *subs: tuple[str, int]) -> list[int]:
        body = struct.pack("!H", pid) + b"".join(_str(t) + bytes([q]) for t, q in subs)
        self.send(SUBSCRIBE, 2, body)
        p = self.expect(SUBACK)
        return list(p.body[2:])

    def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, pid: int = 0, dup: bool = False
    ) -> None:
        body = _str(topic) + (struct.pack("!H", pid) if qos else b"") + payload
        self.send(PUBLISH, (8 if dup else 0) | qos << 1 | (1 if retain else 0), body)

    def ack(self, type_: int, pid: int) -> None:
        self.send(type_, 2 if type_ == PUBREL else 0, struct.pack("!H", pid))

    def recv(self, timeout: float = 5) -> Packet | None:
        """next packet, or None on close; raises TimeoutError"""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 2:
                mult, n, i = 1, 0, 1
                while i < len(self.buf):
                    b = self.buf[i]
                    n += (b & 127) * mult
                    mult *= 128
                    i += 1
                    if not b & 128:
                        break
                else:
                    i = -1
                if i > 0 and len(self.buf) >= i + n:
                    p = Packet(self.buf[0] >> 4, self.buf[0] & 15, self.buf[i : i + n])
                    self.buf = self.buf[i + n :]
                    return p
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise
            except OSError:
                return None
            if not data:
                return None
            self.buf += data

    def expect(self, type_: int, timeout: float = 5) -> Packet:
        p = self.recv(timeout)
        assert p is not None and p.type == type_, p
        return p

    def disconnect(self) -> None:
        self.send(DISCONNECT, 0, b"")
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module", params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A broker of this module's own, with the same limits on both."""
    directory = tmp_path_factory.mktemp(request.param)
    b: Any
    if request.param == "mosquitto":
        b = PrivateMosquitto(directory, max_packet_size=MAX_PACKET, max_queued_messages=QUEUE)
    else:
        b = ConfiguredEmbedded(directory, max_queued_messages=QUEUE, connect_timeout=1)
    b.name = request.param
    yield from running(b)


def uid(what: str) -> str:
    return f"{what}-{next(_ids)}-{time.monotonic_ns() % 10**9}"


def drain(client: Raw, timeout: float = 0.5) -> list[Packet]:
    """Every packet that comes within ``timeout`` of the previous one (acknowledging nothing)."""
    got: list[Packet] = []
    while True:
        try:
            packet = client.recv(timeout)
        except TimeoutError:
            return got
        if packet is None:
            return got
        got.append(packet)


def closed(client: Raw, within: float) -> bool:
    """The broker closed the connection within ``within`` seconds (packets before that are ignored)."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        try:
            if client.recv(left) is None:
                return True
        except TimeoutError:
            return False
    return False


# Keepalive and will ---------------------------------------------------------------------------------------


def test_a_silent_client_is_disconnected_after_1_5_keepalives_and_its_will_published(broker: Any) -> None:
    """[MQTT-3.1.2-24] no packet within 1.5 x Keep Alive: the server MUST disconnect the client as if the network
    had failed; [MQTT-3.1.2-8] the will is then published. (_conformance patch 1: amqtt never disconnected.)"""
    topic = uid("will")
    watcher = Raw(broker.port)
    watcher.connect(uid("watcher"))
    assert watcher.subscribe(1, (topic, 1)) == [1]
    silent = Raw(broker.port)
    silent.connect(uid("silent"), keepalive=1, will=(topic, b"gone", 1, False))
    started = time.monotonic()
    will = watcher.expect(PUBLISH, timeout=8)  # Mosquitto checks keepalives coarsely: up to ~5 s for 1 s
    waited = time.monotonic() - started
    assert will.payload == b"gone" and will.topic == topic
    assert waited >= 1.0, f"disconnected after {waited:.2f} s, before one keepalive"
    assert closed(silent, 1)
    silent.close()
    watcher.disconnect()


def test_a_client_that_pings_within_its_keepalive_stays_connected(broker: Any) -> None:
    """[MQTT-3.1.2-23] a client keeps the connection alive with PINGREQ; [MQTT-3.12.4-1] PINGRESP answers each."""
    topic = uid("will")
    watcher = Raw(broker.port)
    watcher.connect(uid("watcher"))
    watcher.subscribe(1, (topic, 1))
    client = Raw(broker.port)
    client.connect(uid("pinger"), keepalive=1, will=(topic, b"gone", 1, False))
    for _ in range(6):
        time.sleep(0.5)
        client.send(PINGREQ, 0, b"")
        client.expect(PINGRESP)
    assert drain(watcher, 0.3) == []
    client.disconnect()  # [MQTT-3.1.2-10]: a DISCONNECT deletes the will
    assert drain(watcher, 0.5) == []
    watcher.disconnect()


# Sessions ---------------------------------------------------------------------------------------------


def test_session_present_says_whether_the_broker_kept_the_session(broker: Any) -> None:
    """[MQTT-3.2.2-1] clean session: session present 0; [MQTT-3.2.2-2] a stored session: 1; [MQTT-3.2.2-3]
    none stored: 0. [MQTT-3.1.2-6] a clean session's state is not reused, even by a persistent CONNECT right
    after it (_conformance patch 2: amqtt found it still there and said 1)."""
    cid = uid("sp")
    client = Raw(broker.port)
    assert client.connect(cid, clean=False) == (0, 0)
    client.subscribe(1, ("sp/x", 1))
    client.disconnect()
    client = Raw(broker.port)
    assert client.connect(cid, clean=False) == (1, 0)
    client.disconnect()
    client = Raw(broker.port)
    assert client.connect(cid, clean=True) == (0, 0)
    client.subscribe(1, ("sp/x", 1))
    client.disconnect()
    client = Raw(broker.port)  # at once: amqtt forgot clean sessions only once a second
    assert client.connect(cid, clean=False) == (0, 0)
    client.disconnect()


def test_qos_1_and_2_messages_for_an_absent_session_arrive_when_it_returns(broker: Any) -> None:
    """[MQTT-3.1.2-5] QoS 1 and 2 messages for an absent persistent session are stored and [MQTT-3.1.2-4]
    delivered when it returns, [MQTT-3.8.4-6] at the lower of the message's and the subscription's QoS (a QoS 0
    message is not stored: _conformance patch 5) and [MQTT-3.3.1-9] with RETAIN 0 (patch 6)."""
    cid, topic = uid("absent"), uid("absent/t")
    sub = Raw(broker.port)
    sub.connect(cid, clean=False)
    assert sub.subscribe(1, (topic, 2)) == [2]
    sub.disconnect()
    pub = Raw(broker.port)
    pub.connect(uid("pub"))
    pub.publish(topic, b"q0", 0)
    pub.publish(topic, b"q1", 1, pid=1)
    pub.expect(PUBACK)
    pub.publish(topic, b"q2", 2, pid=2)
    pub.expect(PUBREC)
    pub.ack(PUBREL, 2)
    pub.expect(PUBCOMP)
    pub.disconnect()
    sub = Raw(broker.port)
    assert sub.connect(cid, clean=False) == (1, 0)
    got = drain(sub)
    assert [(p.payload, p.qos, p.retain) for p in got] == [(b"q1", 1, False), (b"q2", 2, False)]
    sub.ack(PUBACK, got[0].packet_id)
    sub.ack(PUBREC, got[1].packet_id)
    assert sub.expect(PUBREL).packet_id == got[1].packet_id
    sub.ack(PUBCOMP, got[1].packet_id)
    sub.disconnect()


def test_unacknowledged_publishes_and_pubrels_are_resent_on_reconnect(broker: Any) -> None:
    """[MQTT-4.4.0-1] on reconnect with CleanSession 0 the server MUST resend unacknowledged PUBLISHes (QoS > 0)
    and PUBRELs with their original packet ids; [MQTT-3.3.1-1] a resent PUBLISH has DUP 1. (_conformance
    patch 3: amqtt resent nothing.)"""
    cid, topic = uid("inflight"), uid("inflight/t")
    sub = Raw(broker.port)
    sub.connect(cid, clean=False)
    sub.subscribe(1, (topic, 2))
    pub = Raw(broker.port)
    pub.connect(uid("pub"))
    for pid, (body, qos) in enumerate([(b"one", 1), (b"two", 2), (b"three", 2)], start=1):
        pub.publish(topic, body, qos, pid=pid)
        if qos == 1:
            pub.expect(PUBACK)
        else:
            pub.expect(PUBREC)
            pub.ack(PUBREL, pid)
            pub.expect(PUBCOMP)
    pub.disconnect()
    first = [sub.expect(PUBLISH) for _ in range(3)]
    assert [(p.payload, p.qos, p.dup) for p in first] == [(b"one", 1, False), (b"two", 2, False), (b"three", 2, False)]
    sub.ack(PUBREC, first[2].packet_id)  # only "three" gets as far as PUBREL
    assert sub.expect(PUBREL).packet_id == first[2].packet_id
    sub.close()  # no PUBACK, no PUBREC, no PUBCOMP
    time.sleep(0.3)
    sub = Raw(broker.port)
    assert sub.connect(cid, clean=False) == (1, 0)
    again = drain(sub)
    assert [(p.type, p.packet_id) for p in again] == [
        (PUBLISH, first[0].packet_id),
        (PUBLISH, first[1].packet_id),
        (PUBREL, first[2].packet_id),
    ]
    assert [(p.payload, p.qos, p.dup) for p in again[:2]] == [(b"one", 1, True), (b"two", 2, True)]
    sub.ack(PUBACK, again[0].packet_id)
    sub.ack(PUBREC, again[1].packet_id)
    assert sub.expect(PUBREL).packet_id == again[1].packet_id
    sub.ack(PUBCOMP, again[1].packet_id)
    sub.ack(PUBCOMP, again[2].packet_id)
    sub.disconnect()
    sub = Raw(broker.port)
    assert sub.connect(cid, clean=False) == (1, 0)
    assert drain(sub) == []  # all complete: nothing more
    sub.disconnect()


def test_qos_2_is_exactly_once_when_the_publisher_resends_pubrel_after_a_reconnect(broker: Any) -> None:
    """[MQTT-4.3.3-2] the receiver MUST answer PUBREL with PUBCOMP, and [MQTT-4.4.0-1] a publisher resends its
    PUBREL on a new connection: the message is delivered then, once. (_conformance patch 4: amqtt never
    answered such a PUBREL nor delivered the message.)"""
    pub_id, topic = uid("pub2"), uid("once/t")
    sub = Raw(broker.port)
    sub.connect(uid("sub2"))
    sub.subscribe(1, (topic, 2))
    pub = Raw(broker.port)
    pub.connect(pub_id, clean=False)
    pub.publish(topic, b"exactly once", 2, pid=7)
    pub.expect(PUBREC)
    pub.close()  # before PUBREL
    time.sleep(0.3)
    pub = Raw(broker.port)
    assert pub.connect(pub_id, clean=False) == (1, 0)
    pub.publish(topic, b"exactly once", 2, pid=7, dup=True)  # it may not know whether PUBREC came: resend
    pub.expect(PUBREC)
    pub.ack(PUBREL, 7)
    assert pub.expect(PUBCOMP).packet_id == 7
    pub.ack(PUBREL, 7)  # a repeated PUBREL is answered too
    assert pub.expect(PUBCOMP).packet_id == 7
    got = drain(sub)
    assert [p.payload for p in got if p.type == PUBLISH] == [b"exactly once"]
    pub.disconnect()
    pub = Raw(broker.port)
    pub.connect(pub_id, clean=True)
    pub.disconnect()
    sub.disconnect()


def test_a_pubrel_for_a_publish_of_an_earlier_connection_releases_it_once(broker: Any) -> None:
    """[MQTT-4.3.3-2] PUBREL on a new connection, the PUBLISH having come on the old one (its PUBREC received):
    delivered once, and PUBCOMP. (_conformance patch 4.)"""
    pub_id, topic = uid("pub3"), uid("rel/t")
    sub = Raw(broker.port)
    sub.connect(uid("sub3"))
    sub.subscribe(1, (topic, 2))
    pub = Raw(broker.port)
    pub.connect(pub_id, clean=False)
    pub.publish(topic, b"released later", 2, pid=9)
    pub.expect(PUBREC)
    pub.close()
    time.sleep(0.3)
    pub = Raw(broker.port)
    pub.connect(pub_id, clean=False)
    pub.ack(PUBREL, 9)
    assert pub.expect(PUBCOMP).packet_id == 9
    got = drain(sub)
    assert [p.payload for p in got if p.type == PUBLISH] == [b"released later"]
    pub.disconnect()
    sub.disconnect()


def test_a_client_id_in_use_takes_over_the_connection(broker: Any) -> None:
    """[MQTT-3.1.4-2] a CONNECT with the client id of a connected client MUST disconnect the existing one, also
    when the new one starts a clean session (_conformance patch 2: amqtt left the old connection running)."""
    cid = uid("take")
    old = Raw(broker.port)
    old.connect(cid, clean=False)
    new = Raw(broker.port)
    assert new.connect(cid, clean=True) == (0, 0)
    assert closed(old, 3)
    new.disconnect()


def test_a_zero_length_client_id_is_accepted_only_with_a_clean_session(broker: Any) -> None:
    """[MQTT-3.1.3-6]/[MQTT-3.1.3-7] a zero-byte client id with CleanSession 1 gets a unique id; [MQTT-3.1.3-8]
    with CleanSession 0, CONNACK 0x02 (identifier rejected) and the connection is closed."""
    topic = uid("anon")
    a, b = Raw(broker.port), Raw(broker.port)
    assert a.connect("") == (0, 0)
    assert b.connect("") == (0, 0)  # a second one does not take the first over: each has its own id
    a.subscribe(1, (topic, 0))
    b.publish(topic, b"hi")
    assert a.expect(PUBLISH).payload == b"hi"
    a.disconnect()
    b.disconnect()
    c = Raw(broker.port)
    c.send(CONNECT, 0, _str("MQTT") + bytes([4, 0]) + struct.pack("!H", 60) + _str(""))
    connack = c.expect(CONNACK)
    assert connack.body == b"\x00\x02"
    assert closed(c, 2)


def test_the_first_packet_must_be_connect(broker: Any) -> None:
    """[MQTT-3.1.0-1] a first packet other than CONNECT: the server MUST close the connection. (_conformance
    patch 9: amqtt left it open.)"""
    client = Raw(broker.port)
    client.send(PINGREQ, 0, b"")
    assert closed(client, 2)


# Routing ---------------------------------------------------------------------------------------------


def test_delivery_qos_is_the_lower_of_publish_and_subscription(broker: Any) -> None:
    """[MQTT-3.8.4-6] the QoS of a delivered message is the minimum of the published QoS and the granted QoS.
    (_conformance patch 5.)"""
    high, low = uid("high"), uid("low")
    sub = Raw(broker.port)
    sub.connect(uid("qsub"))
    assert sub.subscribe(1, (high, 2), (low, 1)) == [2, 1]
    pub = Raw(broker.port)
    pub.connect(uid("qpub"))
    pub.publish(high, b"published at 0", 0)
    pub.publish(low, b"published at 2", 2, pid=3)
    pub.expect(PUBREC)
    pub.ack(PUBREL, 3)
    pub.expect(PUBCOMP)
    got = {p.payload: p.qos for p in drain(sub)}
    assert got == {b"published at 0": 0, b"published at 2": 1}
    pub.disconnect()
    sub.disconnect()


def test_resubscribing_replaces_the_subscription_and_its_qos(broker: Any) -> None:
    """[MQTT-3.8.4-3] a SUBSCRIBE for a filter already subscribed replaces that subscription (QoS included).
    (_conformance patch 8: amqtt granted the new QoS but kept the old one.)"""
    topic = uid("resub")
    sub = Raw(broker.port)
    sub.connect(uid("rsub"))
    assert sub.subscribe(1, (topic, 0)) == [0]
    assert sub.subscribe(2, (topic, 1)) == [1]
    pub = Raw(broker.port)
    pub.connect(uid("rpub"))
    pub.publish(topic, b"x", 1, pid=1)
    pub.expect(PUBACK)
    got = drain(sub)
    assert [(p.payload, p.qos) for p in got] == [(b"x", 1)]
    sub.ack(PUBACK, got[0].packet_id)
    pub.disconnect()
    sub.disconnect()


def test_retained_messages(broker: Any) -> None:
    """[MQTT-3.3.1-5] a RETAIN 1 message is stored; [MQTT-3.3.1-6]/[MQTT-3.3.1-8] a new subscription gets it
    with RETAIN 1; [MQTT-3.3.1-9] a live delivery has RETAIN 0; [MQTT-3.3.1-10]/[MQTT-3.3.1-11] a zero-byte
    retained message removes it and is not stored."""
    root = uid("retained")
    topic = f"{root}/r"
    pub = Raw(broker.port)
    pub.connect(uid("rpub"))
    live = Raw(broker.port)
    live.connect(uid("live"))
    live.subscribe(1, (topic, 1))
    pub.publish(topic, b"kept", 1, retain=True, pid=1)
    pub.expect(PUBACK)
    got = live.expect(PUBLISH)
    assert (got.payload, got.retain) == (b"kept", False)
    live.ack(PUBACK, got.packet_id)
    late = Raw(broker.port)
    late.connect(uid("late"))
    late.subscribe(1, (f"{root}/+", 1))
    got = late.expect(PUBLISH)
    assert (got.payload, got.retain, got.topic) == (b"kept", True, topic)
    late.ack(PUBACK, got.packet_id)
    pub.publish(topic, b"", 0, retain=True)
    time.sleep(0.2)
    later = Raw(broker.port)
    later.connect(uid("later"))
    later.subscribe(1, (topic, 1))
    assert [p.payload for p in drain(later, 0.5)] == []
    for c in (pub, live, late, later):
        c.disconnect()


def test_wildcards_and_dollar_topics(broker: Any) -> None:
    """[MQTT-4.7.1-2] '#' matches the parent and every level below; [MQTT-4.7.1-3] '+' one level, an empty one
    included ('/'-leading topics); [MQTT-4.7.2-1] '#' and '+' at the first level do not match '$' topics, which
    clients may use otherwise (_conformance patch 7: amqtt cut off a client that published to one).
    [MQTT-3.3.5-1] overlapping subscriptions: one copy at the highest QoS (Mosquitto's choice; the spec also
    allows one copy per subscription; _conformance patch 5 does as Mosquitto)."""
    root = uid("w")
    sub = Raw(broker.port)
    sub.connect(uid("wsub"))
    assert sub.subscribe(1, ("#", 0), ("+/+/x", 0), (f"{root}/#", 1), (f"/{root}/+", 0), ("$" + root + "/#", 0)) == [
        0,
        0,
        1,
        0,
        0,
    ]
    pub = Raw(broker.port)
    pub.connect(uid("wpub"))
    for topic in (f"{root}", f"{root}/a/x", f"/{root}/b", f"${root}/d", f"{root}/last"):
        pub.publish(topic, topic.encode(), 1, pid=1)
        pub.expect(PUBACK)
    got = [p for p in drain(sub) if root in p.topic]
    for p in got:
        if p.qos:
            sub.ack(PUBACK, p.packet_id)
    assert sorted((p.topic, p.qos) for p in got) == sorted(
        [(root, 1), (f"{root}/a/x", 1), (f"/{root}/b", 0), (f"${root}/d", 0), (f"{root}/last", 1)]
    )
    assert closed(pub, 0.2) is False  # still connected after publishing to a '$' topic
    pub.disconnect()
    sub.disconnect()


def test_a_refused_subscription_gets_suback_0x80(broker: Any) -> None:
    """[MQTT-3.9.3-1]/[MQTT-3.8.4-5] one SUBACK return code per filter; 0x80 for a filter refused. 'a/#/b' and
    'a/b+' are invalid ([MQTT-4.7.1-2], [MQTT-4.7.1-3]): the server may also close the connection for them,
    as Mosquitto does; the embedded broker answers 0x80 and keeps the other filters."""
    client = Raw(broker.port)
    client.connect(uid("subs"))
    body = struct.pack("!H", 5) + b"".join(_str(t) + bytes([q]) for t, q in [("ok/x", 1), ("a/#/b", 1), ("a/b+", 0)])
    client.send(SUBSCRIBE, 2, body)
    answer = client.recv(3)
    if broker.name == "amqtt":
        assert answer is not None and answer.type == SUBACK and list(answer.body[2:]) == [1, 0x80, 0x80]
    else:
        assert answer is None or (answer.type == SUBACK and list(answer.body[2:]) == [1, 0x80, 0x80])
    client.close()


def test_a_publish_to_a_wildcard_topic_closes_the_connection_and_publishes_the_will(broker: Any) -> None:
    """[MQTT-3.3.2-2] a PUBLISH topic MUST NOT contain wildcards; a protocol violation closes the connection
    [MQTT-4.8.0-1], and the will goes out [MQTT-3.1.2-8]. (_conformance patch 7: amqtt discarded the packet and
    went on reading from the middle of it.)"""
    topic = uid("badwill")
    watcher = Raw(broker.port)
    watcher.connect(uid("watcher"))
    watcher.subscribe(1, (topic, 0))
    bad = Raw(broker.port)
    bad.connect(uid("bad"), will=(topic, b"violated", 0, False))
    bad.publish("a/+", b"x" * 10)
    assert closed(bad, 3)
    assert watcher.expect(PUBLISH).payload == b"violated"
    watcher.disconnect()


# Limits -----------------------------------------------------------------------------------------------


def test_a_packet_over_the_size_limit_closes_the_connection_and_is_never_stored(broker: Any) -> None:
    """limits.max_packet_size (Mosquitto: max_packet_size), 1 MiB: a bigger PUBLISH closes the connection,
    before any PUBACK; it is neither delivered nor retained. (_conformance patch 10.)"""
    topic = uid("big")
    sub = Raw(broker.port)
    sub.connect(uid("bigsub"))
    sub.subscribe(1, (topic, 1))
    pub = Raw(broker.port)
    pub.connect(uid("bigpub"))
    with contextlib.suppress(OSError):  # closed while the packet was still being written
        pub.publish(topic, b"x" * MAX_PACKET, 1, retain=True, pid=1)
    assert pub.recv(3) is None  # closed, no PUBACK
    assert drain(sub, 0.5) == []
    late = Raw(broker.port)
    late.connect(uid("biglate"))
    late.subscribe(1, (topic, 1))
    assert drain(late, 0.5) == []
    fits = Raw(broker.port)
    fits.connect(uid("fits"))
    fits.publish(topic, b"y" * (MAX_PACKET - 4 - len(topic) - 2 - 2 - 1000), 1, pid=1)
    fits.expect(PUBACK)
    assert len(sub.expect(PUBLISH).payload) > MAX_PACKET - 2000
    for c in (sub, late, fits):
        c.close()


def test_an_absent_sessions_queue_is_bounded_and_drops_the_newest(broker: Any) -> None:
    """limits.max_queued_messages (Mosquitto: max_queued_messages): an absent session keeps that many messages
    and drops newer ones; it gets the oldest, in order, when back. (_conformance patch 10.)"""
    cid, topic = uid("bounded"), uid("bounded/t")
    sub = Raw(broker.port)
    sub.connect(cid, clean=False)
    sub.subscribe(1, (topic, 1))
    sub.disconnect()
    pub = Raw(broker.port)
    pub.connect(uid("flood"))
    for i in range(3 * QUEUE):
        pub.publish(topic, str(i).encode(), 1, pid=i + 1)
        pub.expect(PUBACK)
    pub.disconnect()
    sub = Raw(broker.port)
    sub.connect(cid, clean=False)
    got = []
    while packets := drain(sub, 0.5):  # Mosquitto sends 20 at a time, the next once these are acknowledged
        for packet in packets:
            got.append(int(packet.payload))
            sub.ack(PUBACK, packet.packet_id)
    assert got == list(range(QUEUE))
    sub.disconnect()


def test_a_connection_that_never_sends_connect_is_closed(broker: Any) -> None:
    """limits.connect_timeout (1 s here, 5 s shipped). Mosquitto 2.0.11 has no such timeout (its socket was
    still open after 12 s), so this one is for the embedded broker only. (_conformance patch 9; amqtt's
    timeout_disconnect_delay does not do this.)"""
    if broker.name != "amqtt":
        pytest.skip("Mosquitto 2.0.11 has no CONNECT timeout")
    client = Raw(broker.port)
    started = time.monotonic()
    assert closed(client, 4)
    assert 0.8 < time.monotonic() - started < 3


def test_the_shipped_limits_are_the_documented_defaults() -> None:
    """broker/mqttalk-broker.yaml's limits are those of Limits (1 MiB, 10,000 messages, 5 s); unknown ones
    are refused rather than silently ignored."""
    from mqttalk_broker import CONFIG_FILE
    from mqttalk_broker._conformance import Limits

    limits = Limits.from_config(yaml.safe_load(CONFIG_FILE.read_text())["limits"])
    assert limits == Limits() == Limits(max_packet_size=1_048_576, max_queued_messages=10_000, connect_timeout=5)
    with pytest.raises(ValueError, match="max_queue"):
        Limits.from_config({"max_queue": 5})
