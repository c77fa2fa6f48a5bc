"""mqttalk: let coding-agent sessions pair and talk through any MQTT broker.

The public API (imported lazily, so ``import mqttalk`` stays cheap for the CLI)::

    from mqttalk import Channel, JoinURL, Settings, Envelope, MqttalkError
    ch = mqttalk.create(as_="impl")              # or mqttalk.pair(url, as_="tests")
    ch.send("tests written, all red", kind="status", data={"state": "red"})
    for m in ch.fetch(wait=30): print(m.envelope.body)
"""

from __future__ import annotations

TYPE_CHECKING = False  # (not typing's: importing typing costs every `mqttalk` start ~3 ms)

__version__ = "0.2.0"

_EXPORTS = {
    "Channel": "._channel",
    "Event": "._channel",
    "Message": "._channel",
    "PeerInfo": "._channel",
    "Status": "._channel",
    "create": "._api",
    "pair": "._api",
    "open_channel": "._api",
    "Settings": "._config",
    "JoinURL": "._url",
    "BrokerAddress": "._url",
    "Envelope": "._wire",
    "Presence": "._wire",
    "SpecData": "._wire",
    "StatusData": "._wire",
    "KINDS": "._wire",
    "MqttalkError": "._errors",
    "UsageError": "._errors",
    "BadJoinURL": "._errors",
    "BadMessage": "._errors",
    "NameTaken": "._errors",
    "EmptyChannel": "._errors",
    "NotBound": "._errors",
    "BrokerUnreachable": "._errors",
    "BrokerRefused": "._errors",
    "TimedOut": "._errors",
    "Queued": "._errors",
    "Inbox": "._channel",
    "Live": "._live",
}

__all__ = [  # noqa: RUF022 - grouped as _EXPORTS is
    "Channel", "Event", "Message", "PeerInfo", "Status", "create", "pair", "open_channel", "Settings",
    "JoinURL", "BrokerAddress", "Envelope", "Presence", "SpecData", "StatusData", "KINDS", "MqttalkError",
    "UsageError", "BadJoinURL", "BadMessage", "NameTaken", "EmptyChannel", "NotBound", "BrokerUnreachable",
    "BrokerRefused", "TimedOut", "Queued", "Inbox", "Live",
]

if TYPE_CHECKING:
    from typing import Any

    from ._api import create, open_channel, pair
    from ._channel import Channel, Event, Inbox, Message, PeerInfo, Status
    from ._config import Settings
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
        TimedOut,
        UsageError,
    )
    from ._live import Live
    from ._url import BrokerAddress, JoinURL
    from ._wire import KINDS, Envelope, Presence, SpecData, StatusData


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mqttalk' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
