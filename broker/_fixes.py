"""Fixes for three amqtt 0.12 bugs that break mqttalk's promises. Applied by :func:`install`.

1. Lost QoS 1 messages: deliver again instead of dropping on a PUBACK timeout or a dead connection.

amqtt sends each outgoing QoS 1 message and waits 5 s for its PUBACK; on timeout it discards the
message. A subscriber that is slow to read (an agent's background `mqttalk listen` whose output
pipe is full, a stopped process) or killed mid-stream loses every message amqtt wrote to it
meanwhile (195 of 1,000 in one run of tests/test_delivery.py). MQTT requires such messages to be
delivered again; Mosquitto does.

The same happens to the messages in flight when a subscriber's connection dies (amqtt cancels their
PUBACK waiters and forgets them: 114 of 1,000 once when a reader was killed with SIGKILL).

This wraps ``ProtocolHandler._handle_qos1_message_flow``: when an outgoing message ends without its
PUBACK (timeout, cancelled waiter, failed write), the message goes back into the session's queue (persisted by
:mod:`mqttalk_broker.persistence`), and the queue is delivered again through whatever connection
the session has then — at once if it is connected, else when the client comes back. A client that
did get the message sees a duplicate, which mqttalk drops by message id.

2. Retained messages leak to clients that never subscribed to them: on every connect, amqtt sends
the client the retained messages matching *any* subscription filter held by *any* client (it loops
over all of the broker's filters "for a pre-existing session"). A snooping client thus got every
channel's presence. :func:`install` makes that delivery skip filters the session does not hold.

3. A reconnect at once (a take-over, or a connect while amqtt is still closing the old connection
of the same client id) goes wrong two ways, because both connections share one session:

- The old connection's close runs last and marks the session ``disconnected`` under the new one:
  amqtt then queues every message for it instead of sending it, until the client connects again.
- The old connection's loop still waits on the session's queue of incoming PUBLISHes, takes the
  next one the *new* connection receives (already acknowledged to its publisher) and drops it
  when it ends.

Either way a reader that reconnected at once never got its own sync marker (mqttalk's "did not
deliver the channel": about 1 run in 8 of a reader reconnecting while another peer paired), and any
other message could vanish the same way. :func:`install` makes a closed connection hand back what
it took and give the session back to the newer connection.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

_PATCHED = "_mqttalk_redelivery"
_RETRY_DELAY = 0.5  # let the broker notice a dead connection (or attach a new one) first
_PATIENCE = 60.0  # how long to keep trying; after that the client's next connect delivers the queue
_background: set[asyncio.Task[Any]] = set()
_draining: set[str] = set()
_stopped: weakref.WeakSet[Any] = weakref.WeakSet()  # protocol handlers of connections amqtt closed


def install() -> None:
    """Patch amqtt once per process."""
    _install_redelivery()
    _install_retained_filter()
    _install_take_over()


def _install_take_over() -> None:
    from amqtt.broker import Broker
    from amqtt.events import BrokerEvents
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler as Handler

    if getattr(Broker._handle_disconnect, _PATCHED, False):
        return
    start, stop, deliver_next = Handler.start, Handler.stop, Handler.mqtt_deliver_next_message
    handle_disconnect = Broker._handle_disconnect

    async def started(self: Any) -> None:
        await start(self)
        if self.session is not None and self.session.transitions.state != "connected" and self not in _stopped:
            # A take-over whose old connection finished closing while amqtt stopped it: it marked the
            # session disconnected, and the take-over (which found it connected) does not connect it.
            self.session.transitions.connect()

    async def stopped(self: Any) -> None:
        _stopped.add(self)
        await stop(self)

    async def next_incoming(self: Any) -> Any:
        if self not in _stopped:
            message = await deliver_next(self)
            if message is None or self not in _stopped:
                return message
            # Closed while it waited: the message came in on the session's newer connection. Hand it
            # back for that connection's loop to broadcast.
            self.session.delivered_message_queue.put_nowait(message)
        await asyncio.get_running_loop().create_future()  # never: this loop ends (and cancels it) soon
        return None

    async def disconnected(self: Any, session: Any, handler: Any, waiter: Any) -> None:
        await handle_disconnect(self, session, handler, waiter)
        current = self._get_handler(session)
        if current is None or current is handler or current in _stopped or session.transitions.state == "connected":
            return
        # A newer connection holds this session: it is connected. What amqtt queued for it meanwhile
        # (it thought the session offline) goes out through that connection now.
        session.transitions.connect()
        await self.plugins_manager.fire_event(BrokerEvents.CLIENT_CONNECTED, client_id=session.client_id,
                                              client_session=session)
        await self._publish_session_retained_messages(session)

    for fn in (started, stopped, next_incoming, disconnected):
        setattr(fn, _PATCHED, True)
    Handler.start = started  # type: ignore[method-assign]
    Handler.stop = stopped  # type: ignore[method-assign]
    Handler.mqtt_deliver_next_message = next_incoming  # type: ignore[method-assign]
    Broker._handle_disconnect = disconnected  # type: ignore[method-assign]


def _install_retained_filter() -> None:
    from amqtt.broker import Broker

    original = Broker._publish_retained_messages_for_subscription
    if getattr(original, _PATCHED, False):
        return

    async def publish_retained(self: Any, subscription: tuple[str, int], session: Any) -> None:
        holders = self._subscriptions.get(subscription[0], [])
        if any(holder is session for holder, _qos in holders):
            await original(self, subscription, session)

    setattr(publish_retained, _PATCHED, True)
    Broker._publish_retained_messages_for_subscription = publish_retained  # type: ignore[method-assign]


def _install_redelivery() -> None:
    from amqtt.broker import RetainedApplicationMessage
    from amqtt.errors import ProtocolHandlerError
    from amqtt.events import BrokerEvents
    from amqtt.mqtt.protocol.handler import ProtocolHandler
    from amqtt.session import OUTGOING

    original = ProtocolHandler._handle_qos1_message_flow
    if getattr(original, _PATCHED, False):
        return

    async def handle_qos1(self: Any, app_message: Any) -> None:
        try:
            await original(self, app_message)
        except (TimeoutError, asyncio.CancelledError, ProtocolHandlerError, OSError) as exc:
            # A PUBACK timeout, or the connection died with the message in flight (amqtt then cancels
            # the PUBACK waiter, or the write fails): either way the message was not acknowledged.
            session = self.session
            if app_message.direction != OUTGOING or session is None or app_message.puback_packet is not None:
                raise
            await _put_back(self, session, app_message)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _put_back(self: Any, session: Any, app_message: Any) -> None:
        queued = RetainedApplicationMessage(None, app_message.topic, app_message.data, app_message.qos)
        await session.retained_messages.put(queued)
        await self.plugins_manager.fire_event(BrokerEvents.RETAINED_MESSAGE, client_id=session.client_id,
                                              retained_message=queued)
        broker = getattr(self.plugins_manager.context, "_broker_instance", None)
        if broker is not None and session.client_id not in _draining:
            _draining.add(session.client_id)
            task = asyncio.create_task(_drain_later(broker, session))
            _background.add(task)
            task.add_done_callback(_background.discard)

    setattr(handle_qos1, _PATCHED, True)
    ProtocolHandler._handle_qos1_message_flow = handle_qos1  # type: ignore[method-assign]


async def _drain_later(broker: Any, session: Any) -> None:
    """Deliver the session's queue through its current connection while the queue is not empty.

    The session may be between connections when a message is put back (its dead one noticed, the
    new one not attached yet), and the new connection may already have taken the queue at connect:
    so wait for it to be connected, for a while, rather than give up at once.
    """
    try:
        for _ in range(int(_PATIENCE / _RETRY_DELAY)):
            await asyncio.sleep(_RETRY_DELAY)
            if session.retained_messages.empty():
                return
            if session.transitions.state == "connected":
                await broker._publish_session_retained_messages(session)
    finally:
        _draining.discard(session.client_id)
