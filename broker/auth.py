"""Authentication for the embedded broker."""

from __future__ import annotations

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session


class QueueingAuthPlugin(BaseAuthPlugin):
    """Admit every client on the loopback broker, and never mark a session anonymous.

    amqtt's ``AnonymousAuthPlugin`` flags sessions anonymous, and amqtt then refuses to queue QoS 1
    messages for them while they are offline, which would lose every message sent to a peer whose
    process is not running. The embedded broker listens on 127.0.0.1 only by default.
    """

    async def authenticate(self, *, session: Session) -> bool:
        session.is_anonymous = False
        return True
