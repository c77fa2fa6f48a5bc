"""Fixes for amqtt 0.12 bugs that break mqttalk's promises. Applied by :func:`install`.

1. (Superseded.) Lost QoS 1 messages: amqtt waited 5 s for a PUBACK and then discarded the message,
and forgot the messages in flight when a subscriber's connection died (195 of 1,000 lost in one run of
tests/test_delivery.py; 114 of 1,000 once when a reader was killed with SIGKILL). This module used to
put such messages back in the session's offline queue; :mod:`mqttalk_broker._conformance` (patch 3)
now keeps them in flight until acknowledged and resends them as MQTT requires (same packet id, DUP
set) when the client is back, which also covers QoS 2 and PUBREL.

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

4. A connect can die of another client's SUBSCRIBE: the loop of fix 2 awaits inside a ``for`` over the
broker's dict of filters, so a client subscribing meanwhile changes the dict under it ("dictionary
changed size during iteration" in the broker's log; the connecting client sees its connection lost,
or a peer that "did not answer the pairing challenge"). It showed up about once in two runs of the
test suite with four workers. :func:`install` makes that dict iterate over a snapshot of its keys.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

_PATCHED = "_mqttalk_redelivery"
_stopped: weakref.WeakSet[Any] = weakref.WeakSet()  # protocol handlers of connections amqtt closed


def install() -> None:
    """Patch amqtt once per process."""
    _install_retained_filter()
    _install_take_over()
    _install_subscription_snapshot()


class _SnapshotDict(dict):  # type: ignore[type-arg]
    """A dict whose iteration walks a copy of its keys: a loop that awaits may see it change meanwhile."""

    def __iter__(self) -> Any:
        return iter(list(dict.keys(self)))


def _install_subscription_snapshot() -> None:
    from amqtt.broker import Broker

    init = Broker.__init__
    if getattr(init, _PATCHED, False):
        return

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._subscriptions = _SnapshotDict(self._subscriptions)

    setattr(patched, _PATCHED, True)
    Broker.__init__ = patched  # type: ignore[method-assign]


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
        if self.sessions.get(session.client_id, (None, None))[0] is not session:
            return  # the newer connection started a new session (a clean start): this one is over
        # A newer connection holds this session: it is connected. What amqtt queued for it meanwhile
        # (it thought the session offline) goes out through that connection now.
        session.transitions.connect()
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=session.client_id, client_session=session
        )
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
