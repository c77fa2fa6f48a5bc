"""The only module that imports paho. One connection to one broker, driven from the caller's thread.

A broker that is a cluster answers at several addresses: a link connects to the first node that answers
(each tried with the connect timeout), starting where the caller says (after the node it just lost).

There is no network thread: the caller pumps the client with :meth:`Link.pump`, callbacks only
append to lists, and every decision happens in the caller's code. This module decides the MQTT
version (5, falling back to 3.1.1 once and remembering it per broker), session flags and timeouts.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ._errors import BrokerRefused, BrokerUnreachable, SessionBusy, TimedOut
from ._url import MAX_NODES, BrokerAddress

SESSION_EXPIRY = 7 * 24 * 3600  # seconds a broker keeps an absent peer's session and queue
KEEPALIVE = 30


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    qos: int
    mid: int


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True


@dataclass(frozen=True)
class Meta:
    """MQTT 5 properties of a publish, for brokers' rules engines and dashboards (ignored on 3.1.1)."""

    content_type: str
    utf8: bool = False  # Payload Format Indicator: the payload is UTF-8 text
    expiry: int | None = None  # Message Expiry Interval, seconds
    user: tuple[tuple[str, str], ...] = ()


class Sent:
    """A QoS 1 publish handed to the network; :meth:`acked` once the broker acknowledged it."""

    __slots__ = ("_info",)

    def __init__(self, info: mqtt.MQTTMessageInfo) -> None:
        self._info = info

    @property
    def mid(self) -> int:
        """The MQTT packet id of the publish."""
        return self._info.mid

    def acked(self) -> bool:
        return self._info.is_published()


class _Packed(Properties):
    """PUBLISH properties packed once: paho packs them again on every publish (~16 us each)."""

    _packed: bytes

    def __init__(self, meta: Meta) -> None:
        super().__init__(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        self.ContentType = meta.content_type
        if meta.utf8:
            self.PayloadFormatIndicator = 1
        if meta.expiry is not None:
            self.MessageExpiryInterval = meta.expiry
        if meta.user:
            self.UserProperty = list(meta.user)
        object.__setattr__(self, "_packed", bytes(super().pack()))  # type: ignore[no-untyped-call]

    def pack(self) -> bytes:
        return self._packed


class Link:
    """A connection with a persistent session (stable client id) or a throwaway clean one."""

    def __init__(
        self,
        broker: BrokerAddress,
        *,
        client_id: str | None = None,
        persistent: bool = False,
        timeout: float = 5.0,
        will: Will | None = None,
        state_dir: Path | None = None,
        on_messages: Callable[[list[Incoming]], None] | None = None,
        ca_file: Path | None = None,
        ws_path: str = "/mqtt",
        first_node: int | None = None,
    ) -> None:
        """``on_messages`` gets every batch of incoming messages, in the caller's thread, whenever
        the link is pumped (also while it waits for an acknowledgement). It must :meth:`ack` each
        one it has taken care of: some brokers (amqtt) send nothing else until it does.
        ``first_node``: for a cluster, the index of the node tried first (the others follow in order);
        None: the node that answered last time (remembered in ``state_dir``), else the first."""
        self.cluster = broker
        if first_node is None and len(broker.nodes) > 1:
            first_node = _ProtocolCache(state_dir).last_node(broker.display())
        self.node_index = (first_node or 0) % len(broker.nodes)
        self.broker = broker.nodes[self.node_index]  # the node this link is connected to (or trying)
        self.client_id = client_id or "mqk-" + os.urandom(10).hex()[:19]
        self.persistent = persistent
        self.timeout = timeout
        self.will = will
        self.state_dir = state_dir
        self.on_messages = on_messages
        self.ca_file = ca_file  # TLS: trust this CA instead of the system's store
        self.ws_path = ws_path
        self.protocol = 0
        self.session_present = False
        self._client: mqtt.Client | None = None
        self._inbox: list[Incoming] = []
        self._connack: ReasonCode | None = None
        self._closed: ReasonCode | None = None
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._acks = 0  # PUBACKs received: pump() returns early on one
        self._publishing: dict[int, str] = {}  # mid -> topic of a QoS 1 publish not acknowledged yet
        self._refused: list[tuple[str, ReasonCode]] = []  # publishes an MQTT 5 broker refused (PUBACK >= 0x80)
        self._packed: dict[Meta, _Packed] = {}

    # -- lifecycle ---------------------------------------------------------------------------------

    def open(self) -> Link:
        """Connect to the first node that answers; a single broker's error as it is, a cluster's as one
        line naming the nodes tried. A node that refuses us (its credentials, its ACL) is passed over
        like one that does not answer: a node set up differently, or not of this cluster, must not keep
        a peer from the others; if every node refused, the refusal is the error."""
        nodes = self.cluster.nodes
        if len(nodes) == 1:
            return self._open_node()
        start, errors, refused, refusals = self.node_index, [], None, 0
        for step in range(len(nodes)):
            self.node_index = (start + step) % len(nodes)
            self.broker = nodes[self.node_index]
            try:
                opened = self._open_node()
            except (BrokerUnreachable, TimedOut) as exc:
                errors.append(exc.message)
                continue
            except BrokerRefused as exc:
                if isinstance(exc, SessionBusy):
                    raise
                errors.append(f"{self.broker.display()} refused us: {exc.message}")
                refused, refusals = exc, refusals + 1
                continue
            if self.node_index != start:  # (the next command tries this one first: a dead node costs once)
                _ProtocolCache(self.state_dir).put_last_node(self.cluster.display(), self.node_index)
            return opened
        if refused is not None and refusals == len(nodes):
            raise BrokerRefused(f"every node of {self.cluster.display()} refused us: {refused.message}", refused.hint)
        raise BrokerUnreachable(
            f"no node of {self.cluster.display()} answered: {'; '.join(errors)}",
            "is the cluster running? are these its nodes' addresses?",
        )

    def _open_node(self) -> Link:
        cache = _ProtocolCache(self.state_dir)
        key = f"{self.broker.host}:{self.broker.port}"
        known = cache.get(key)
        if known is not None:
            try:
                self._connect(known)
            except _ProtocolRefused:  # it spoke MQTT 5 before: it is not the protocol, it is the broker
                raise BrokerUnreachable(
                    f"{self.broker.display()} closed the connection before accepting it",
                    "is the broker overloaded or restarting? try again",
                ) from None
            return self
        # First contact: find out whether the broker speaks MQTT 5. The probe is a bare CONNECT
        # (no properties): amqtt answers that with "unsupported protocol version", but hangs on a v5
        # CONNECT that carries properties, and some brokers just close the socket.
        try:
            self._connect(mqtt.MQTTv5, bare=True)
        except _ProtocolRefused:
            self._connect(mqtt.MQTTv311)
            cache.put(
                key, mqtt.MQTTv311
            )  # (only once it answered 3.1.1: a node silent at first contact is no 3.1.1 node)
            return self
        cache.put(key, mqtt.MQTTv5)
        if self._probe_only:  # the probe had no session expiry or will: connect again with them
            self._drop()
            self._connect(mqtt.MQTTv5)
        return self

    @property
    def _probe_only(self) -> bool:
        """A bare probe cannot serve as this connection (it lacks session expiry or a will)."""
        return self.persistent or self.will is not None

    def close(self) -> None:
        """Disconnect cleanly (DISCONNECT sent, so no Last Will)."""
        client, self._client = self._client, None
        if client is None:
            return
        if self._closed is None:
            client.disconnect()
            deadline = time.monotonic() + 1.0
            while self._closed is None and time.monotonic() < deadline:
                if _loop(client, 0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break
        sock = client.socket()
        if sock is not None:
            sock.close()

    def __enter__(self) -> Link:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operations --------------------------------------------------------------------------------

    def subscribe(self, topics: list[str], qos: int = 1, *, no_local: frozenset[str] = frozenset()) -> None:
        """Subscribe and wait for the SUBACK; a refused topic raises :class:`BrokerRefused`.
        Topics in ``no_local`` (MQTT 5 only) do not echo this connection's own publishes."""
        client = self._live()
        if self.protocol == mqtt.MQTTv5:
            from paho.mqtt.subscribeoptions import SubscribeOptions

            rc, mid = client.subscribe([(t, SubscribeOptions(qos=qos, noLocal=t in no_local)) for t in topics])
        else:
            rc, mid = client.subscribe([(t, qos) for t in topics])
        self._check(rc)
        self._wait(lambda: mid in self._subacks, "subscribe")
        for topic, code in zip(topics, self._subacks.pop(mid or 0), strict=False):
            if code.is_failure:
                # NATS maps topic levels to subject tokens and refuses any topic with '.' or ' ' in it
                hint = (
                    "NATS refuses '.' and ' ' in MQTT topics: choose a --prefix without them"
                    if "." in topic or " " in topic
                    else "check the broker's ACL for this user"
                )
                raise BrokerRefused(f"broker refused subscription to {topic!r}: {code}", hint)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = True,
        meta: Meta | None = None,
    ) -> Sent:
        """Publish; with ``wait`` return only once the broker acknowledged it (PUBACK). ``meta`` goes
        along as MQTT 5 properties when the broker speaks MQTT 5."""
        client = self._live()
        props = None
        if meta is not None and self.protocol == mqtt.MQTTv5:
            props = self._packed.get(meta)
            if props is None:
                props = self._packed[meta] = _Packed(meta)
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        self._check(info.rc)
        if qos > 0:
            self._publishing[info.mid] = topic
        sent = Sent(info)
        if wait and qos > 0:
            self.wait_published(sent)
        return sent

    @contextlib.contextmanager
    def burst(self) -> Iterator[None]:
        """Publishes made inside go out together: the socket is corked (Linux TCP_CORK) until the end,
        so a burst costs a few TCP segments instead of one per message (and the broker wakes up less)."""
        raw = None if self._client is None else _tcp(self._client.socket())
        cork = getattr(socket, "TCP_CORK", None)  # Linux only: elsewhere a burst is just its publishes
        corked = False
        if raw is not None and cork is not None:
            with contextlib.suppress(AttributeError, OSError):
                raw.setsockopt(socket.IPPROTO_TCP, cork, 1)
                corked = True
        try:
            yield
        finally:
            if corked and raw is not None:
                with contextlib.suppress(OSError):
                    raw.setsockopt(socket.IPPROTO_TCP, cork, 0)

    def wait_published(self, sent: Sent) -> None:
        """Pump until the broker acknowledged ``sent`` (raises if it refused it, or on a timeout)."""
        self._wait(sent.acked, "publish")
        self._raise_refused()

    def _raise_refused(self) -> None:
        """An MQTT 5 broker acknowledges a publish it will not deliver with a failure reason (Mosquitto's
        ACL: "Not authorized"). That is no delivery: say so instead of counting it as sent. (On 3.1.1
        a broker can only drop such a publish silently; readers' sequence gaps show it.)"""
        if self._refused:
            topic, code = self._refused[0]
            self._refused.clear()
            raise BrokerRefused(
                f"broker at {self.broker.display()} refused a message on {topic!r}: {code.getName()}",
                "check the broker's ACL for this user and the topic prefix",
            )

    def pump(self, timeout: float, *, wake: int | None = None) -> int:
        """Run the network for up to ``timeout`` seconds; return early once something arrived (a message,
        handed to ``on_messages``, or an acknowledgement), or ``wake`` (a descriptor) is readable. Returns
        the number of messages handed over."""
        client = self._live()
        deadline = time.monotonic() + timeout
        acks = self._acks
        woken = [False] if wake is not None else None  # HANDOFF hook: a command to serve (see _handoff)
        while True:
            rc = _loop(client, max(0.0, min(timeout, deadline - time.monotonic())), wake, woken)
            if rc != mqtt.MQTT_ERR_SUCCESS or self._closed is not None:
                self._lost()
            handed = self._dispatch()
            self._raise_refused()
            if handed or self._acks != acks or time.monotonic() >= deadline or (woken and woken[0]):
                return handed

    def _dispatch(self) -> int:
        if not self._inbox or self.on_messages is None:
            return 0
        batch, self._inbox = self._inbox, []
        self.on_messages(batch)
        return len(batch)

    def ack(self, message: Incoming) -> None:
        """Acknowledge a QoS 1 message: call once it is stored, so a crash before that redelivers it."""
        if message.qos > 0 and self._client is not None:
            self._client.ack(message.mid, message.qos)

    # -- internals ---------------------------------------------------------------------------------

    def _connect(self, protocol: int, *, bare: bool = False) -> None:
        """Connect with ``protocol``. ``bare``: a v5 probe without properties, as a clean session,
        that raises :class:`_ProtocolRefused` if the broker refuses, closes or stays silent."""
        self._connack = self._closed = None
        self._publishing.clear()  # message ids start over on a new connection
        self._refused.clear()
        persistent = self.persistent and not bare
        client = self._new_client(protocol, persistent=persistent, bare=bare)
        self._dial(client, persistent=persistent, v5=protocol == mqtt.MQTTv5)
        self._client, self.protocol = client, protocol
        _no_delay(client.socket())
        self._await_connack(client, bare=bare, v5=protocol == mqtt.MQTTv5)

    def _new_client(self, protocol: int, *, persistent: bool, bare: bool) -> _Client:
        """A paho client set up for this link: callbacks, credentials, TLS, websockets, will."""
        # A probe must not touch our persistent session: a clean start would discard its queue.
        client_id = "mqk-probe-" + os.urandom(7).hex()[:13] if bare and self._probe_only else self.client_id
        transport: Literal["tcp", "websockets"] = "websockets" if self.broker.websockets else "tcp"
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion(protocol),
            clean_session=None if protocol == mqtt.MQTTv5 else not persistent,
            transport=transport,
            manual_ack=True,
            reconnect_on_failure=False,
        )
        client.connect_timeout = self.timeout
        # No limit in paho: on every PUBACK it walks the messages it holds to find one to send next
        # (~16 us per message with a window of 100); callers keep their own window (_outbox.WINDOW).
        client.max_inflight_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        if self.broker.username is not None:
            client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:  # certificates are always verified, host name included
            client.tls_set(ca_certs=str(self.ca_file) if self.ca_file else None, cert_reqs=ssl.CERT_REQUIRED)
        if self.broker.websockets:
            client.ws_set_options(path=self.ws_path)
        if self.will is not None and not bare:
            client.will_set(self.will.topic, self.will.payload, qos=1, retain=self.will.retain)
        return client

    def _dial(self, client: _Client, *, persistent: bool, v5: bool) -> None:
        """Open the socket and send CONNECT; every way that fails is one clear error."""
        props = None
        if v5 and persistent:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY
        where = self.broker.display()
        try:
            client.connect(
                self.broker.host,
                self.broker.port,
                keepalive=KEEPALIVE,
                clean_start=not persistent if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        except socket.gaierror:
            raise BrokerUnreachable(
                f"cannot resolve broker host {self.broker.host!r}", "check the URL's host name"
            ) from None
        except ConnectionRefusedError:
            raise BrokerUnreachable(
                f"nothing is listening at {where}", "is the broker running? `mqttalk broker` starts the embedded one"
            ) from None
        except TimeoutError:
            raise BrokerUnreachable(f"no answer from {where} within {self.timeout:g}s") from None
        except ssl.SSLCertVerificationError as exc:
            raise BrokerRefused(
                f"the certificate of {where} is not trusted: {exc.verify_message}",
                "give the CA that signed it with --ca PATH (or MQTTALK_CA_FILE)",
            ) from None
        except ssl.SSLError as exc:
            raise BrokerUnreachable(f"TLS handshake with {where} failed: {exc.reason or exc}") from None
        except (OSError, ValueError) as exc:
            raise BrokerUnreachable(f"cannot connect to {where}: {exc}") from None

    def _await_connack(self, client: _Client, *, bare: bool, v5: bool) -> None:
        """Wait for the broker's CONNACK; a silence, a close or a refusal is one clear error (a probe's:
        :class:`_ProtocolRefused`, so the caller falls back to MQTT 3.1.1)."""
        where = self.broker.display()
        answer_timeout = min(self.timeout, 2.0) if bare else self.timeout
        deadline = time.monotonic() + answer_timeout
        while self._connack is None and self._closed is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self._drop()
                if bare:
                    raise _ProtocolRefused
                raise BrokerUnreachable(
                    f"{where} accepted the connection but sent no MQTT answer within {self.timeout:g}s",
                    "is it an MQTT port?",
                )
            if _loop(client, min(left, 0.2)) != mqtt.MQTT_ERR_SUCCESS and self._connack is None:
                break
        code = self._connack
        if code is None or (code.is_failure and code.getName() == "Unsupported protocol version"):
            self._drop()
            if v5:
                raise _ProtocolRefused
            raise BrokerUnreachable(
                f"{where} closed the connection before accepting it", "is it an MQTT port? does it need TLS (mqtts://)?"
            )
        if code.is_failure:
            self._drop()
            raise BrokerRefused(
                f"broker at {where} refused the connection: {code.getName()}",
                "check the user name and password in the URL or config",
            )

    def _drop(self) -> None:
        client, self._client = self._client, None
        sock = client.socket() if client is not None else None
        if sock is not None:
            sock.close()

    def _live(self) -> mqtt.Client:
        if self._client is None:
            raise BrokerUnreachable(f"not connected to {self.broker.display()}")
        return self._client

    def _check(self, rc: int) -> None:
        if rc == mqtt.MQTT_ERR_NO_CONN:
            self._lost()
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerUnreachable(f"MQTT error talking to {self.broker.display()}: {mqtt.error_string(rc)}")

    def _wait(self, done: object, what: str) -> None:
        """Pump until ``done()``. The time limit counts from the last sign of life: a broker busy
        delivering a long backlog answers our request only after it, and that is not a hang."""
        client = self._live()
        deadline = time.monotonic() + self.timeout
        while not done():  # type: ignore[operator]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimedOut(f"broker at {self.broker.display()} did not confirm the {what} within {self.timeout:g}s")
            if _loop(client, min(left, 0.2)) != mqtt.MQTT_ERR_SUCCESS or self._closed is not None:
                self._lost()
            if self._dispatch():
                deadline = time.monotonic() + self.timeout

    def _lost(self) -> None:
        reason = self._closed
        self._drop()
        detail = f": {reason.getName()}" if reason is not None and reason.is_failure else ""
        raise BrokerUnreachable(f"lost the connection to {self.broker.display()}{detail}")

    # paho callbacks: they only hand over.
    def _on_connect(self, _c: object, _u: object, flags: mqtt.ConnectFlags, rc: ReasonCode, _p: object) -> None:
        self._connack = rc
        self.session_present = bool(flags.session_present)

    def _on_disconnect(self, _c: object, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        self._closed = rc

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        self._inbox.append(Incoming(msg.topic, bytes(msg.payload), msg.qos, msg.mid))

    def _on_publish(self, _c: object, _u: object, mid: int, rc: ReasonCode, _p: object) -> None:
        self._acks += 1
        topic = self._publishing.pop(mid, "?")
        if rc.is_failure:
            self._refused.append((topic, rc))

    def _on_subscribe(self, _c: object, _u: object, mid: int, codes: list[ReasonCode], _p: object) -> None:
        self._subacks[mid] = codes


class _Client(mqtt.Client):
    """paho's client, reading the broker's socket through :class:`_ReadAhead`, with a short way
    through the PUBACKs a sender gets for every message."""

    def _create_socket(self) -> Any:
        return _ReadAhead(super()._create_socket())

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        """A PUBACK that says success without properties (what brokers nearly always send: the message
        id alone, or with v5's "Success" or "No matching subscribers") is handed on with a shared reason
        code; paho builds a ReasonCode and a Properties object for each (~20% of a sender's time).
        Anything else (a refusal, properties) goes through paho's own decoding."""
        packet = self._in_packet["packet"]
        reason = None
        if cmd == "PUBACK" and len(packet) in (2, 3):
            reason = _PUBACK_OK.get(packet[2] if len(packet) == 3 else 0)
        if reason is None:
            return super()._handle_pubackcomp(cmd)
        mid = int.from_bytes(packet[:2], "big")
        self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received %s (Mid: %d)", cmd, mid)
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


_PUBACK_OK = {
    code: ReasonCode(PacketTypes.PUBACK, identifier=code) for code in (0x00, 0x10)
}  # Success, No matching subscribers
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


class _ReadAhead:
    """A socket read in large chunks. paho reads each packet with three ``recv`` calls (type, length,
    rest), and a PUBACK is 4 bytes: a sender taking in the acknowledgements of a window of 100 made
    300 system calls where one does. Everything but ``recv`` and ``pending`` goes to the socket (TCP,
    TLS, or paho's websocket wrapper) unchanged."""

    __slots__ = ("_buf", "_pos", "_socket")
    CHUNK = 64 * 1024

    def __init__(self, sock: Any) -> None:
        self._socket = sock
        self._buf = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        pos = self._pos
        if pos >= len(self._buf):
            data: bytes = self._socket.recv(max(size, self.CHUNK))  # b"" at the end; raises when none yet
            if len(data) <= size:
                return data
            self._buf, pos = data, 0
        self._pos = pos + size
        return self._buf[pos : pos + size]

    def pending(self) -> int:
        """Bytes already read from the network and not yet taken (here, or in a TLS or websocket layer)."""
        inner = getattr(self._socket, "pending", None)
        return len(self._buf) - self._pos + (inner() if inner is not None else 0)

    def fileno(self) -> int:
        return int(self._socket.fileno())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


def _tcp(sock: Any) -> Any:
    """The TCP socket under paho's socket object (read-ahead, websocket wrappers keep it inside)."""
    for _ in range(3):
        inner = getattr(sock, "_socket", None)
        if inner is None:
            break
        sock = inner
    return sock


def _no_delay(sock: Any) -> None:
    """Turn Nagle off: MQTT sends small packets back to back (PUBACK, then PUBLISH), and with Nagle
    on the second waits for the broker's delayed ACK, ~40 ms per exchange. paho leaves it on."""
    with contextlib.suppress(AttributeError, OSError):
        _tcp(sock).setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _ProtocolRefused(Exception):
    """The broker does not speak the MQTT version we offered."""


class _ProtocolCache:
    """Remembers per broker that it only speaks 3.1.1, so later commands skip the v5 attempt."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = state_dir / "protocols.json" if state_dir else None

    def _load(self) -> dict[str, int]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> int | None:
        value = self._load().get(key)
        return value if value in (mqtt.MQTTv311, mqtt.MQTTv5) else None

    def last_node(self, cluster: str) -> int | None:
        """The index of the node of ``cluster`` that answered last (a command starts there)."""
        value = self._load().get(f"last node of {cluster}")
        return value if isinstance(value, int) and 0 <= value < MAX_NODES else None

    def put_last_node(self, cluster: str, index: int) -> None:
        self._store(f"last node of {cluster}", index)

    def put(self, key: str, protocol: int) -> None:
        self._store(key, protocol)

    def _store(self, key: str, value: int) -> None:
        if self.path is None:
            return
        data = self._load()
        data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.path)


_BURST = 1000  # most packets _loop takes in from what was read before it goes back to the caller


def _loop(
    client: mqtt.Client, timeout: float, wake: int | None = None, woken: list[bool] | None = None
) -> MQTTErrorCode:
    """paho's ``loop()`` through its external-loop API (``loop_read``/``loop_write``/``loop_misc``).

    Same steps, minus the wake-up socket pair ``loop()`` creates for threaded use: with it, every
    publish costs a second system call (a byte written to wake a select no other thread runs).
    ``wake``: a descriptor watched too; ``woken[0]`` is set once it is readable.
    """
    sock = client.socket()
    if sock is None:
        return mqtt.MQTT_ERR_NO_CONN
    pending = getattr(sock, "pending", None)
    if pending is not None and pending() > 0:  # TLS or websocket bytes already read and buffered
        timeout = 0.0
    poller = select.poll()  # not select(): it fails on descriptors >= 1024 (a process holding many links)
    try:
        poller.register(sock, select.POLLIN | (select.POLLOUT if client.want_write() else 0))
        if wake is not None:
            poller.register(wake, select.POLLIN)
        events = poller.poll(timeout * 1000)
    except (OSError, ValueError):  # closed under us
        return mqtt.MQTT_ERR_CONN_LOST
    ready = 0
    for fd, event in events:
        if wake is not None and fd == wake:
            if woken is not None:
                woken[0] = True
        else:
            ready = event
    readable, writable = ready & ~select.POLLOUT, ready & select.POLLOUT
    if readable or (pending is not None and pending() > 0):
        # paho reads one packet per loop_read when it has nothing in flight (a reader taking in a
        # backlog): take in every packet already read from the socket, so they are handed over, stored
        # and acknowledged as one batch (one SQLite transaction) instead of one at a time.
        for _ in range(_BURST):
            rc = client.loop_read()
            if rc != mqtt.MQTT_ERR_SUCCESS or client.socket() is None:
                return rc
            if pending is None or pending() <= 0:
                break
    if writable:
        rc = client.loop_write()
        if rc != mqtt.MQTT_ERR_SUCCESS or client.socket() is None:
            return rc
    return client.loop_misc()
