"""`mqttalk watch`: the channel live in a browser, for the person behind the agents, who may take part.

The person is a peer of its own (``--as``, default the login name), marked ``role: person`` in presence;
it never acts as an agent (a name an agent holds here or in the channel is refused), so it has its own
membership, broker session, cursor and outbox in the same state directory: it reads the whole history
this machine's store holds, and steals nothing from the agent. A thread holds that peer's live session
(presence ``online``, messages stored as they arrive); the page (:mod:`._web`) follows the store.

The server is starlette on uvicorn (imported only by this command), on 127.0.0.1 unless told otherwise,
at a URL with a random token that a restarted watch keeps (with its port), so an open page reconnects.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import secrets
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import BrokerUnreachable, MqttalkError, NameTaken, TimedOut, UsageError
from ._view import PERSON_ROLE, Member, members_of
from ._web import TICK
from ._wire import decode_presence

if TYPE_CHECKING:
    from ._channel import Channel
    from ._config import Settings
    from ._live import Live
    from ._peer import Event


# -- the person's peer -------------------------------------------------------------------------------


MAX_CONNECTIONS = 128  # connections the page's server holds at once


def person_name(as_: str | None) -> str:
    """``--as``, else the login name made a peer name ("Ann Lee" -> "ann-lee")."""
    import getpass

    from ._topics import check_peer, peer_from_directory

    if as_ is not None:
        return check_peer(as_)
    try:
        login = getpass.getuser()
    except (OSError, KeyError):
        login = "person"
    return peer_from_directory(login)


def person_channel(settings: Settings, cwd: Path, as_: str | None) -> Channel:
    """The channel of ``--channel URL`` or of this directory's binding, as the person's own peer.

    Refused: a name this machine's agents are bound as in that channel, or one whose presence in it is an
    agent's (a person never speaks as an agent, nor takes an agent's session or read cursor)."""
    from . import _bindings
    from ._api import open_channel
    from ._url import JoinURL

    binding = _bindings.find(settings.state_dir, cwd)
    url = settings.channel or (binding.url if binding else None)
    if url is None:
        binding = _bindings.require(binding)  # raises NotBound, saying how to create or join one
        url = binding.url
    name = person_name(as_)
    cid = JoinURL.parse(url).channel
    agents = _bindings.bound_peers(settings.state_dir, cid)
    if binding is not None and JoinURL.parse(binding.url).channel == cid:
        agents.add(binding.peer)
    if binding is not None and binding.ca_file and settings.ca_file is None:
        settings = settings.model_copy(update={"ca_file": Path(binding.ca_file)})
    if name in agents:
        raise UsageError(
            f"{name!r} is an agent of this channel on this machine; a person watches as a peer of their own",
            "give another name with --as NAME",
        )
    channel = open_channel(settings.model_copy(update={"channel": url, "peer": name}), cwd)
    raw = channel.store.known_presences(cid).get(name)
    pres = decode_presence(raw) if raw else None
    if pres is not None and pres.role != PERSON_ROLE:
        raise NameTaken(f"{name!r} is an agent in this channel, not a person", "give another name with --as NAME")
    channel.role = PERSON_ROLE
    return channel


class Watcher:
    """The person's live session, in a thread: presence online, every message stored as it arrives, the
    members as their presence shows them. Ends with the person's presence ``left``."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.me = channel.me
        # Never a "new member" that starts each sender's sequence where it stands: the store may be an
        # agent's here, and that would drop what the agent has yet to receive. Like the first peer to join,
        # it asks the senders for what this store lacks, and they send it again (to the whole channel).
        self.first = channel.store.recorded_identity(channel.url.channel, channel.me) is None
        self.link_text = "connecting to the broker…"
        self.connected = False
        self._members: list[Member] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._fatal: MqttalkError | None = None
        self._thread = threading.Thread(target=self._run, name="mqttalk-watch-live", daemon=True)
        self.changed = threading.Event()  # set when something arrived: the page looks at once

    def start(self, wait: float) -> None:
        """Start; raise what makes watching impossible (the name taken, another watch of this person)."""
        self._thread.start()
        self._ready.wait(wait)
        if self._fatal is not None:
            raise self._fatal

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.channel.settings.connect_timeout * 2 + 5)

    def members(self) -> list[Member]:
        with self._lock:
            return list(self._members)

    def _on_event(self, event: Event) -> None:
        if event.kind in ("message", "gap", "paired", "offline"):
            self.changed.set()
        elif event.kind == "disconnected":
            self.link_text = "broker connection lost; reconnecting…"
            self.connected = False
        elif event.kind == "reconnected":
            self.link_text = "live"
            self.connected = True

    def _look(self, live: Live) -> None:
        snapshot = members_of(live.presences.values(), self.me)
        with self._lock:
            if snapshot != self._members:
                self._members = snapshot
                self.changed.set()

    def _run(self) -> None:
        from ._errors import SessionBusy
        from ._live import Live

        ch = self.channel
        ch.on_event = self._on_event
        backoff = 1.0
        while not self._stop.is_set():
            try:
                if self.first:
                    ch.store.nonce(ch.url.channel, ch.me, renew=True)
                with Live(ch, online=True, reconnect=True, new_member=False) as live:
                    self.first = False
                    live.announce("online")
                    self.link_text = "live"
                    self.connected = True
                    self._look(live)
                    self._ready.set()
                    backoff = 1.0
                    while not self._stop.is_set():
                        live.poll(TICK)
                        self._look(live)
                    with contextlib.suppress(BrokerUnreachable, TimedOut):
                        live.drain()
                        if live.connected:
                            live.announce("left")
                return
            except (SessionBusy, NameTaken, UsageError) as exc:
                if isinstance(exc, SessionBusy):
                    exc = SessionBusy(
                        f"another mqttalk process of {ch.me} (another `mqttalk watch`?) holds its broker session",
                        "use that one's page, or watch as another name with --as NAME",
                    )
                self._fatal = exc
                self._ready.set()
                return
            except MqttalkError as exc:
                self.link_text = f"not connected ({exc.line()}); retrying"
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one failure
                self.link_text = f"not connected ({type(exc).__name__}: {exc}); retrying"
            self._ready.set()  # (the page serves what the store holds meanwhile)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)


# -- running it -----------------------------------------------------------------------------------------


def _remembered(settings: Settings, channel: Channel) -> tuple[Path, dict[str, Any]]:
    """Where this person's watch of this channel keeps its port and token (0600), so a restarted watch
    serves the same URL and an open page reconnects and catches up."""
    from ._state import private_dir

    key = hashlib.sha256(f"{channel.url.channel}/{channel.me}".encode()).hexdigest()[:20]
    path = private_dir(settings.state_dir / "watch") / f"{key}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    return path, data if isinstance(data, dict) else {}


def _bind(host: str, port: int | None, remembered: int | None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in [port] if port is not None else [remembered, 0] if remembered else [0]:
        sock = socket.socket(family, socket.SOCK_STREAM)
        # (a restarted watch takes its port back while the last one's connections are in TIME_WAIT; two
        # listeners on one port are still refused on Linux)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate or 0))
        except OSError as exc:
            sock.close()
            if port is not None:
                raise UsageError(
                    f"cannot serve on {host}:{port}: {exc.strerror or exc}",
                    "give another --port, or none for a free one",
                ) from None
            continue
        sock.listen(64)
        sock.set_inheritable(False)
        return sock
    raise UsageError(f"cannot serve on {host}: no free port")


def loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _OneLine(logging.Formatter):
    """uvicorn's and starlette's complaints as one line each, never a traceback (MQTTALK_DEBUG shows it)."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"mqttalk watch: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f": {type(exc).__name__}: {exc}"
        return " ".join(text.split())


def _quiet_logs() -> None:
    import os

    handler = logging.StreamHandler(sys.stderr)
    if not os.environ.get("MQTTALK_DEBUG"):
        handler.setFormatter(_OneLine())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        log = logging.getLogger(name)
        log.handlers = [handler] if name == "uvicorn" else []
        log.setLevel(logging.WARNING)
    aio = logging.getLogger("asyncio")  # (accept() failing under a flood of sockets: one line, not a traceback)
    aio.handlers, aio.propagate = [handler], False
    aio.setLevel(logging.ERROR)


def _interrupted(*_: object) -> None:
    raise KeyboardInterrupt  # (SIGTERM as Ctrl-C: the person's presence is left, not away)


def serve(settings: Settings, cwd: Path, *, as_: str | None, host: str, port: int | None, open_browser: bool) -> int:
    import uvicorn

    from ._state import private_file

    channel = person_channel(settings, cwd, as_)
    if not loopback(host):
        print(
            f"mqttalk: warning: serving on {host}, not loopback: anyone who can reach it and has the URL can read "
            "this channel and write to it as you",
            file=sys.stderr,
            flush=True,
        )
    memory, saved = _remembered(settings, channel)
    token = str(saved.get("token") or secrets.token_urlsafe(24))
    sock = _bind(host, port, saved.get("port") if isinstance(saved.get("port"), int) else None)
    watcher = Watcher(channel)
    try:
        watcher.start(settings.connect_timeout * 2 + 5)
    except BaseException:
        sock.close()
        raise
    try:
        bound = sock.getsockname()[1]
        private_file(memory).write_text(json.dumps({"port": bound, "token": token}))
        if not watcher.connected:
            print(
                f"mqttalk: {watcher.link_text}: the page shows what this machine holds until the broker answers",
                file=sys.stderr,
                flush=True,
            )
        shown_host = f"[{host}]" if ":" in host else host
        url = f"http://{shown_host}:{bound}/?token={token}"
        print(f"mqttalk: WATCH {url}", flush=True)
        print(
            f"mqttalk: watching {channel.url.display()} as {channel.me} (a person); Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        if open_browser:
            import webbrowser

            threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
        from ._web import Hub, Server, build_app

        hub = Hub(watcher)
        server = Server(host.strip("[]"), bound, token)
        config = uvicorn.Config(
            build_app(server, hub),
            log_config=None,  # (ours: one line per problem, see _quiet_logs)
            access_log=False,
            timeout_graceful_shutdown=2,
            lifespan="on",
            limit_concurrency=MAX_CONNECTIONS,  # (past it: 503, not a process out of file descriptors)
            timeout_keep_alive=5,
        )
        _quiet_logs()
        # uvicorn shuts down on SIGINT and SIGTERM, then raises the signal again: ours ends as Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupted)
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        watcher.stop()
    print(f"mqttalk: STOPPED watching; {channel.me} left the channel", file=sys.stderr, flush=True)
    return 0
