"""A local peer in a channel: the one-shot operations (join, send, fetch, status, leave, history)
and the values they return. Composes wire, topics, transport, store, and :mod:`._live`.

Two kinds of connection:

* :class:`~._live.Live` holds this peer's persistent broker session (one process at a time, by file
  lock): it stores every message as it arrives, keeps presence, sends the outbox, reconnects if asked.
* One-shot sends use a throwaway clean session, so they never kick a live process off the broker.
"""

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
from typing import IO, TYPE_CHECKING, Any, Literal, NamedTuple

from . import __version__
from ._config import Settings
from ._errors import BrokerRefused, BrokerUnreachable, NameTaken, Queued, TimedOut

if TYPE_CHECKING:
    from ._live import Live
    from ._seal import Seal
from ._topics import Topics, check_peer
from ._url import JoinURL
from ._wire import Envelope, Presence, new_envelope, now

ANSWER_GRACE = 1.0  # s a join waits for an answer from peers that are present but show no live process
WINDOW = 100  # QoS 1 publishes a connection keeps unacknowledged at once (paho itself is told: no limit)
STALE_BEATS = 3  # an "online" presence with no heartbeat for this many intervals is shown as away
_NETWORK_ERRORS = (BrokerUnreachable, TimedOut)

EventKind = Literal["paired", "message", "gap", "offline", "dropped", "decrypt_fail", "waiting", "disconnected",
                    "reconnected", "outdated"]


@dataclass(frozen=True)
class Event:
    """Something that happened, for the caller to show as it happens."""

    kind: EventKind
    peer: str
    detail: str = ""
    envelope: Envelope | None = None
    gap: Any = None  # a _store.Gap, for "gap"


class Message(NamedTuple):
    """A received message and its place in the local store."""

    n: int
    envelope: Envelope


@dataclass
class Inbox:
    """What :meth:`Channel.fetch` found: unread messages and newly found gaps, oldest first."""

    messages: list[Message] = field(default_factory=list)
    gaps: list[Any] = field(default_factory=list)  # _store.Gap
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


class Channel:
    """One local peer (``me``) in one channel. One-shot methods open and close their own connection."""

    def __init__(self, url: JoinURL, me: str, *, member: str | None, settings: Settings, role: str | None = None,
                 joined: datetime | None = None, on_event: Callable[[Event], None] | None = None) -> None:
        """``member``: the membership this peer holds (a binding's), or None to take the one this
        machine recorded for the channel and name, claiming the name if it has none (see :attr:`member`)."""
        self.url = url
        self.me = check_peer(me)
        self._member = member
        self.role = role
        self.settings = settings
        self.joined = joined or now()
        self.on_event = on_event or (lambda _e: None)
        self.seal: Seal | None = None
        if url.key is not None:
            from ._seal import Seal

            self.seal = Seal.from_token(url.key)
        self.topics = Topics(url.prefix, url.channel, self.seal)
        self._identity: tuple[str, bytes] | None = None
        self.unanswered: list[str] = []  # after join(): peers present that have not answered our challenge
        self._meta: tuple[Any, Any] | None = None
        self._store_path: Path | None = None

    # -- one-shot operations -----------------------------------------------------------------------

    def join(self, wait: float = 0.0, *, new_member: bool = True, new_challenge: bool = True,
             check: bool = False) -> list[str]:
        """Join the channel (creates this peer's broker session); wait up to ``wait`` s for another peer
        to pair.

        Each join mints a new pairing challenge, carried in this peer's presence. Another peer is
        *paired* once its presence answers that challenge: proof that it holds the channel key now,
        which no stale, replayed or forged presence can give. Returns the peers paired;
        :attr:`unanswered` lists those present that have not answered (yet: they answer when they
        next run). ``check`` (joining a channel someone else created) first looks, over a throwaway
        connection, whether the name is taken (raises :class:`NameTaken`) and whether anyone was ever
        there (raises :class:`EmptyChannel` if not): either way nothing is joined or recorded.
        """
        if check and self._check_name(self._member):  # (before anything is recorded: a refusal leaves nothing)
            from ._errors import EmptyChannel

            raise EmptyChannel(
                f"nobody is in this channel on {self.url.broker.display()} (no presence, no roster), so nothing was "
                "joined: the join URL most likely names another broker or prefix than the one the channel was "
                "created on, or the broker lost (or someone erased) its retained messages",
                "check it against the creator's; the creator's next mqttalk command puts its presence back: pair "
                "again then")
        if new_challenge:
            self.store.nonce(self.url.channel, self.me, renew=True)
        with self.live(online=wait > 0, new_member=new_member) as live:
            live.announce("online" if wait > 0 else "joined")
            started = time.monotonic()
            deadline, told = started + wait, False
            while not live.paired_peers() and (left := deadline - time.monotonic()) > 0:
                seen = [live.presences[p] for p in live.others()]
                waited = time.monotonic() - started
                if not told and (not seen or waited > ANSWER_GRACE / 2):  # an answer usually takes ms
                    told = True
                    names = " and ".join(p.peer for p in seen)
                    self.on_event(Event("waiting", "", f"up to {wait:g}s for {names} to answer" if seen
                                        else f"up to {wait:g}s for another peer"))
                if seen and waited > ANSWER_GRACE and all(_judge(p, me=False).state != "online" for p in seen):
                    break  # those present run no mqttalk process now: nobody can answer before their next one
                live.poll(min(left, 0.1))
            self.unanswered = [p for p in live.others() if p not in live.paired]
            return live.paired_peers()

    def send(self, body: str, kind: str = "note", *, data: dict[str, Any] | None = None,
             to: str | None = None, re: str | None = None) -> Envelope:
        """Send one message: recorded in the outbox first, returned once the broker acknowledged it.

        Raises :class:`Queued` if the broker could not be reached: the message stays in the outbox
        and goes out with the next command that reaches the broker.
        """
        if to is not None:
            check_peer(to)
        self._ident()  # the name is ours (or refused) before anything is queued under it
        env = self._enqueue(body, kind, data=data, to=to, re=re)
        deadline = time.monotonic() + self.settings.connect_timeout
        while True:
            with _try_lock(self._lock_path("outbox")) as sender:
                if sender:
                    try:
                        with self._link() as link:
                            self._flush_once(link)
                            if not _held(self._lock_path("session")):
                                self._announce(link, "joined", wait_ack=False)  # refresh "last seen"
                    except _NETWORK_ERRORS as exc:
                        raise Queued(env.id, exc.message) from None
                    return env
            # Another process of this peer (a live one, or another send) owns the outbox: it sends ours.
            if self.store.is_sent(self.url.channel, self.me, env.seq):
                return env
            if time.monotonic() >= deadline:
                raise Queued(env.id, "another mqttalk process of this peer is sending and has not sent it yet")
            time.sleep(0.02)

    def fetch(self, wait: float = 0.0) -> Inbox:
        """Unread messages (and new gaps) for this peer; with ``wait``, block up to that long for one,
        or for another peer to pair (:attr:`Inbox.paired`).

        Nothing is marked read: call :meth:`mark_read` once the messages were shown.
        """
        deadline = time.monotonic() + wait
        from ._live import Live

        live = Live(self, online=wait > 0)
        try:
            live.open()
        except SessionBusy:
            # A live process of this peer holds the broker session and stores what arrives.
            got = self.unread()
            if wait > 0 and not got:
                self.on_event(Event("waiting", "", f"up to {wait:g}s for a message"))
            while not got and time.monotonic() < deadline:
                time.sleep(0.1)
                got = self.unread()
            return got
        paired: list[str] = []  # a new pairing is news too: a wait ends on it
        emit = self.on_event

        def on_event(event: Event) -> None:
            if event.kind == "paired":
                paired.append(event.peer)
            emit(event)

        self.on_event = on_event
        try:
            with live:
                live.announce("online" if wait > 0 else "joined")
                got = self.unread()
                if wait > 0 and not got and not paired:
                    self.on_event(Event("waiting", "", f"up to {wait:g}s for a message"))
                while not got and not paired and time.monotonic() < deadline:
                    if live.poll(deadline - time.monotonic()):
                        got = self.unread()
        finally:
            self.on_event = emit
        got.paired = paired
        return got

    def mark_read(self, inbox: Inbox) -> None:
        n = max((m.n for m in inbox.messages), default=0)
        gap = max((g.n for g in inbox.gaps), default=0)
        if n or gap:
            self.store.advance(self.url.channel, self.me, n, gap)

    def status(self) -> Status:
        """Who is in the channel and whether they are there, plus this peer's unread count."""
        from ._live import Live

        live = Live(self, online=False)
        try:
            live.open()
        except SessionBusy:  # a live process holds the session: read presence over a throwaway one
            live = Live(self, online=False, exclusive=False).open()
        with live:
            if live.exclusive:
                live.announce("joined")
            proto = "MQTT 5" if live.protocol == 5 else "MQTT 3.1.1"
            presences = dict(live.presences)
        nonce = self.nonce
        peers = [_judge(p, me=p.peer == self.me, paired=p.answers_for(self.me, nonce)) for p in presences.values()]
        peers.sort(key=lambda p: (not p.me, p.name))
        channel = self.url.channel
        return Status(self.url.display(), self.me, proto, peers, self.store.unread_count(channel, self.me),
                      len(self.store.new_gaps(channel, self.me)), len(self.store.pending(channel, self.me)),
                      self.url.sealed)

    def leave(self) -> None:
        """Mark this peer ``left`` and end its broker session (the broker drops its queue)."""
        if _held(self._lock_path("session")):
            from ._errors import UsageError

            raise UsageError(f"a live mqttalk process of {self.me} (listen, recv --wait) is running",
                             "stop it first, then leave")
        with self._link(client_id=self.client_id) as link:  # a clean start: the broker drops the session
            self._announce(link, "left")

    def history(self, *, peer: str | None = None, kind: str | None = None, since: str | None = None,
                limit: int | None = None) -> list[Envelope]:
        """Messages of this channel in the local store, oldest first (see :meth:`Store.history`)."""
        return list(self.store.history(self.url.channel, peer=peer, kind=kind, since=since, limit=limit))

    def live(self, *, online: bool = True, reconnect: bool = False, new_member: bool = False) -> Live:
        """A long-lived connection holding this peer's broker session (see :class:`Live`)."""
        from ._live import Live

        return Live(self, online=online, reconnect=reconnect, new_member=new_member)

    @property
    def meta(self) -> tuple[Any, Any]:
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

    @property
    def nonce(self) -> str:
        """This peer's current pairing challenge (see :meth:`join`)."""
        return str(self.store.nonce(self.url.channel, self.me))

    @property
    def store(self) -> Any:
        """The local store (see :meth:`Store.shared`: one connection per thread, shared by channels)."""
        from ._store import Store

        if self._store_path is None:  # asked for several times per message sent: keep the path
            self._store_path = self.settings.state_dir / "store.sqlite3"
        return Store.shared(self._store_path)

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
            if self._member is None and self.store.identity(channel, self.me, peek=True) is None:
                self._check_name(None)  # acting as NAME here for the first time: is NAME someone else's?
            member, secret, _ = self.store.identity(channel, self.me, self._member)
            self._identity = (member, secret)
        return self._identity

    def _check_name(self, member: str | None) -> bool:
        """Raise :class:`NameTaken` if another membership (another machine, or another state directory)
        holds this peer's name, judged over a throwaway session that touches nobody's queue. Returns
        whether the channel is empty: no presence and no roster, nobody was ever there."""
        from ._live import Live

        with Live(self, online=False, exclusive=False) as live:
            taken = live.presences.get(self.me)
            empty = not live.presences and not live.roster
        if taken is not None and taken.member != member and taken.state != "left":
            raise NameTaken(f"peer name {self.me!r} is already used in this channel by another member (another "
                            "machine, or another state directory or name binding here)", "pick another with --as NAME")
        return empty

    # -- internals ---------------------------------------------------------------------------------

    def _link(self, **options: Any) -> Any:
        """A connection to this channel's broker, with this peer's settings (timeouts, TLS, websockets)."""
        from ._transport import Link

        s = self.settings
        return Link(self.url.broker, timeout=s.connect_timeout, state_dir=s.state_dir, ca_file=s.ca_file,
                    ws_path=s.ws_path, **options)

    def _wrap(self, topic: str, data: bytes) -> bytes:
        """What goes on the wire: sealed on a sealed channel."""
        return self.seal.seal(topic, data) if self.seal else data

    def _unwrap(self, topic: str, payload: bytes) -> bytes | None:
        """The plaintext of a payload from the wire; None if it does not open with this channel's key."""
        if self.seal is None or not payload:  # an empty payload clears a retained message
            return payload
        return self.seal.open(topic, payload)

    def _lock_path(self, what: str) -> Path:
        import hashlib

        name = hashlib.sha256(f"{self.url.channel}\n{self.me}".encode()).hexdigest()[:24]
        return self.settings.state_dir / "locks" / f"{name}.{what}.lock"

    def _enqueue(self, body: str, kind: str, *, data: dict[str, Any] | None, to: str | None,
                 re: str | None) -> Envelope:
        env = new_envelope(self.me, kind, body, data=data, to=to, re=re)
        self.store.enqueue(self.url.channel, self.me, self.topics.msg(self.me), [env])
        return env

    def _flush_once(self, link: Any) -> int:
        """Publish every pending outbox message, in order, and mark each sent on its PUBACK."""
        pending = self.store.pending(self.url.channel, self.me)
        meta = self.meta[0]
        for start in range(0, len(pending), WINDOW):
            infos = [(row.n, link.publish(row.topic, self._wrap(row.topic, row.payload), wait=False, meta=meta))
                     for row in pending[start:start + WINDOW]]
            for n, info in infos:
                link.wait_published(info)
                self.store.mark_sent(n)  # one by one: a crash mid-flush leaves only the unacknowledged
        return len(pending)

    def _presence(self, state: Literal["joined", "online", "away", "left"]) -> Presence:
        at = now()
        return Presence(peer=self.me, role=self.role, state=state, member=self.member,
                        since=self.joined if state == "joined" else at, hb=at,
                        client=f"mqttalk/{__version__} {socket.gethostname()} pid {os.getpid()}",
                        every=self.settings.heartbeat if state == "online" else None,
                        seq=self.store.last_sent_seq(self.url.channel, self.me) or None,
                        nonce=self.nonce, answers=self.store.answers(self.url.channel, self.me) or None)

    def _announce(self, link: Any, state: Literal["joined", "online", "left"], *, wait_ack: bool = True) -> Presence:
        pres = self._presence(state)
        topic = self.topics.presence(self.me)
        link.publish(topic, self._wrap(topic, pres.encode()), retain=True, wait=wait_ack, meta=self.meta[1])
        return pres

    def unread(self) -> Inbox:
        """What the local store holds unread for this peer (no network): each sender's messages in its
        sequence order, and new gaps. Nothing is marked read (see :meth:`mark_read`)."""
        channel = self.url.channel
        return Inbox(_in_sender_order([Message(n, env) for n, env in self.store.unread(channel, self.me)]),
                     self.store.new_gaps(channel, self.me))


def _in_sender_order(messages: list[Message]) -> list[Message]:
    """Arrival order across senders, each sender's messages in its sequence order.

    A broker may hand a resumed session its queue and newer messages at once (amqtt does, and
    redelivers after a timeout), so arrival order can differ from the order a peer sent in. Each
    sender keeps the places its messages arrived in, filled in sequence order.
    """
    by_sender: dict[str, list[Message]] = {}
    for m in messages:
        by_sender.setdefault(m.envelope.sender, []).append(m)
    queues = {s: iter(sorted(ms, key=lambda m: (m.envelope.seq or 0, m.n))) for s, ms in by_sender.items()}
    return [next(queues[m.envelope.sender]) for m in messages]


class SessionBusy(BrokerRefused):
    """Another process of this peer holds its broker session (a live `recv --wait`, `listen`, ...)."""


class _FileLock:
    """An exclusive, non-blocking file lock held for as long as this object wants it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self) -> bool:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "w")  # noqa: SIM115 - kept open while the lock is held
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                return False
            self._fh = fh
        return True

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive file lock if it is free; yields whether we got it (never blocks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _held(path: Path) -> bool:
    """Whether some process holds the lock at ``path`` right now."""
    if not path.exists():
        return False
    with _try_lock(path) as got:
        return not got


def _stale_after(p: Presence) -> float:
    return STALE_BEATS * (p.every or 10.0)


def _judge(p: Presence, *, me: bool, paired: bool = False) -> PeerInfo:
    state = p.state
    if state == "online" and (now() - p.hb).total_seconds() > _stale_after(p):
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
