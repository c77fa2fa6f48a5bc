"""mqttalk's exceptions, one family: each knows its exit code and renders as the one line the CLI prints.

Catch :class:`MqttalkError` for all of them; :class:`Queued` means the message is safe in the outbox
and goes out with the next command that reaches the broker.
"""

from ._errors import (
    BadJoinURL,
    BadMessage,
    BrokerRefused,
    BrokerUnreachable,
    EmptyChannel,
    MqttalkError,
    NameTaken,
    NotBound,
    Queued,
    SessionBusy,
    StoreError,
    TimedOut,
    UsageError,
)

__all__ = [
    "BadJoinURL",
    "BadMessage",
    "BrokerRefused",
    "BrokerUnreachable",
    "EmptyChannel",
    "MqttalkError",
    "NameTaken",
    "NotBound",
    "Queued",
    "SessionBusy",
    "StoreError",
    "TimedOut",
    "UsageError",
]
