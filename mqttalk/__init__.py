"""mqttalk: let coding-agent sessions pair and talk through any MQTT broker.

The library, as the CLI uses it (``Settings.load()`` reads flags, ``MQTTALK_*`` and the config file;
with no broker configured, :func:`create` starts the embedded one)::

    >>> import mqttalk, pathlib, tempfile
    >>> a, b = pathlib.Path(tempfile.mkdtemp()), pathlib.Path(tempfile.mkdtemp())
    >>> impl = mqttalk.create("impl", role="api", cwd=a)
    >>> tests = mqttalk.pair(impl.url.render(), "tests", cwd=b, wait=0)
    >>> sent = impl.send("tests written, all red", kind="status", data={"state": "red"})
    >>> inbox = tests.fetch(wait=10)
    >>> [(m.envelope.sender, m.envelope.kind, m.envelope.body) for m in inbox.messages]
    [('impl', 'status', 'tests written, all red')]
    >>> tests.mark_read(inbox)
    >>> mqttalk.open_channel(cwd=b).unread().messages
    []

Errors are one family, :class:`MqttalkError` (all of them in :mod:`mqttalk.errors`); each carries
the exit code and the one line the CLI prints.

The map (a module imports only from the rows below its own; ``tests/test_quality.py`` checks it):

==========================================  =============================================================
``_entry``                                   the `mqttalk` command: hands send/recv/status to a live process
                                             of the peer (:mod:`._handoff`, standard library only), else
                                             runs the CLI
``cli``, ``_mcp``, ``_hook``, ``_install``   the skins: read arguments, call the library, word the results
``_guide``, ``_demo``                        with :mod:`._render`; ``_handoff_server``: a live process runs
``_handoff_server``, ``_watch``, ``_web``    other processes' commands; ``_watch``, ``_web``: the person's
                                             peer and its page in a browser
``_render``                                  every sentence a person or agent reads, in a CLI or MCP voice
``_view``, ``_transcript``                   what a person sees (members, specs, conversation) as element
                                             trees; transcripts (md, html, json) and the page's rendering
``_api``                                     create / pair / open_channel: bindings, the embedded broker
``_channel``                                 :class:`Channel`: the one-shot operations (join, send, fetch,
                                             status, leave, history)
``_live``                                    :class:`Live`: the way in: a held session stores what arrives,
                                             keeps presence, repairs gaps
``_outbox``                                  the way out: record, window, publish, mark sent
``_peer``                                    :class:`~._peer.Peer`: who we are and where we talk; the
                                             values reported (Event, Inbox, Status)
``_store``, ``_transport``, ``_wire``,       the floor: SQLite, paho, the wire format, topic names, sealing,
``_topics``, ``_seal``, ``_url``,            join URLs, settings, file locks, directory bindings, the
``_config``, ``_locks``, ``_bindings``,      embedded broker process, input checks,
``_embedded``, ``_input``, ``_since``,
``_state``, ``_handoff``, ``_spec``          spec contracts (the fold of spec messages)
``_errors``, ``_version``, ``errors``      the ground: anyone may import them
==========================================  =============================================================

Imports are lazy (``import mqttalk`` loads nothing else), so the CLI starts fast.
"""

from __future__ import annotations

from ._version import __version__

TYPE_CHECKING = False  # (not typing's: importing typing costs every `mqttalk` start ~3 ms)

_EXPORTS = {
    "create": "._api",
    "pair": "._api",
    "open_channel": "._api",
    "Channel": "._channel",
    "Live": "._live",
    "Event": "._peer",
    "Inbox": "._peer",
    "Message": "._peer",
    "Envelope": "._wire",
    "SpecData": "._wire",
    "StatusData": "._wire",
    "Settings": "._config",
    "JoinURL": "._url",
    "MqttalkError": "._errors",
}

__all__ = [  # noqa: RUF022 - grouped as _EXPORTS is
    "create",
    "pair",
    "open_channel",
    "Channel",
    "Live",
    "Event",
    "Inbox",
    "Message",
    "Envelope",
    "SpecData",
    "StatusData",
    "Settings",
    "JoinURL",
    "MqttalkError",
    "__version__",
    "errors",
]

if TYPE_CHECKING:
    from typing import Any

    from . import errors
    from ._api import create, open_channel, pair
    from ._channel import Channel
    from ._config import Settings
    from ._errors import MqttalkError
    from ._live import Live
    from ._peer import Event, Inbox, Message
    from ._url import JoinURL
    from ._wire import Envelope, SpecData, StatusData


def __getattr__(name: str) -> Any:
    import importlib

    if name == "errors":
        value: Any = importlib.import_module(".errors", __name__)
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    else:
        raise AttributeError(f"module 'mqttalk' has no attribute {name!r}")
    globals()[name] = value
    return value
