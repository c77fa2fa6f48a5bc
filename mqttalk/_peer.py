"""One local peer in one channel: who it is (name, membership, secret session id), where it talks
(topics, sealing, MQTT 5 properties, its broker), what it keeps (the store, its locks), and how it
says it is there (presence). Both the one-shot :class:`~._channel.Channel` and the long-lived
:class:`~._live.Live` act for a :class:`Peer`; nothing here opens a connection by itself.

Also the values peers report to their callers: :class:`Event`, :class:`Message`, :class:`Inbox`,
:class:`PeerInfo`, :class:`Status`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from ._config import Settings
from ._locks import LockName, lock_path
from ._topics import Topics, check_peer
from ._url import JoinURL
from ._version import __version__
from ._wire import Envelope, Presence, now

if TYPE_CHECKING:
    from ._seal import Seal
    from ._store import Gap, Store
    from ._transport import Link, Meta

STALE_BEATS = 3  # an "online" presence with no heartbeat for this many intervals is shown as away

EventKind = Literal[
    "paired",
    "message",
    "gap",
    "offline",
    "dropped",
    "decrypt_fail",
    "waiting",
    "disconnected",
    "reconnected",
    "outdated",
]
PresenceState = Literal["joined", "online", "away", "left"]


@dataclass(frozen=True)
class Event:
    """Something that happened, for the caller to show as it happens (worded by :mod:`._render`)."""

    kind: EventKind
    peer: str = ""  # the peer it is about ("" for this peer's own connection and waits)
    detail: str = ""  # why, in words: offline, dropped, decrypt_fail, disconnected; what for: waiting
    role: str | None = None  # paired: the peer's role
    version: int | None = None  # outdated: the wire version the peer's presence speaks
    envelope: Envelope | None = None  # message
    gap: Gap | None = None  # gap
    broker: str = ""  # reconnected: the broker (for a cluster: the node) it is connected to again


class Message(NamedTuple):
    """A received message and its place in the local store."""

    n: int
    envelope: Envelope


@dataclass
class Inbox:
    """What :meth:`Channel.fetch` found: unread messages and newly found gaps, oldest first."""

    messages: list[Message] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    paired: list[str] = field(default_factory=list)  # peers this fetch saw pair with us (PAIRED was emitted)

    def __bool__(self) -> bool:
        return bool(self.messages or self.gaps or self.paired)


@dataclass(frozen=True)
class PeerInfo:
    name: str
    role: str | None
    state: str  # joined / online / away / left, as judged now (stale "online" -> away)
    last_seen: datetime
    since: datetime
    me: bool = False
    paired: bool = False  # its presence answers our current pairing challenge (see Channel.join)

    def liveness(self, at: datetime | None = None) -> str:
        ago = _ago(((at or now()) - self.last_seen).total_seconds())
        if self.state == "online":
            return "online"
        if self.state == "left":
            return f"left {ago} ago"
        return f"{self.state}, last seen {ago} ago"


@dataclass(frozen=True)
class Work:
    """A peer's last status: its state, when, and the spec revision it is against (see :mod:`._spec`)."""

    peer: str
    state: str
    at: datetime
    spec: str | None = None
    rev: int | None = None
    in_force: int | None = None  # the revision of ``spec`` in force now (None: none agreed)

    @property
    def outdated(self) -> bool:
        """A green against an older revision than the one in force."""
        return self.state == "green" and None not in (self.rev, self.in_force) and self.rev < self.in_force  # type: ignore[operator]

    def ago(self, at: datetime | None = None) -> str:
        return _ago(((at or now()) - self.at).total_seconds())


@dataclass
class Status:
    url: str
    me: str
    protocol: str
    peers: list[PeerInfo] = field(default_factory=list)
    unread: int = 0
    gaps: int = 0
    queued: int = 0
    sealed: bool = False
    work: list[Work] = field(default_factory=list)  # each peer's last status, newest first


class Peer:
    """One local peer (``me``) in one channel: identity, topics, sealing, presence, store, links, locks."""

    def __init__(
        self,
        url: JoinURL,
        me: str,
        *,
        member: str | None,
        settings: Settings,
        role: str | None = None,
        joined: datetime | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        """``member``: the membership this peer holds (a binding's), or None to take the one this
        machine recorded for the channel and name, claiming the name if it has none (see :attr:`member`)."""
        self.url = url
        self.me = check_peer(me)
        self._member = member
        self.role = role
        self.settings = settings
        self.joined = joined or now()
        self.on_event: Callable[[Event], None] = on_event or (lambda _e: None)
        self.seal: Seal | None = None
        if url.key is not None:
            from ._seal import Seal

            self.seal = Seal.from_token(url.key)
        self.topics = Topics(url.prefix, url.channel, self.seal)
        self._identity: tuple[str, bytes] | None = None
        self._meta: tuple[Meta, Meta] | None = None
        self._store_path: Path | None = None

    @property
    def store(self) -> Store:
        """The local store (see :meth:`Store.shared`: one connection per thread, shared by channels)."""
        from ._store import Store

        if self._store_path is None:  # asked for several times per message sent: keep the path
            self._store_path = self.settings.state_dir / "store.sqlite3"
        return Store.shared(self._store_path)

    @property
    def nonce(self) -> str:
        """This peer's current pairing challenge (see :meth:`Channel.join`)."""
        return str(self.store.nonce(self.url.channel, self.me))

    @property
    def member(self) -> str:
        """The random id of this peer's membership (in its presence: tells a namesake from ourselves).
        Acting as a name for the first time on this machine (``member=None``) claims it: refused with
        :class:`NameTaken` if another membership holds it."""
        return self._ident()[0]

    @property
    def client_id(self) -> str:
        """This peer's broker session: derived from a secret only this machine holds (see :meth:`Topics.client_id`)."""
        return self.topics.client_id(self.me, self._ident()[1])

    def _ident(self) -> tuple[str, bytes]:
        if self._identity is None:
            channel = self.url.channel
            if self._member is None and self.store.recorded_identity(channel, self.me) is None:
                self._before_claim()
            self._identity = self.store.identity(channel, self.me, self._member)
        return self._identity

    def _before_claim(self) -> None:
        """Called once before this machine first acts as :attr:`me` without a membership of its own: the
        place to check that nobody else holds the name (a :class:`Channel` looks at the broker)."""

    @property
    def meta(self) -> tuple[Meta, Meta]:
        """MQTT 5 properties of (messages, presence): a content type (plain JSON, or sealed bytes), the
        wire version as a user property, and on presence an expiry, so a broker drops the retained
        presence of a channel nobody uses any more."""
        if self._meta is None:
            from ._transport import SESSION_EXPIRY, Meta
            from ._wire import WIRE_VERSION

            user = (("mqttalk", str(WIRE_VERSION)),)
            content = ("application/octet-stream", False) if self.seal else ("application/json", True)
            self._meta = (Meta(*content, user=user), Meta(*content, expiry=SESSION_EXPIRY + 24 * 3600, user=user))
        return self._meta

    def link(self, **options: Any) -> Link:
        """A connection to this channel's broker, with this peer's settings (timeouts, TLS, websockets);
        ``options`` as :class:`~._transport.Link` takes them (client id, persistence, will, receiver)."""
        from ._transport import Link

        s = self.settings
        return Link(
            self.url.broker,
            timeout=s.connect_timeout,
            state_dir=s.state_dir,
            ca_file=s.ca_file,
            ws_path=s.ws_path,
            **options,
        )

    def wrap(self, topic: str, data: bytes) -> bytes:
        """What goes on the wire: sealed on a sealed channel."""
        return self.seal.seal(topic, data) if self.seal else data

    def unwrap(self, topic: str, payload: bytes) -> bytes | None:
        """The plaintext of a payload from the wire; None if it does not open with this channel's key."""
        if self.seal is None or not payload:  # an empty payload clears a retained message
            return payload
        return self.seal.open(topic, payload)

    def lock_path(self, what: LockName) -> Path:
        return lock_path(self.settings.state_dir, self.url.channel, self.me, what)

    def presence(self, state: PresenceState) -> Presence:
        """This peer's presence now: who, how reachable, how many messages it sent, its pairing challenge
        and its answers to the others'."""
        at = now()
        return Presence(
            peer=self.me,
            role=self.role,
            state=state,
            member=self.member,
            since=self.joined if state == "joined" else at,
            hb=at,
            client=f"mqttalk/{__version__} {socket.gethostname()} pid {os.getpid()}",
            every=self.settings.heartbeat if state == "online" else None,
            seq=self.store.last_sent_seq(self.url.channel, self.me) or None,
            nonce=self.nonce,
            answers=self.store.answers(self.url.channel, self.me) or None,
        )

    def announce(self, link: Link, state: Literal["joined", "online", "left"], *, wait_ack: bool = True) -> Presence:
        """Publish this peer's presence (retained) over ``link``."""
        pres = self.presence(state)
        topic = self.topics.presence(self.me)
        link.publish(topic, self.wrap(topic, pres.encode()), retain=True, wait=wait_ack, meta=self.meta[1])
        return pres


def stale_after(p: Presence) -> float:
    """Seconds after its last heartbeat that an ``online`` presence is shown as away."""
    return STALE_BEATS * (p.every or 10.0)


def judge(p: Presence, *, me: bool, paired: bool = False) -> PeerInfo:
    """A presence as it stands now: an ``online`` one whose heartbeat stopped is ``away``."""
    state = p.state
    if state == "online" and (now() - p.hb).total_seconds() > stale_after(p):
        state = "away"  # its will never fired (a broker that does not enforce keepalive, a stalled process)
    return PeerInfo(p.peer, p.role, state, p.hb, p.since, me, paired)


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 90:
        return f"{s}s"
    if s < 5400:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"
