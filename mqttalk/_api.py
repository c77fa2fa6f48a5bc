"""Library entry points: create or pair a channel, or open the one this directory is bound to."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from . import _bindings
from ._channel import Channel, Event
from ._config import Settings
from ._errors import UsageError
from ._topics import check_peer, peer_from_directory
from ._url import JoinURL, channel_id_for, check_prefix, parse_broker
from ._wire import now


def new_channel_id() -> str:
    """128 random bits, base32 (26 chars: topic- and URL-safe, no ambiguity about case)."""
    return base64.b32encode(os.urandom(16)).decode().rstrip("=").lower()


def create(
    as_: str | None = None,
    *,
    role: str | None = None,
    settings: Settings | None = None,
    cwd: Path | None = None,
    wait: float = 0.0,
    sealed: bool = True,
    on_event: Callable[[Event], None] | None = None,
) -> Channel:
    """Create a channel on the configured broker (default: the embedded one, started if needed),
    join it as ``as_``, and bind the working directory to it. ``sealed`` (the default) mints a
    channel key: see :mod:`mqttalk._seal`."""
    settings = settings or Settings.load()
    cwd = (cwd or Path.cwd()).resolve()
    name = check_peer(as_ or peer_from_directory(cwd.name))
    prefix = check_prefix(settings.prefix, UsageError)  # before a broker is started for nothing
    if settings.broker:
        address = parse_broker(settings.broker)
    else:
        from . import _embedded

        address, _ = _embedded.ensure(settings.state_dir, settings.embedded_host, settings.embedded_port)
    key = None
    if sealed:
        from ._seal import Seal

        key = Seal.new().token
    url = JoinURL(address, prefix, channel_id_for(key) if key else new_channel_id(), key)
    channel = Channel(url, name, member=os.urandom(16).hex(), role=role, settings=settings, on_event=on_event)
    channel.join(wait)
    channel.binding = _record(settings, cwd, channel)
    return channel


def pair(
    url: str | JoinURL,
    as_: str | None = None,
    *,
    role: str | None = None,
    settings: Settings | None = None,
    cwd: Path | None = None,
    wait: float = 10.0,
    on_event: Callable[[Event], None] | None = None,
) -> Channel:
    """Join the channel of a join URL as ``as_``; wait up to ``wait`` s for another peer to pair.

    Returns the channel: :attr:`Channel.paired` lists the peers that paired (empty if none did in
    time), :attr:`Channel.unanswered` those present that did not answer the pairing challenge."""
    settings = settings or Settings.load()
    cwd = (cwd or Path.cwd()).resolve()
    join_url = _wake(settings, url if isinstance(url, JoinURL) else JoinURL.parse(url))
    name = check_peer(as_ or peer_from_directory(cwd.name))
    member, joined = os.urandom(16).hex(), None
    previous = _bindings.find(settings.state_dir, cwd)
    again = bool(previous and previous.peer == name and JoinURL.parse(previous.url).channel == join_url.channel)
    if previous and again:
        member, joined = previous.member, previous.joined  # pairing again from the same place: same member
    channel = Channel(
        join_url,
        name,
        member=member,
        role=role,
        settings=settings,
        joined=datetime.fromisoformat(joined) if joined else None,
        on_event=on_event,
    )
    channel.join(wait, new_member=not again, check=True)
    channel.binding = _record(settings, cwd, channel)
    return channel


def open_channel(
    settings: Settings | None = None, cwd: Path | None = None, on_event: Callable[[Event], None] | None = None
) -> Channel:
    """The channel to act on: ``settings.channel``/``settings.peer`` (flags, environment), else the
    binding of ``cwd`` or its nearest bound ancestor (kept as :attr:`Channel.binding`). Raises
    :class:`NotBound` if there is none."""
    settings = settings or Settings.load()
    cwd = (cwd or Path.cwd()).resolve()
    binding = _bindings.find(settings.state_dir, cwd)
    if settings.channel:
        url = JoinURL.parse(settings.channel)
        names_binding = (
            binding is not None
            and JoinURL.parse(binding.url).channel == url.channel
            and settings.peer in (None, binding.peer)
        )
        if not names_binding:  # (if it does, the binding's membership is used below)
            if not settings.peer:
                raise UsageError("--channel needs --as NAME (or MQTTALK_PEER) to say which peer you are")
            check_peer(settings.peer)
            # The membership this machine recorded for the channel and name; the first command claims the
            # name (refused if another machine or state directory holds it: see Channel.member).
            _wake(settings, url)
            return Channel(url, settings.peer, member=None, settings=settings, on_event=on_event)
    binding = _bindings.require(binding)
    if binding.ca_file and settings.ca_file is None:
        settings = settings.model_copy(update={"ca_file": Path(binding.ca_file)})
    peer = binding.peer
    if settings.peer and settings.peer != binding.peer:
        raise UsageError(
            f"this directory is bound as {binding.peer!r}, not {settings.peer!r}",
            "drop --as, or give --channel URL too",
        )
    # --channel naming the bound channel: its addresses win (a cluster's nodes in another order, a node moved)
    url = _wake(settings, JoinURL.parse(settings.channel or binding.url))
    channel = Channel(
        url,
        peer,
        member=binding.member,
        role=binding.role,
        settings=settings,
        joined=datetime.fromisoformat(binding.joined) if binding.joined else None,
        on_event=on_event,
        binding=binding,
    )
    return channel


def _wake(settings: Settings, url: JoinURL) -> JoinURL:
    """A channel on the recorded embedded broker: start the broker again if it died (same port, same database)."""
    from . import _embedded

    _embedded.revive(settings.state_dir, url.broker)
    return url


def forget(channel: Channel) -> None:
    """Unbind the directory ``channel`` was opened from (nothing if it came from --channel/--as)."""
    if channel.binding is not None and channel.binding.directory:
        _bindings.forget(channel.settings.state_dir, channel.binding.directory)


def _record(settings: Settings, cwd: Path, channel: Channel) -> _bindings.Binding:
    binding = _bindings.Binding(
        url=channel.url.render(),
        peer=channel.me,
        member=channel.member,
        role=channel.role,
        joined=(channel.joined or now()).isoformat(),
        ca_file=str(settings.ca_file.resolve()) if settings.ca_file else None,
    )
    return _bindings.record(settings.state_dir, cwd, binding)
