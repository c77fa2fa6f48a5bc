"""amqtt patches that make the embedded broker keep what it acknowledged. Applied by :func:`install`.

amqtt 0.12 sends a publisher its PUBACK as soon as it has read the PUBLISH, then hands the message
to an in-memory queue, an in-memory broadcast queue, and one in-memory publish task per subscriber:
a SIGTERM or a crash in between lost every message acknowledged but not yet delivered (issue 13,
case 2: 3,996 of 5,000). With the journal of :mod:`mqttalk_broker.persistence` (present when the
broker has a database), these patches:

* hold a publisher's QoS 1 PUBACK until its message has been fanned out and the journal rows for
  every persistent session it went to are committed (commits are batched, one per loop turn);
* write a session's row when the message is queued for it while it is absent
  (``_retain_broadcast_message``) or handed to its connection (``mqtt_publish``, not for retained
  messages sent on subscribe: the retained store keeps those);
* delete the row when the session acknowledges the message (PUBACK, or PUBCOMP for QoS 2).

And one that is not about the journal but keeps SIGTERM a clean stop: a connection's reader task
could swallow the cancel that stops it (Python 3.11's ``asyncio.wait_for`` returns the packet it
just read instead of raising when the cancel and the data come in the same loop turn, and amqtt
reads each packet inside ``wait_for``). Its ``stop()`` then waited forever, and so did the broker's
shutdown: seen with a reader PUBACKing a stream when SIGTERM came (30 s, then a SIGKILL). ``stop()``
now cancels the reader task again until it ends.

They wrap whatever amqtt methods are in place, so :func:`install` runs *after*
:mod:`mqttalk_broker._fixes` and :mod:`mqttalk_broker._conformance` (which replace some of the same
methods whole); serve() calls it last. Without a journal (``--memory``) every wrapper passes through.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

_PATCHED = "_mqttalk_durable"
_ACK = "_mqttalk_ack"  # key of a broadcast dict: the future its publisher's PUBACK waits on
# While amqtt handles an incoming message: [its payload, the future its PUBACK waits on, broadcast yet]
_delivering: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("_mqttalk_delivering", default=None)


def _journal(broker: Any) -> Any:
    return getattr(broker, "_mqttalk_journal", None)


def _journal_of_handler(handler: Any) -> Any:
    context = getattr(handler.plugins_manager, "context", None)
    return _journal(getattr(context, "_broker_instance", None))


def _persistent(session: Any) -> bool:
    return session is not None and session.clean_session is False and not session.is_anonymous


def install() -> None:
    """Patch amqtt once per process, over the patches already in place."""
    from amqtt.broker import Broker
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

    if getattr(Broker._run_broadcast, _PATCHED, False):
        return
    _patch_handler(BrokerProtocolHandler)
    _patch_broker(Broker)


def _patch_handler(handler_class: Any) -> None:
    from amqtt.mqtt.puback import PubackPacket
    from amqtt.session import INCOMING

    qos1_flow, publish, stop = handler_class._handle_qos1_message_flow, handler_class.mqtt_publish, handler_class.stop
    on_puback, on_pubcomp = handler_class.handle_puback, handler_class.handle_pubcomp

    async def handle_qos1(self: Any, app_message: Any) -> None:
        journal = _journal_of_handler(self) if app_message.direction == INCOMING else None
        if journal is None or self.session is None or app_message.puback_packet is not None:
            await qos1_flow(self, app_message)
            return
        # amqtt's incoming QoS 1 flow, with the PUBACK held until the journal has the message.
        acknowledged = journal.incoming(app_message)
        try:
            await self.session.delivered_message_queue.put(app_message)
            await acknowledged
        finally:
            journal.take_incoming(app_message)
        puback = PubackPacket.build(app_message.packet_id)
        await self._send_packet(puback)
        app_message.puback_packet = puback

    async def mqtt_publish(
        self: Any, topic: str, data: Any, qos: int | None, retain: bool, ack_timeout: int | None = None
    ) -> Any:
        # Runs (up to its first await) before the publisher's PUBACK is released: see run_broadcast.
        journal = _journal_of_handler(self)
        session = self.session
        if (
            journal is not None
            and qos in (1, 2)
            and not retain
            and _persistent(session)
            and not journal.holds(session.client_id, topic, data)
        ):
            journal.record(session.client_id, topic, data, qos)
        return await publish(self, topic, data, qos, retain, ack_timeout)

    def acknowledged_by_client(original: Any) -> Any:
        async def handle(self: Any, packet: Any) -> None:
            session = self.session
            message = session.inflight_out.get(packet.packet_id) if session is not None else None
            await original(self, packet)
            journal = _journal_of_handler(self) if message is not None else None
            if journal is not None:
                journal.delivered(session.client_id, message.topic, message.data)

        return handle

    async def stopped(self: Any) -> None:
        reader = self._reader_task
        stopping = asyncio.ensure_future(stop(self))
        while not stopping.done():
            try:
                await asyncio.wait({stopping}, timeout=0.5)
            except asyncio.CancelledError:
                stopping.cancel()
                raise
            if reader is not None and reader is not asyncio.current_task() and not reader.done():
                reader.cancel()  # it swallowed the first cancel (see the module docstring)
        stopping.result()

    puback, pubcomp = acknowledged_by_client(on_puback), acknowledged_by_client(on_pubcomp)
    for fn in (handle_qos1, mqtt_publish, puback, pubcomp, stopped):
        setattr(fn, _PATCHED, True)
    handler_class._handle_qos1_message_flow = handle_qos1
    handler_class.mqtt_publish = mqtt_publish
    handler_class.handle_puback = puback
    handler_class.handle_pubcomp = pubcomp
    handler_class.stop = stopped


def _patch_broker(broker_class: Any) -> None:
    handle_delivery, run_one = broker_class._handle_message_delivery, broker_class._run_broadcast
    queue_for_absent = broker_class._retain_broadcast_message

    async def handle_message_delivery(self: Any, client_session: Any, handler: Any, wait_deliver: Any) -> bool:
        journal = _journal(self)
        if journal is None or wait_deliver.cancelled() or wait_deliver.exception() is not None:
            return bool(await handle_delivery(self, client_session, handler, wait_deliver))
        app_message = wait_deliver.result()
        acknowledged = journal.take_incoming(app_message) if app_message is not None else None
        delivering = [app_message.data, acknowledged, False] if acknowledged is not None else None
        token = _delivering.set(delivering)
        try:
            return bool(await handle_delivery(self, client_session, handler, wait_deliver))
        finally:
            _delivering.reset(token)
            if delivering is not None and not delivering[2]:
                journal.after_commit(acknowledged)  # not broadcast (a refused topic): nothing to keep

    async def broadcast_message(
        self: Any, session: Any, topic: str | None, data: Any, force_qos: int | None = None
    ) -> None:
        # amqtt 0.12.1's Broker._broadcast_message, with the PUBACK future of the message it broadcasts.
        broadcast: dict[str, Any] = {"session": session, "topic": topic, "data": data}
        if force_qos is not None:
            broadcast["qos"] = force_qos
        delivering = _delivering.get()
        if delivering is not None and delivering[0] is data and not delivering[2]:
            delivering[2] = True
            broadcast[_ACK] = delivering[1]
        await self._broadcast_queue.put(broadcast)

    async def run_broadcast(self: Any, running_tasks: Any) -> None:
        journal = _journal(self)
        if journal is None:
            await run_one(self, running_tasks)
            return
        # The wrapped method takes one broadcast from the queue (nothing else takes from it while it runs).
        queue, taken = self._broadcast_queue, []
        get = queue.get

        async def take() -> Any:
            taken.append(await get())
            return taken[-1]

        queue.get = take
        try:
            await run_one(self, running_tasks)
        finally:
            del queue.get
        loop = asyncio.get_running_loop()
        for broadcast in taken:
            if broadcast.get(_ACK) is not None:
                # After the publish tasks just created have run up to their first await (each writes its
                # session's row then): tasks and callbacks start in the order they were scheduled.
                loop.call_soon(journal.after_commit, broadcast[_ACK])

    async def retain_broadcast_message(self: Any, broadcast: dict[str, Any], qos: int, target_session: Any) -> None:
        journal = _journal(self)
        before = target_session.retained_messages.qsize()
        await queue_for_absent(self, broadcast, qos, target_session)
        if (
            journal is not None
            and target_session.retained_messages.qsize() > before
            and not journal.holds(target_session.client_id, broadcast["topic"], broadcast["data"])
        ):
            journal.record(target_session.client_id, broadcast["topic"], broadcast["data"], qos)

    for fn in (handle_message_delivery, broadcast_message, run_broadcast, retain_broadcast_message):
        setattr(fn, _PATCHED, True)
    broker_class._handle_message_delivery = handle_message_delivery
    broker_class._broadcast_message = broadcast_message
    broker_class._run_broadcast = run_broadcast
    broker_class._retain_broadcast_message = retain_broadcast_message
