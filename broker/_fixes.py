"""Fixes for two amqtt 0.12 bugs that break mqttalk's promises. Applied by :func:`install`.

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
"""

from __future__ import annotations

import asyncio
from typing import Any

_PATCHED = "_mqttalk_redelivery"
_RETRY_DELAY = 0.5  # let the broker notice a dead connection (or attach a new one) first
_PATIENCE = 60.0  # how long to keep trying; after that the client's next connect delivers the queue
_background: set[asyncio.Task[Any]] = set()
_draining: set[str] = set()


def install() -> None:
    """Patch amqtt once per process."""
    _install_redelivery()
    _install_retained_filter()


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
