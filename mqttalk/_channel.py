"""A local peer in a channel: pairing, presence, send and receive. Composes wire, topics, transport, store."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal

from ._config import Settings
from ._errors import NameTaken
from ._topics import Topics, check_peer
from ._url import JoinURL
from ._wire import Envelope, Presence, decode_envelope, decode_presence, new_envelope, now

HEARTBEAT = 10.0  # seconds between presence refreshes while a process is live
STALE_AFTER = 3 * HEARTBEAT  # an "online" presence older than this is shown as away
VERSION = "0.1.0"


@dataclass(frozen=True)
class Event:
    """Something that happened while talking to the broker, for the caller to show."""

    kind: Literal["paired", "dropped", "waiting"]
    peer: str
    detail: str = ""


@dataclass(frozen=True)
class Message:
    """A received message and its place in the local store."""

    n: int
    envelope: Envelope


@dataclass(frozen=True)
class PeerInfo:
    name: str
    role: str | None
    state: str  # joined / online / away / left, as judged now (stale "online" -> away)
    last_seen: datetime
    since: datetime
    me: bool = False

    def liveness(self, at: datetime | None = None) -> str:
        ago = _ago(((at or now()) - self.last_seen).total_seconds())
        if self.state == "online":
            return "online"
        if self.state == "left":
            return f"left {ago} ago"
        return f"{self.state}, last seen {ago} ago"


@dataclass
class Status:
    url: str
    me: str
    protocol: str
    peers: list[PeerInfo] = field(default_factory=list)
    unread: int = 0


class Channel:
    """One local peer (``me``) in one channel. Every method opens and closes its own connection."""

    def __init__(self, url: JoinURL, me: str, *, member: str, settings: Settings, role: str | None = None,
                 joined: datetime | None = None, on_event: Callable[[Event], None] | None = None) -> None:
        self.url = url
        self.me = check_peer(me)
        self.member = member
        self.role = role
        self.settings = settings
        self.joined = joined or now()
        self.on_event = on_event or (lambda _e: None)
        self.topics = Topics(url.prefix, url.channel)
        self.client_id = self.topics.client_id(me)
        self._store: Any = None
        self._presences: dict[str, Presence] = {}
        self._new = False  # a new message was stored since the flag was cleared
        self._tokens: set[bytes] = set()  # sync markers that came back
        self._dropped: set[tuple[str, int]] = set()  # (topic, hash) of bad payloads already reported

    # -- public operations -------------------------------------------------------------------------

    def join(self, wait: float = 0.0) -> list[str]:
        """Join the channel (creates this peer's broker session); wait up to ``wait`` s for another peer.

        Returns the other peers present. Raises :class:`NameTaken` if a live namesake is there.
        """
        with self._hold() as held, self._session(online=wait > 0, exclusive=held) as link:
            taken = self._presences.get(self.me)
            if taken and taken.member != self.member and taken.state != "left":
                raise NameTaken(f"peer name {self.me!r} is already used in this channel",
                                "pick another with --as NAME")
            self._publish_presence(link, "online" if wait > 0 else "joined")
            deadline = time.monotonic() + wait
            next_beat = time.monotonic() + HEARTBEAT
            if wait > 0 and not self._others():
                self.on_event(Event("waiting", "", f"up to {wait:g}s for another peer"))
            while not self._others() and time.monotonic() < deadline:
                link.pump(min(deadline, next_beat) - time.monotonic())
                if time.monotonic() >= next_beat:
                    self._publish_presence(link, "online", wait_ack=False)
                    next_beat += HEARTBEAT
            if wait > 0:
                self._publish_presence(link, "joined")
            return self._others()

    def send(self, body: str, kind: str = "note", *, data: dict[str, Any] | None = None,
             to: str | None = None, re: str | None = None) -> Envelope:
        """Publish one message at QoS 1; returns once the broker acknowledged it."""
        if to is not None:
            check_peer(to)
        env = new_envelope(self.me, kind, body, data=data, to=to, re=re)
        from ._transport import Link

        with Link(self.url.broker, timeout=self.settings.connect_timeout, state_dir=self.settings.state_dir) as link:
            info = link.publish(self.topics.msg(self.me), env.encode(), wait=False)
            if not self._held_elsewhere():
                # refresh "last seen" (not while our own live process owns presence)
                self._publish_presence(link, "joined", wait_ack=False)
            link.wait_published(info)
        return env

    def fetch(self, wait: float = 0.0) -> list[Message]:
        """Unread messages for this peer, in arrival order; with ``wait``, block up to that long for one.

        The read cursor does not move: call :meth:`mark_read` once the messages were shown.
        """
        deadline = time.monotonic() + wait
        with self._hold() as held:
            if not held:
                # Another process of this peer holds the broker session and stores what arrives.
                if wait > 0 and not self._unread():
                    self.on_event(Event("waiting", "", f"up to {wait:g}s for a message"))
                while True:
                    got = self._unread()
                    if got or time.monotonic() >= deadline:
                        return got
                    time.sleep(0.2)
            with self._session(online=wait > 0, exclusive=True) as link:
                if wait > 0:
                    self._publish_presence(link, "online")
                got = self._unread()
                next_beat = time.monotonic() + HEARTBEAT
                if wait > 0 and not got:
                    self.on_event(Event("waiting", "", f"up to {wait:g}s for a message"))
                while not got and time.monotonic() < deadline:
                    self._new = False
                    link.pump(min(deadline, next_beat) - time.monotonic())
                    if self._new:
                        got = self._unread()
                    if time.monotonic() >= next_beat:
                        self._publish_presence(link, "online", wait_ack=False)
                        next_beat += HEARTBEAT
                self._publish_presence(link, "joined")
                return got

    def mark_read(self, messages: list[Message]) -> None:
        if messages:
            self.store.advance(self.url.channel, self.me, max(m.n for m in messages))

    def status(self) -> Status:
        """Who is in the channel and whether they are there, plus this peer's unread count."""
        with self._hold() as held, self._session(online=False, exclusive=held) as link:
            if held:
                self._publish_presence(link, "joined")
            proto = "MQTT 5" if link.protocol == 5 else "MQTT 3.1.1"
        peers = [_judge(p, me=p.peer == self.me) for p in self._presences.values()]
        peers.sort(key=lambda p: (not p.me, p.name))
        return Status(self.url.display(), self.me, proto, peers, self.store.unread_count(self.url.channel, self.me))

    def leave(self) -> None:
        """Mark this peer ``left`` and end its broker session (the broker drops its queue)."""
        from ._transport import Link

        with Link(self.url.broker, client_id=self.client_id, persistent=False,
                  timeout=self.settings.connect_timeout, state_dir=self.settings.state_dir) as link:
            self._publish_presence(link, "left")

    @property
    def store(self) -> Any:
        if self._store is None:
            from ._store import Store

            self._store = Store(self.settings.state_dir / "store.sqlite3")
        return self._store

    # -- internals ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _hold(self) -> Iterator[bool]:
        """Try to become the one process that holds this peer's broker session.

        Two connections with one client id would kick each other off the broker, so only the holder
        connects with the session; others read the store (which the holder keeps current).
        """
        lock_dir = self.settings.state_dir / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{self.client_id}.lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True

    def _held_elsewhere(self) -> bool:
        path = self.settings.state_dir / "locks" / f"{self.client_id}.lock"
        if not path.exists():
            return False
        with open(path, "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False

    @contextlib.contextmanager
    def _session(self, *, online: bool, exclusive: bool) -> Iterator[Any]:
        """A connection, synced: subscriptions in place and the broker's backlog stored.

        ``exclusive``: use this peer's persistent session (queued messages arrive); otherwise a
        throwaway clean session that only reads presence.
        """
        from ._transport import Link, Will

        will = None
        if online:
            will = Will(self.topics.presence(self.me), self._presence("away").encode())
        link = Link(self.url.broker, client_id=self.client_id if exclusive else None, persistent=exclusive,
                    timeout=self.settings.connect_timeout, will=will, state_dir=self.settings.state_dir)
        link.on_messages = lambda batch: self._absorb(link, batch)
        with link:
            topics = [self.topics.all_presence, self.topics.sync(link.client_id)]
            if exclusive:
                topics.append(self.topics.all_msg)
            link.subscribe(topics)
            token = os.urandom(16).hex().encode()
            link.publish(self.topics.sync(link.client_id), token)
            deadline = time.monotonic() + self.settings.connect_timeout
            while token not in self._tokens:
                if time.monotonic() >= deadline:
                    from ._errors import TimedOut

                    raise TimedOut(f"broker at {self.url.broker.display()} did not deliver the channel "
                                   f"within {self.settings.connect_timeout:g}s")
                link.pump(deadline - time.monotonic())
            yield link

    def _absorb(self, link: Any, incoming: list[Any]) -> None:
        """Store messages, track presence, announce pairings; ack each once it is taken care of."""
        for item in incoming:
            where = self.topics.split(item.topic)
            section, peer = where if where else ("", "")
            if section == "msg":
                env = decode_envelope(item.payload)
                if env is None or env.sender != peer:
                    self._drop(item.topic, item.payload, peer, f"malformed message on {item.topic}")
                elif self.store.add(self.url.channel, env, item.payload):
                    self._new = True
            elif section == "presence":
                self._see_presence(item.topic, peer, item.payload)
            elif section == "sync":
                self._tokens.add(item.payload)
            link.ack(item)

    def _drop(self, topic: str, payload: bytes, peer: str, why: str) -> None:
        """Report a payload we cannot use, once per process (a retained one comes back on every subscribe)."""
        key = (topic, hash(payload))
        if key not in self._dropped:
            self._dropped.add(key)
            self.on_event(Event("dropped", peer, why))

    def _see_presence(self, topic: str, peer: str, payload: bytes) -> None:
        if not payload:  # retained presence cleared
            self._presences.pop(peer, None)
            return
        pres = decode_presence(payload)
        if pres is None or pres.peer != peer:
            self._drop(topic, payload, peer, f"malformed presence on {topic}")
            return
        self._presences[peer] = pres
        if peer == self.me:
            return
        if pres.state == "left":
            self.store.forget_paired(self.url.channel, self.me, peer)
        elif self.store.mark_paired(self.url.channel, self.me, peer):
            self.on_event(Event("paired", peer, pres.role or ""))

    def _others(self) -> list[str]:
        return sorted(p for p, pres in self._presences.items() if p != self.me and pres.state != "left")

    def _presence(self, state: Literal["joined", "online", "away", "left"]) -> Presence:
        at = now()
        return Presence(peer=self.me, role=self.role, state=state, member=self.member,
                        since=self.joined if state == "joined" else at, hb=at,
                        client=f"mqttalk/{VERSION} {socket.gethostname()} pid {os.getpid()}")

    def _publish_presence(self, link: Any, state: Literal["joined", "online", "left"], *,
                          wait_ack: bool = True) -> None:
        pres = self._presence(state)
        self._presences[self.me] = pres
        link.publish(self.topics.presence(self.me), pres.encode(), retain=True, wait=wait_ack)

    def _unread(self) -> list[Message]:
        return [Message(n, env) for n, env in self.store.unread(self.url.channel, self.me)]


def _judge(p: Presence, *, me: bool) -> PeerInfo:
    state = p.state
    if state == "online" and (now() - p.hb).total_seconds() > STALE_AFTER:
        state = "away"  # its will never fired (e.g. amqtt does not enforce keepalive)
    return PeerInfo(p.peer, p.role, state, p.hb, p.since, me)


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 90:
        return f"{s}s"
    if s < 5400:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def read_body(text: str | None, file: Path | None, stdin: IO[str]) -> str:
    """The message text: an argument, ``-`` for stdin, or a file (read untouched)."""
    if file is not None:
        from ._errors import UsageError

        try:
            return file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read message file {file}: {exc}") from None
    if text == "-":
        return stdin.read()
    return text or ""
