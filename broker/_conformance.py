"""Make the embedded broker an MQTT 3.1.1 broker for any client, and give it limits. Applied by :func:`install`.

Written against amqtt 0.12.1 (:data:`AMQTT_VERSION`; :func:`install` refuses any other 0.x release, since
several patches replace amqtt methods whole). Each numbered patch below names the amqtt bug, the
specification statement it broke, and the test in tests/test_conformance.py that fails without it.

1. Keepalive is not enforced [MQTT-3.1.2-24]. amqtt's reader times out after the keepalive (plus the
   ``timeout_disconnect_delay`` setting) and then calls ``handle_read_timeout``, which the broker's handler
   leaves empty: a silent client with an open socket stays connected forever, and its will is never
   published. The read timeout is now 1.5 x keepalive exactly, and on expiry the connection is closed
   as if the network had failed (so the will goes out). ``timeout_disconnect_delay`` is no longer used.

2. A clean session's state is reused [MQTT-3.1.2-6, MQTT-3.2.2-3]. amqtt forgets a disconnected clean
   session lazily (its monitor runs each second), so a ``cleansession=0`` CONNECT right after a clean one
   found the old state: CONNACK said session present, and the clean session's subscriptions lived on.
   Such a session is now discarded before the CONNECT is served.

3. Unacknowledged outgoing QoS 1 and 2 messages are dropped instead of resent [MQTT-4.4.0-1,
   MQTT-3.3.1-1]. amqtt waits 5 s for PUBACK/PUBREC/PUBCOMP and forgets the message on timeout or when
   the connection dies (it even forgets a QoS 2 message once PUBREC came, so it can never resend
   PUBREL). The replacement keeps each outgoing QoS 1/2 message in the session's ``inflight_out`` until
   its exchange is complete (PUBACK, or PUBCOMP), with no timeout while the connection lives; when a
   persistent session's client connects again, its unacknowledged PUBLISHes go out first with DUP set
   and their original packet ids, and PUBRELs are resent. (This supersedes the first patch of
   :mod:`mqttalk_broker._fixes`, which put such messages back in the offline queue as new messages:
   new packet ids, no DUP, so a QoS 2 one could arrive twice.) Retries no longer hold up the
   connection: amqtt waited up to 10 s for them before serving the client's own packets.
   When a connection ends with a message not yet received by the client, the message is also reported
   as queued for its session (``BrokerEvents.RETAINED_MESSAGE``) so that
   :mod:`mqttalk_broker.persistence` keeps it across a broker restart, as the old patch did.

4. A PUBREL nobody waits for gets no PUBCOMP [MQTT-4.3.3-2]. A publisher that sent a QoS 2 PUBLISH,
   got PUBREC, lost its connection and resent PUBREL on its next one (as [MQTT-4.4.0-1] requires) got no
   answer, and the message was never delivered. Such a PUBREL now releases the stored message (once)
   and is always answered with PUBCOMP; amqtt's spurious PUBREC resend on reconnect is gone.

5. Messages are delivered at the subscription's QoS, not the lower of it and the PUBLISH's QoS
   [MQTT-3.8.4-6]: a QoS 0 PUBLISH reached QoS 2 subscribers at QoS 2 (and was queued for absent ones).

6. Queued messages are sent with RETAIN set [MQTT-3.3.1-9]: a message kept for an absent session is a
   message matching an established subscription, so RETAIN is 0.

7. PUBLISH to a topic starting with ``$`` killed the connection, silently: amqtt left the client's
   message loop but neither closed the socket nor published the will, and every later packet of that
   client was ignored. Topics such as ``$app/x`` are legal for clients (they only must not match ``#``
   or ``+`` filters, [MQTT-4.7.2-1], which amqtt does right); ``$SYS/...`` from clients is dropped, as
   Mosquitto does. A PUBLISH with an invalid topic (empty, or with a wildcard, [MQTT-3.3.2-2]) now
   closes the connection properly (the will goes out): amqtt discarded a packet it could not decode and
   went on reading from the middle of it.

8. Re-subscribing to a filter kept the old QoS while SUBACK granted the new one [MQTT-3.8.4-3].

9. A first packet that is not a valid CONNECT left the socket open [MQTT-3.1.0-1]; so did a TCP
   connection that never sends anything (amqtt's ``timeout_disconnect_delay`` is *not* a CONNECT
   timeout). Both are now closed, the latter after ``limits.connect_timeout`` seconds.

10. No limits (:class:`Limits`, the ``limits`` section of mqttalk-broker.yaml): any packet up to MQTT's
    256 MB was read into memory and stored, and an absent session's queue grew without bound. A packet
    larger than ``max_packet_size`` now closes the connection after its fixed header is read (its body
    is never read, stored or delivered); an absent session keeps at most ``max_queued_messages``
    messages and drops *newer* ones once full, as Mosquitto's ``max_queued_messages`` does.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, fields
from importlib.metadata import version
from typing import Any

AMQTT_VERSION = "0.12.1"
logger = logging.getLogger(__name__)

_PATCHED = "_mqttalk_conformance"
_OWNER = "mqttalk.inflight_owner"  # session.attributes key: packet id -> the handler whose task runs its exchange
_background: set[asyncio.Task[Any]] = set()


@dataclass(frozen=True)
class Limits:
    """The ``limits`` section of mqttalk-broker.yaml."""

    max_packet_size: int = 1_048_576
    """Largest MQTT packet a client may send, in bytes (fixed header included). Bigger: the connection is closed."""
    max_queued_messages: int = 10_000
    """Messages kept for one absent persistent session; once full, newer ones are dropped."""
    connect_timeout: float = 5.0
    """Seconds a new connection has to send its CONNECT packet."""

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> Limits:
        known = {f.name for f in fields(cls)}
        unknown = set(section or {}) - known
        if unknown:
            raise ValueError(f"unknown broker limits {sorted(unknown)}; known: {sorted(known)}")
        limits = cls(**(section or {}))
        for f in fields(cls):
            if not getattr(limits, f.name) > 0:
                raise ValueError(f"limits.{f.name} must be positive")
        return limits


_limits = Limits()


class PacketTooLarge(Exception):
    """A client sent a packet bigger than ``limits.max_packet_size``."""


class MalformedPacket(Exception):
    """A packet amqtt could not decode (e.g. a PUBLISH topic with a wildcard, [MQTT-3.3.2-2])."""


def install(limits: Limits | None = None) -> None:
    """Patch amqtt once per process; ``limits`` (default: :class:`Limits`) apply from now on."""
    global _limits  # noqa: PLW0603
    if not version("amqtt").startswith(AMQTT_VERSION.rsplit(".", 1)[0] + "."):
        raise RuntimeError(f"mqttalk_broker._conformance patches amqtt {AMQTT_VERSION}, found {version('amqtt')}")
    from . import _fixes

    _fixes.install()  # the take-over patch marks stopped handlers, which the in-flight exchanges rely on
    _limits = limits or Limits()
    from amqtt.broker import Broker

    if getattr(Broker._run_broadcast, _PATCHED, False):
        return
    _install_connect()
    _install_packet_size()
    _install_inflight()
    _install_broadcast()


def _mark(*functions: Any) -> None:
    for fn in functions:
        setattr(fn, _PATCHED, True)


def _spawn(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _close(writer: Any) -> None:
    try:
        await writer.close()
    except Exception:
        logger.debug("closing a refused connection failed", exc_info=True)


# 1, 2, 9: CONNECT timeout, closing refused connections, keepalive, clean session state --------------


def _install_connect() -> None:
    from amqtt.broker import Broker
    from amqtt.errors import MQTTError
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler as Handler

    init_from_connect = Handler.init_from_connect.__func__  # type: ignore[attr-defined]
    initialize = Broker._initialize_client_session

    async def connect(cls: Any, reader: Any, writer: Any, plugins_manager: Any, loop: Any = None) -> Any:
        try:
            handler, session = await asyncio.wait_for(
                init_from_connect(cls, reader, writer, plugins_manager, loop), _limits.connect_timeout
            )
        except MQTTError:
            raise  # amqtt closes the connection itself
        except Exception as exc:
            # No CONNECT in time, not a CONNECT, or too big: amqtt would leave the socket open.
            await _close(writer)
            raise MQTTError(f"no valid CONNECT: {exc!r}") from exc
        handler.mqttalk_keepalive = session.keep_alive  # as the client asked, before amqtt adds to it
        broker = getattr(plugins_manager.context, "_broker_instance", None)
        old, old_handler = broker.sessions.get(session.client_id, (None, None)) if broker else (None, None)
        if old is not None and (session.clean_session or old.clean_session):
            # A new session replaces the old one (amqtt handles a persistent one resumed itself).
            if old.transitions.state == "connected" and old_handler is not None:
                # [MQTT-3.1.4-2]: the old connection is closed first; amqtt left it running.
                await old_handler.handle_connection_closed()
                await old_handler.stop()
            if not session.clean_session:
                await broker._delete_session(session.client_id)  # [MQTT-3.1.2-6]: a clean one is never reused
        return handler, session

    async def initialized(self: Any, reader: Any, writer: Any, address: str, port: int) -> Any:
        handler, session = await initialize(self, reader, writer, address, port)
        keepalive = getattr(handler, "mqttalk_keepalive", 0)
        session.keep_alive = 1.5 * keepalive if keepalive > 0 else 0  # [MQTT-3.1.2-24]
        return handler, session

    def read_timeout(self: Any) -> None:
        # Nothing from the client for 1.5 x keepalive: close as if the network had failed (the will goes out).
        _spawn(self.handle_connection_closed())

    _mark(connect, initialized, read_timeout)
    Handler.init_from_connect = classmethod(connect)  # type: ignore[method-assign, assignment]
    Broker._initialize_client_session = initialized  # type: ignore[method-assign]
    Handler.handle_read_timeout = read_timeout  # type: ignore[method-assign]


# 10: maximum packet size ------------------------------------------------------------------------------


def _install_packet_size() -> None:
    from amqtt.errors import MQTTError
    from amqtt.mqtt.connect import ConnectPacket
    from amqtt.mqtt.packet import CONNECT, MQTTFixedHeader, MQTTPacket

    from_stream = MQTTFixedHeader.from_stream.__func__  # type: ignore[attr-defined]
    connect_from_stream = ConnectPacket.from_stream.__func__  # type: ignore[attr-defined]

    async def connect_packet(cls: Any, reader: Any, fixed_header: Any = None, variable_header: Any = None) -> Any:
        if fixed_header is None:
            fixed_header = await MQTTFixedHeader.from_stream(reader)
            if fixed_header is None or fixed_header.packet_type != CONNECT:  # [MQTT-3.1.0-1]
                raise MQTTError(f"first packet is not CONNECT: {fixed_header!r}")
        return await connect_from_stream(cls, reader, fixed_header, variable_header)

    async def fixed_header(cls: Any, reader: Any) -> Any:
        header = await from_stream(cls, reader)
        if header is not None:
            n, size = header.remaining_length, 2
            while n >= 128:
                n, size = n // 128, size + 1
            if size + header.remaining_length > _limits.max_packet_size:
                raise PacketTooLarge(f"{size + header.remaining_length} bytes > {_limits.max_packet_size}")
        return header

    packet_from_stream = MQTTPacket.from_stream.__func__  # type: ignore[attr-defined]

    async def packet(cls: Any, reader: Any, fixed_header: Any = None, variable_header: Any = None) -> Any:
        # amqtt's reader loop discards a packet it cannot decode and reads on from the middle of it (a PUBLISH
        # to "a/+" left its payload to be parsed as packets). MQTT says close [MQTT-4.8.0-1]; an ordinary
        # exception ends amqtt's reader loop, which closes the connection (and the will goes out).
        try:
            return await packet_from_stream(cls, reader, fixed_header, variable_header)
        except MQTTError as exc:
            raise MalformedPacket(str(exc)) from exc

    _mark(fixed_header, connect_packet, packet)
    MQTTFixedHeader.from_stream = classmethod(fixed_header)  # type: ignore[method-assign, assignment]
    MQTTPacket.from_stream = classmethod(packet)  # type: ignore[method-assign, assignment]
    ConnectPacket.from_stream = classmethod(connect_packet)  # type: ignore[method-assign, assignment]


# 3, 4: in-flight exchanges kept until complete, resent on reconnect, PUBREL always answered ------------


class _Gone(Exception):
    """The connection was closed (or is closing): the exchange cannot complete on it."""


def _install_inflight() -> None:
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler as Handler
    from amqtt.mqtt.protocol.handler import ProtocolHandler
    from amqtt.mqtt.pubcomp import PubcompPacket
    from amqtt.session import OUTGOING

    qos1_flow, qos2_flow = ProtocolHandler._handle_qos1_message_flow, ProtocolHandler._handle_qos2_message_flow

    async def qos1(self: Any, message: Any) -> None:
        if message.direction == OUTGOING:
            await _outgoing(self, message)
        else:
            await qos1_flow(self, message)

    async def qos2(self: Any, message: Any) -> None:
        if message.direction == OUTGOING:
            await _outgoing(self, message)
        else:
            await qos2_flow(self, message)

    async def retry(self: Any) -> None:
        # [MQTT-4.4.0-1]: resend what the session's earlier connections left unacknowledged, in order, before
        # anything else is sent; do not wait for the acknowledgements. Incoming QoS 2 messages awaiting
        # PUBREL need nothing: the client resends PUBREL, and `pubrel` below answers it.
        owners = self.session.attributes.setdefault(_OWNER, {})
        for message in list(self.session.inflight_out.values()):
            if owners.get(message.packet_id) is not self:
                _spawn(_outgoing(self, message))
        await asyncio.sleep(0)  # each exchange takes its place in the write lock's queue, in this order

    async def pubrel(self: Any, packet: Any) -> None:
        waiter = self._pubrel_waiters.get(packet.packet_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(packet)
            return
        message = self.session.inflight_in.pop(packet.packet_id, None) if self.session else None
        if message is not None:  # its PUBLISH came on an earlier connection
            message.pubrel_packet = packet
            await self.session.delivered_message_queue.put(message)
        await self._send_packet(PubcompPacket.build(packet.packet_id))

    _mark(qos1, qos2, retry, pubrel)
    Handler._handle_qos1_message_flow = qos1  # type: ignore[method-assign]
    Handler._handle_qos2_message_flow = qos2  # type: ignore[method-assign]
    Handler._retry_deliveries = retry  # type: ignore[method-assign]
    Handler.handle_pubrel = pubrel  # type: ignore[method-assign]


async def _outgoing(handler: Any, message: Any) -> None:
    """One outgoing QoS 1/2 exchange on ``handler``'s connection, from wherever it stood."""
    from amqtt.mqtt.pubrel import PubrelPacket

    from ._fixes import _stopped

    session, packet_id = handler.session, message.packet_id
    owners = session.attributes.setdefault(_OWNER, {})
    owners[packet_id] = handler
    session.inflight_out[packet_id] = message
    try:
        if message.qos == 1 or message.pubrec_packet is None:
            publish = message.build_publish_packet(dup=message.publish_packet is not None)  # [MQTT-3.3.1-1]
            message.publish_packet = publish  # from now on it may have reached the client: a resend is a DUP
            waiters = handler._puback_waiters if message.qos == 1 else handler._pubrec_waiters
            ack = await _exchange(handler, publish, waiters, packet_id, _stopped)
            if message.qos == 1:
                message.puback_packet = ack
            else:
                message.pubrec_packet = ack
        if message.qos == 2:
            message.pubrel_packet = PubrelPacket.build(packet_id)
            message.pubcomp_packet = await _exchange(
                handler, message.pubrel_packet, handler._pubcomp_waiters, packet_id, _stopped
            )
    except (asyncio.CancelledError, _Gone, OSError) as exc:
        mine = owners.get(packet_id) is handler
        if mine:
            owners.pop(packet_id, None)
            _left_unacknowledged(handler, session, message)
        task = asyncio.current_task()
        if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
            raise  # this task itself was cancelled (broker shutdown), not only its waiter
        return
    if owners.get(packet_id) is handler:
        owners.pop(packet_id, None)
    if session.inflight_out.get(packet_id) is message:
        del session.inflight_out[packet_id]


async def _exchange(handler: Any, packet: Any, waiters: dict[int, Any], packet_id: int, stopped: Any) -> Any:
    """Send ``packet`` and wait (as long as the connection lives) for its acknowledgement."""
    if handler in stopped or handler.writer is None:
        raise _Gone
    waiter = asyncio.get_running_loop().create_future()
    waiters[packet_id] = waiter  # before sending: the answer may be read before this task runs again
    try:
        await handler._send_packet(packet)
        if handler in stopped:  # stopped while this wrote: nobody will cancel the waiter
            raise _Gone
        return await waiter
    finally:
        if waiters.get(packet_id) is waiter:
            del waiters[packet_id]


def _left_unacknowledged(handler: Any, session: Any, message: Any) -> None:
    """``handler``'s connection ended with ``message`` unacknowledged: it stays in ``session.inflight_out``."""
    from amqtt.broker import RetainedApplicationMessage
    from amqtt.events import BrokerEvents

    from ._fixes import _stopped

    if session.clean_session:
        return  # the session ends with its connection [MQTT-3.1.2-6]
    broker = getattr(handler.plugins_manager.context, "_broker_instance", None)
    current = broker._get_handler(session) if broker is not None else None
    if (
        current is not None
        and current is not handler
        and current not in _stopped
        and current.session is session
        and current._reader_task is not None
        and not current._reader_task.done()
    ):
        # The client is already back on a newer connection, which resent what it found in flight before this
        # exchange let go of the message: resend it there.
        _spawn(_outgoing(current, message))
        return
    if message.pubrec_packet is None:  # not received by the client yet: keep it across a broker restart too
        queued = RetainedApplicationMessage(None, message.topic, message.data, message.qos)
        _spawn(
            handler.plugins_manager.fire_event(
                BrokerEvents.RETAINED_MESSAGE, client_id=session.client_id, retained_message=queued
            )
        )


# 5, 6, 7, 8, 10: routing --------------------------------------------------------------------------------


def _install_broadcast() -> None:
    from amqtt.broker import Broker

    add_subscription = Broker.add_subscription

    async def run_broadcast(self: Any, running_tasks: Any) -> None:
        # amqtt 0.12.1's Broker._run_broadcast, but at min(message QoS, subscription QoS) [MQTT-3.8.4-6].
        from amqtt.contexts import Action
        from amqtt.mqtt.constants import QOS_1, QOS_2

        broadcast = await self._broadcast_queue.get()
        published_qos = broadcast.get("qos")
        # One copy per client, at the highest QoS of its matching subscriptions [MQTT-3.3.5-1] (amqtt sent one
        # per matching filter; allowed, but Mosquitto sends one).
        targets: dict[str, tuple[Any, int]] = {}
        for k_filter, subscriptions in list(self._subscriptions.items()):
            if self._matches(broadcast["topic"], k_filter):
                for target_session, sub_qos in subscriptions:
                    known = targets.get(target_session.client_id)
                    targets[target_session.client_id] = (target_session, max(sub_qos, known[1] if known else 0))
        for target_session, sub_qos in targets.values():
            qos = sub_qos if published_qos is None else min(published_qos, sub_qos)
            if not await self._topic_filtering(target_session, topic=broadcast["topic"], action=Action.RECEIVE):
                continue
            if (
                target_session.transitions.state != "connected"
                and not target_session.clean_session
                and qos in (QOS_1, QOS_2)
                and not target_session.is_anonymous
            ):
                await self._retain_broadcast_message(broadcast, qos, target_session)
                continue
            if target_session.transitions.state != "connected":
                continue
            handler = self._get_handler(target_session)
            if handler:
                running_tasks.append(
                    asyncio.ensure_future(
                        handler.mqtt_publish(broadcast["topic"], broadcast["data"], qos, retain=False)
                    )
                )

    async def queue_for_absent(self: Any, broadcast: dict[str, Any], qos: int, target_session: Any) -> None:
        from amqtt.broker import RetainedApplicationMessage
        from amqtt.events import BrokerEvents

        if target_session.retained_messages.qsize() >= _limits.max_queued_messages:
            logger.warning(
                "queue of absent session %s is full (%d): message on %s dropped",
                target_session.client_id,
                _limits.max_queued_messages,
                broadcast["topic"],
            )
            return
        queued = RetainedApplicationMessage(broadcast["session"], broadcast["topic"], broadcast["data"], qos)
        await target_session.retained_messages.put(queued)
        await self.plugins_manager.fire_event(
            BrokerEvents.RETAINED_MESSAGE, client_id=target_session.client_id, retained_message=queued
        )

    async def publish_queue(self: Any, session: Any) -> None:
        # amqtt 0.12.1's Broker._publish_session_retained_messages, with RETAIN 0 [MQTT-3.3.1-9].
        handler = self._get_handler(session)
        tasks = []
        while handler and not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            tasks.append(
                asyncio.ensure_future(handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False))
            )
        if tasks:
            await asyncio.wait(tasks)

    async def deliver(self: Any, client_session: Any, handler: Any, wait_deliver: Any) -> bool:
        # amqtt 0.12.1's Broker._handle_message_delivery, with `$` topics allowed, invalid ones closing the
        # connection for real, and the message's QoS passed on.
        from amqtt.contexts import Action
        from amqtt.events import BrokerEvents

        message = wait_deliver.result()
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_RECEIVED, client_id=client_session.client_id, message=message
        )
        if message is None:
            return True
        topic = message.topic
        if not topic or "#" in topic or "+" in topic:  # [MQTT-4.7.3-1], [MQTT-3.3.2-2]: a protocol violation
            logger.warning("%s: invalid PUBLISH topic %r, closing the connection", client_session.client_id, topic)
            await handler.handle_connection_closed()  # the loop then ends the session as for a dropped socket
            return True
        if topic == "$SYS" or topic.startswith("$SYS/"):
            return True  # the broker's own; accepted and dropped, as Mosquitto does
        if not await self._topic_filtering(client_session, topic=topic, action=Action.PUBLISH):
            return True
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_BROADCAST, client_id=client_session.client_id, message=message
        )
        await self._broadcast_message(client_session, topic, message.data, message.qos)
        if message.publish_packet and message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, message.data, message.qos)
        return True

    async def subscribe(self: Any, subscription: tuple[str, int], session: Any) -> int:
        granted: int = await add_subscription(self, subscription, session)
        if granted != 0x80:  # a repeated filter replaces the old subscription, QoS included [MQTT-3.8.4-3]
            holders = self._subscriptions.get(subscription[0], [])
            for i, (holder, _qos) in enumerate(holders):
                if holder.client_id == session.client_id:
                    holders[i] = (holder, granted)
        return granted

    _mark(run_broadcast, queue_for_absent, publish_queue, deliver, subscribe)
    Broker._run_broadcast = run_broadcast  # type: ignore[method-assign]
    Broker._retain_broadcast_message = queue_for_absent  # type: ignore[method-assign]
    Broker._publish_session_retained_messages = publish_queue  # type: ignore[method-assign]
    Broker._handle_message_delivery = deliver  # type: ignore[method-assign]
    Broker.add_subscription = subscribe  # type: ignore[method-assign]
