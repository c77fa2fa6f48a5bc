"""A live connection: holds one peer's persistent broker session for as long as a process wants it.

Used by one-shot reads (for the seconds they run) and by long-lived processes (`listen`, waits, a
program using the library). It stores every message as it arrives (acknowledging each to the broker
only once stored), tracks presence and sequence gaps, keeps presence ``online`` with a heartbeat,
sends the outbox (its own and what other processes of the peer queued), and reconnects with backoff.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from datetime import UTC
from typing import TYPE_CHECKING, Any, Literal

from . import _handoff  # HANDOFF hook: serve commands of this peer (see _handoff)
from ._channel import _NETWORK_ERRORS, WINDOW, Event, SessionBusy, _FileLock, _judge, _stale_after
from ._errors import BrokerRefused, BrokerUnreachable, Queued, TimedOut
from ._topics import check_peer
from ._wire import (
    WIRE_VERSION,
    Envelope,
    Presence,
    RepairNote,
    decode_envelope,
    decode_note,
    decode_presence,
    decode_roster,
    encode_roster,
    in_window,
    new_envelope,
    now,
)

if TYPE_CHECKING:
    from ._channel import Channel

BACKOFF_MAX = 30.0  # longest wait between reconnect attempts
OUTBOX_POLL = 0.2  # how often a live process looks for messages other processes queued
SYNC_AGAIN = 0.25  # s without the sync marker and with nothing arriving: send another (see _sync)
REPAIR_EVERY = 2.0  # s: a sender answers one repair note of a peer at most this often
REPAIR_MAX = 5000  # messages sent again for one note at most (the reader asks again for the rest)
MAX_PEERS = 256  # peers a reader takes presence from, beyond those in the roster (see _crowded)
MAX_EXACT = 64  # presence topics a connect subscribes to by name at most (see _connect)
GROUP = 100  # messages sent with wait=False are recorded in the outbox this many at a time


class Live:
    """A connection that holds this peer's persistent broker session.

    While open it stores every message as it arrives (acknowledging each to the broker only once
    stored), tracks presence and sequence gaps, keeps this peer's presence ``online`` with a
    heartbeat (``online=True``; a retained Last Will marks it ``away`` if the connection dies), and
    sends the outbox, including messages other processes of this peer queued. With ``reconnect`` it
    rides out broker outages with backoff; otherwise a lost connection raises.

    ``exclusive=False`` reads presence only, over a throwaway session (for a process that cannot
    hold the session because a live one does).
    """

    def __init__(self, channel: Channel, *, online: bool = True, reconnect: bool = False,
                 new_member: bool = False, exclusive: bool = True) -> None:
        self.channel = channel
        self.online = online
        self.reconnect = reconnect
        self.new_member = new_member
        self.exclusive = exclusive
        self.presences: dict[str, Presence] = {}
        self.protocol = 0
        self._session_lock = _FileLock(channel._lock_path("session"))
        self._outbox_lock = _FileLock(channel._lock_path("outbox"))
        self._link: Any = None
        self._tokens: set[bytes] = set()
        self._dropped: set[tuple[str, int]] = set()
        self.dropped = 0  # payloads dropped (malformed, stale, or not opening with the key)
        self._handled = 0  # messages and presence updates taken in since poll() started
        self._synced = False
        self._announced: Literal["joined", "online", "left"] | None = None
        self._next_beat = 0.0
        self._next_outbox = 0.0
        self._backoff = 0.5
        self._retry_at = 0.0
        self._inflight: deque[tuple[int, Any]] = deque()  # (outbox row, paho message info), in order
        self._handed = 0  # highest outbox row taken from the store for the current connection
        self._queued: deque[Any] = deque()  # taken from the store, waiting for room in the window
        self._batch: list[Envelope] = []  # sent with wait=False, not yet recorded in the outbox
        self._sent_more = False  # sent messages since our presence last said how many
        self._gap_mark = 0
        self._offline: set[str] = set()
        self.paired: set[str] = set()  # peers whose presence answers our current challenge
        self._nonce = ""
        self._answer_due = False  # a peer's challenge we have not answered in our presence yet
        self._roster: set[str] | None = None  # member names from the channel's retained roster
        self._roster_due = False  # the retained roster left us out: publish it again with us in it
        self._stale: dict[str, tuple[str, bytes]] = {}  # peer -> an older presence met while syncing (topic, payload)
        self._fresh: set[str] = set()  # peers whose presence met while syncing was their newest
        self._known: set[str] = set()  # member names this machine has seen a presence of (see _member)
        self._levels: tuple[tuple[int, int], set[str]] | None = None  # topic levels of the peers known (_crowded)
        self._held: list[tuple[Envelope, bytes, Any]] = []  # messages from a sender not known yet (while syncing)
        self._asks: dict[str, RepairNote] = {}  # the newest repair note each peer wrote to us
        self._gone: dict[str, list[tuple[int, int]]] = {}  # per peer: what it asked us for that we no longer have
        self._noted: dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {}  # what our notes said
        self._outdated: set[str] = set()  # peers told to be running another wire version
        self._answer_at: dict[str, float] = {}  # peer -> when its newest note may be answered (see _answer)
        self._budget_at = 0.0  # no note is answered before this (monotonic): REPAIR_MAX were just sent again
        self._budget_used = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def open(self) -> Live:
        """Connect (a :class:`Live` used in a ``with`` block opens itself)."""
        if self._link is not None:
            return self
        ch = self.channel
        self._known = set(ch.store.known_presences(ch.url.channel))
        if self.exclusive and not self._session_lock.acquire():
            raise SessionBusy("another mqttalk process of this peer holds its broker session",
                              "stop it, or let it receive: `mqttalk recv` reads what it stores")
        self._gap_mark = max((g.n for g in ch.store.new_gaps(ch.url.channel, ch.me)), default=0)
        self._nonce = ch.nonce
        try:
            self._connect()
        except BaseException:
            self._release()
            raise
        return self

    def __enter__(self) -> Live:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Leave presence ``joined`` (if it was ``online``, or to tell what we sent), disconnect
        cleanly, release the locks."""
        try:
            if self._batch:
                self._record_batch()  # recorded even if it cannot go out now: sent later
            if self._link is not None and self.exclusive and (self._announced == "online" or self._sent_more
                                                              or self._inflight):
                with contextlib.suppress(*_NETWORK_ERRORS):
                    self.drain()
                    self.announce("joined")
        finally:
            _handoff.stop(self)  # HANDOFF hook: stop serving before the session lock goes
            if self._link is not None:
                self._link.close()
                self._link = None
            self._release()

    def _release(self) -> None:
        self._outbox_lock.release()
        self._session_lock.release()

    @property
    def roster(self) -> set[str]:
        """Member names from the channel's retained roster (empty if there is none)."""
        return set(self._roster or ())

    @property
    def connected(self) -> bool:
        return self._link is not None

    def others(self) -> list[str]:
        """Peers present in the channel (by their presence, which may be stale: see :meth:`paired_peers`)."""
        return sorted(p for p, pres in self.presences.items() if p != self.channel.me and pres.state != "left")

    def paired_peers(self) -> list[str]:
        """Peers that answered this peer's current pairing challenge (and have not left since)."""
        return sorted(p for p in self.paired if p in self.presences and self.presences[p].state != "left")

    # -- operations --------------------------------------------------------------------------------

    def announce(self, state: Literal["joined", "online", "left"]) -> None:
        """Publish this peer's presence (``online`` also starts the heartbeat). It carries the highest
        sequence number sent, so readers can tell when the last messages never reached them."""
        self.presences[self.channel.me] = self.channel._announce(self._live_link(), state)
        self._announced = state
        self._sent_more = False
        self._answer_due = False
        self._next_beat = time.monotonic() + self.channel.settings.heartbeat

    def send(self, body: str, kind: str = "note", *, data: dict[str, Any] | None = None,
             to: str | None = None, re: str | None = None, wait: bool = True) -> Envelope:
        """Send over this connection; with ``wait``, return once the broker acknowledged it.

        ``wait=False`` is for throughput: messages are recorded in the outbox in groups (one SQLite
        transaction per group, so a group's ``env.seq`` is filled in when it is recorded) and each
        group is recorded before it is published. :meth:`drain`, :meth:`poll` and leaving the
        ``with`` block record and send what is left.
        """
        if to is not None:
            check_peer(to)
        env = new_envelope(self.channel.me, kind, body, data=data, to=to, re=re)
        self._batch.append(env)
        if wait or len(self._batch) >= GROUP:
            self._record_batch()
            self._publish_pending()
            if not wait and self._link is not None:
                try:  # take in the acknowledgements that came meanwhile: keeps the in-flight window moving
                    self._link.pump(0)
                    self._collect_acks()
                except _NETWORK_ERRORS as exc:
                    self._lost(exc)
        if wait:
            if self._link is None or not self._outbox_lock.held:
                raise Queued(env.id, "not connected to the broker" if self._link is None
                             else "another mqttalk process of this peer is sending")
            self.drain()
            if not self.channel.store.is_sent(self.channel.url.channel, self.channel.me, env.seq):
                raise Queued(env.id, "the broker did not acknowledge it")
        return env

    def _record_batch(self) -> None:
        """Write the messages sent with wait=False to the outbox, in one transaction. If the write fails
        (a full disk), every one of them stays in the batch for the next write and the error is raised:
        none is lost, none half-written."""
        ch = self.channel
        ch.store.enqueue(ch.url.channel, ch.me, ch.topics.msg(ch.me), self._batch)
        self._batch = []

    def drain(self, timeout: float | None = None) -> None:
        """Wait until everything handed to the network was acknowledged (``timeout`` 0: send what is
        pending and take in the acknowledgements already there, without waiting)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.channel.settings.connect_timeout)
        if self._batch:
            self._record_batch()
            self._publish_pending()
        while (self._inflight or self._queued) and self._link is not None:
            left = deadline - time.monotonic()
            try:
                self._link.pump(max(0.0, min(left, 0.05)))
            except _NETWORK_ERRORS as exc:
                self._lost(exc)
                return
            self._collect_acks()
            if left <= 0:
                return

    def poll(self, timeout: float) -> int:
        """Run for up to ``timeout`` s: receive, heartbeat, send queued messages, reconnect.

        Returns how many messages and presence updates it took in (it returns early once there
        are some), so callers re-check what they wait for.
        """
        deadline = time.monotonic() + timeout
        self._handled = 0
        while True:
            now_ = time.monotonic()
            if self._link is None:
                if not self.reconnect:
                    raise BrokerUnreachable(f"lost the connection to {self.channel.url.broker.display()}")
                if now_ >= self._retry_at:
                    self._try_reconnect()
                    continue
                _handoff.nap(self, max(0.0, min(deadline, self._retry_at) - now_))  # HANDOFF hook (was time.sleep)
            else:
                try:
                    self._link.pump(max(0.0, min(deadline, self._next_beat, self._next_outbox) - now_),
                                    wake=_handoff.wake_fd(self))  # HANDOFF hook: wake up for a command
                    self._collect_acks()
                    self._routine()
                except _NETWORK_ERRORS as exc:
                    self._lost(exc)
            _handoff.serve(self)  # HANDOFF hook: run the commands other processes of this peer handed over
            if self._handled or time.monotonic() >= deadline:
                got, self._handled = self._handled, 0
                return got

    # -- internals ---------------------------------------------------------------------------------

    def _connect(self) -> None:
        from ._transport import Will

        ch = self.channel
        will_topic = ch.topics.presence(ch.me)
        will = Will(will_topic, ch._wrap(will_topic, ch._presence("away").encode())) if self.online else None
        link: Any = None
        link = ch._link(client_id=ch.client_id if self.exclusive else None, persistent=self.exclusive, will=will,
                        on_messages=lambda batch: self._absorb(link, batch))
        link.open()
        try:
            self._synced = False
            self._stale.clear()
            self._fresh.clear()
            topics = [ch.topics.all_presence, ch.topics.roster, ch.topics.sync(link.client_id)]
            if self.exclusive:
                topics += [ch.topics.all_msg, ch.topics.repairs_for(ch.me)]
            link.subscribe(topics, no_local=frozenset({ch.topics.all_msg}))
            self._sync(link)
            # A broker that sends no retained message to a wildcard subscription (RabbitMQ) left out the
            # presence of members we know by name (from the roster, or seen before on this machine):
            # subscribe to those exactly, which every broker answers with the retained presence. (Those
            # we only met in stale copies from our queue too: the retained one tells a replay from them.)
            known = ch.store.known_presences(ch.url.channel)
            # (At most MAX_EXACT of them, roster names first: a flood of fake presences must not make
            # every connect subscribe to thousands of topics.)
            # Our own name included: a name check (Channel._check_name) must see who holds it.
            roster = sorted((self._roster or set()) - self._fresh)
            missing = (roster + sorted(set(known) - self._fresh - set(roster)))[:MAX_EXACT]
            if missing:
                link.subscribe([ch.topics.presence(peer) for peer in missing])
                self._sync(link)
            for peer, raw in known.items():  # still unheard of: the newest presence this machine saw
                pres = decode_presence(raw, at=now())
                if pres is not None and peer not in self.presences and (
                        len(self.presences) < MAX_PEERS or peer in (self._roster or ())):
                    self.presences[peer] = pres
            if self.exclusive and (self._roster_due or ch.me not in (self._roster or set())):  # later joiners find us
                self._publish_roster(link)
        except BaseException:
            link.close()
            raise
        self._link, self.protocol = link, link.protocol
        self._synced = True
        self._after_sync()
        if self._announced is not None:  # a reconnect: say again who we are
            self.announce("online" if self._announced == "online" else "joined")
        if self.exclusive:
            self._publish_pending()

    def _sync(self, link: Any) -> None:
        """Send ourselves a marker and wait for it: then everything the broker had for us is in.

        A broker whose queue for this client overflows (Mosquitto keeps 1,000 by default: a flood of
        retained presence fills it) drops the marker: after a quiet SYNC_AGAIN another one is sent."""
        ch = self.channel
        topic = ch.topics.sync(link.client_id)
        tokens: set[bytes] = set()
        # The backlog may be long: the wait runs out only after a quiet connect_timeout.
        deadline = time.monotonic() + ch.settings.connect_timeout
        again = 0.0  # when to send another marker: after SYNC_AGAIN with nothing arriving
        while True:
            if time.monotonic() >= again:
                token = os.urandom(16).hex().encode()
                tokens.add(token)
                link.publish(topic, ch._wrap(topic, token))  # (its wait for the PUBACK may take it in)
                again = time.monotonic() + SYNC_AGAIN
            if tokens & self._tokens:
                return
            if time.monotonic() >= deadline:
                raise TimedOut(f"broker at {ch.url.broker.display()} did not deliver the channel "
                               f"within {ch.settings.connect_timeout:g}s")
            if link.pump(max(0.0, min(deadline, again) - time.monotonic())):
                deadline = time.monotonic() + ch.settings.connect_timeout
                again = time.monotonic() + SYNC_AGAIN

    def _after_sync(self) -> None:
        """The backlog is in: report replayed presence; compare what each peer says it sent with what arrived."""
        ch = self.channel
        # A session's queue holds the presence updates published while it was away, older than the
        # retained presence it also gets: stale copies the broker hands over in any order, no replay. A
        # replay is when nothing newer came: the retained presence itself was put back to an old one.
        for peer, (topic, payload) in self._stale.items():
            if peer not in self._fresh:
                self._replayed(peer, topic, payload)
        self._stale.clear()
        if not self.exclusive:
            return
        held, self._held = self._held, []
        if held:  # the backlog is in: a sender still unknown never joined the channel
            self._store([(env, data) for env, data, _ in held if self._member(env.sender)])
            for env, _, item in held:
                if not self._member(env.sender):
                    self._drop(item.topic, item.payload, "dropped", f"message from {env.sender}, who never joined")
        for peer, pres in self.presences.items():
            if peer == ch.me or not pres.seq:
                continue
            if self.new_member:
                ch.store.start_head(ch.url.channel, peer, pres.seq)
            else:
                ch.store.expect(ch.url.channel, peer, pres.seq)
        if self.new_member:  # what this machine stored before we joined is not ours to read
            self.new_member = False
            ch.store.advance(ch.url.channel, ch.me, *ch.store.marks(ch.url.channel))
            self._gap_mark = ch.store.marks(ch.url.channel)[1]
        for note in list(self._asks.values()):
            self._answer(note)
        self._write_notes(every=True)
        self._report_gaps()

    def _report_gaps(self) -> None:
        ch = self.channel
        ch.store.settle_gaps(ch.url.channel, timeout=ch.settings.repair_timeout)
        for gap in ch.store.new_gaps(ch.url.channel, ch.me):
            if gap.n > self._gap_mark:
                self._gap_mark = gap.n
                self.channel.on_event(Event("gap", gap.sender, f"{gap.first}-{gap.last}", gap=gap))

    # -- repair: a reader asks the sender for what never arrived; the sender sends it again ----------

    def _answer(self, note: RepairNote) -> None:
        """``note.sender`` wrote to us: mark what it says is gone, and send again what it misses (once per
        version of its note), or tell it which of those we no longer have."""
        ch = self.channel
        peer = note.sender
        if note.gone:
            ch.store.settle_gaps(ch.url.channel, timeout=ch.settings.repair_timeout, sender=peer,
                                 gone=list(note.gone))
        if not note.want or not self._member(peer):
            return  # only members are answered (a stranger's made-up names would each cost a resend)
        mono = time.monotonic()
        if mono < self._budget_at:  # what this process sends again is bounded across all askers
            self._answer_at[peer] = self._budget_at
            return
        fresh = ch.store.answer_once(ch.url.channel, peer, ch.me, note.ts.isoformat(), every=REPAIR_EVERY)
        if fresh is None:  # answered another note of peer's moments ago: this one in a while (_routine)
            self._answer_at[peer] = mono + REPAIR_EVERY
            return
        self._answer_at.pop(peer, None)
        if not fresh:
            return
        rows, gone = ch.store.sent_rows(ch.url.channel, ch.me, _merged(note.want), limit=REPAIR_MAX)
        self._budget_used += len(rows)
        if self._budget_used >= REPAIR_MAX:
            self._budget_at, self._budget_used = mono + REPAIR_EVERY, 0
        if rows:
            self._queued.extend(rows)  # the original payloads and ids: a reader that has one ignores it
            self._hand()
        gone = gone[-64:]
        if gone != self._gone.get(peer, []):
            self._gone[peer] = gone
            self._write_notes(only=peer)

    def _write_notes(self, *, only: str | None = None, every: bool = False) -> None:
        """Publish our note to each peer whose want or gone changed (``every``: to each with something
        to say, as on a new connection, whose requests may have been lost with the broker's state)."""
        ch, link = self.channel, self._link
        if link is None or not self.exclusive:
            return
        wants = ch.store.open_gaps(ch.url.channel)
        for peer in sorted((set(wants) | set(self._gone) | set(self._noted)) - {ch.me}):
            if only is not None and peer != only:
                continue
            said = (wants.get(peer, [])[:64], self._gone.get(peer, []))
            if said == self._noted.get(peer, ([], [])) and not (every and (said[0] or said[1])):
                continue
            self._noted[peer] = said
            topic = ch.topics.repair(peer, ch.me)
            note = RepairNote(sender=ch.me, to=peer, ts=now(), want=said[0], gone=said[1])
            payload = ch._wrap(topic, note.encode()) if said[0] or said[1] else b""
            link.publish(topic, payload, retain=True, wait=False)

    def _absorb(self, link: Any, incoming: list[Any]) -> None:
        """Store messages (one transaction per batch), track presence, announce pairings; then ack
        each, so a crash before the commit makes the broker deliver them again."""
        ch = self.channel
        messages: list[tuple[Envelope, bytes, Any]] = []
        notes: list[RepairNote] = []
        mine = ch.topics.level(ch.me)
        at = now()
        with ch.store.transaction():  # one commit for the batch's presence, gaps and messages
            self._take(incoming, mine, at, messages, notes)
            # A sender must be a member, known by its presence (taken in first: it may be in this batch).
            held = {id(item) for env, _, item in messages if not self._member(env.sender)}
            if held and not self._synced:  # its presence may still be in the backlog: decide once it is in
                self._held += [m for m in messages if id(m[2]) in held]
            elif held:
                for env, _, item in messages:
                    if id(item) in held:
                        self._drop(item.topic, item.payload, "dropped",
                                   f"message from {env.sender}, who never joined")
                held = set()
            self._store([(env, data) for env, data, item in messages if id(item) not in held])
        # Held ones are acknowledged too: a broker may hold back its SUBACK behind an unacknowledged
        # message (amqtt does), and the sync waits for that. Were this process to die before they are
        # stored, the sender's sequence shows the hole and repair brings them back.
        with link.burst():
            for item in incoming:
                link.ack(item)
        for note in notes:
            self._asks[note.sender] = note
            if self._synced:
                self._answer(note)
        if self._synced:
            self._write_notes()  # a message filled a hole, or a presence showed one
            self._report_gaps()

    def _take(self, incoming: list[Any], mine: str, at: Any, messages: list[tuple[Envelope, bytes, Any]],
              notes: list[RepairNote]) -> None:
        """Sort a batch: presence and roster taken in at once, messages and repair notes collected, the
        rest dropped (and reported once)."""
        ch = self.channel
        for item in incoming:
            if item.topic == ch.topics.roster:
                opened = ch._unwrap(item.topic, item.payload)
                if opened:
                    names = decode_roster(opened)
                    self._roster = (self._roster or set()) | names
                    # Two members joining at once each publish the roster they read plus themselves: the
                    # later one wins. The one left out puts itself (and all it knows) back, in _routine.
                    self._roster_due = self.exclusive and ch.me not in names
                continue
            where = ch.topics.split(item.topic)
            section, level = where if where else ("", "")
            if section == "msg" and level == mine:
                continue  # our own message, echoed by the broker: already in our history since we sent it
            if section.startswith("repair:"):
                if section != "repair:" + mine or not item.payload:
                    continue  # a note to another peer (or one cleared)
                section = "repair"
            elif section not in ("msg", "presence", "sync"):
                continue
            if section == "presence" and item.payload and self._crowded(level):
                self._drop(item.topic, b"", "dropped", f"presence of a peer past the first {MAX_PEERS} of the "
                           "channel (a flood of made-up peers?)")
                continue
            data = ch._unwrap(item.topic, item.payload)
            if data is None:
                self._drop(item.topic, item.payload, "decrypt_fail",
                           f"payload on {item.topic} does not open with this channel's key")
            elif section == "msg":
                env = decode_envelope(data)
                if env is None or ch.topics.level(env.sender) != level:
                    self._drop(item.topic, item.payload, "dropped", f"malformed message on {item.topic}")
                elif not in_window(env.ts, at):
                    self._drop(item.topic, item.payload, "dropped",
                               f"message {env.id} from {env.sender} has a stale or future timestamp")
                else:
                    messages.append((env, data, item))
            elif section == "presence":
                self._handled += 1
                self._see_presence(item.topic, level, data, at)
            elif section == "repair":
                note = decode_note(data, at=at)
                if note is None or ch.topics.level(note.sender) != level or note.to != ch.me:
                    self._drop(item.topic, item.payload, "dropped", f"malformed repair note on {item.topic}")
                else:
                    notes.append(note)
            else:
                self._tokens.add(data)

    def _crowded(self, level: str) -> bool:
        """Whether a presence at topic level ``level`` comes from a peer past the first MAX_PEERS this
        reader knows, and not in the roster either: it is dropped before it costs a decryption, a
        decode and a write (10,000 made-up peers arrive on every connect as retained messages)."""
        if len(self.presences) < MAX_PEERS:
            return False
        sizes = (len(self.presences), len(self._roster or ()))
        if self._levels is None or self._levels[0] != sizes:
            names = set(self.presences) | set(self._roster or ())
            self._levels = (sizes, {self.channel.topics.level(n) for n in names})
        return level not in self._levels[1]

    def _member(self, peer: str) -> bool:
        return peer in self.presences or peer in self._known or peer in (self._roster or ())

    def _store(self, messages: list[tuple[Envelope, bytes]]) -> int:
        ch = self.channel
        new = ch.store.add_many(ch.url.channel, messages)
        for env in new:
            self._handled += 1
            if env.sender != ch.me:
                ch.on_event(Event("message", env.sender, envelope=env))
        return len(new)

    def _see_presence(self, topic: str, level: str, payload: bytes, at: Any) -> None:
        ch = self.channel
        if not payload:  # retained presence cleared
            for name in [p for p in self.presences if ch.topics.level(p) == level]:
                del self.presences[name]
            return
        pres = decode_presence(payload, at=at)
        if pres is None or ch.topics.level(pres.peer) != level:
            self._drop(topic, payload, "dropped", f"malformed presence (or one stamped outside the time window) "
                       f"on {topic}")
            return
        peer = pres.peer
        self._known.add(peer)
        if pres.v != WIRE_VERSION and peer != ch.me and peer not in self._outdated:
            self._outdated.add(peer)
            ch.on_event(Event("outdated", peer, f"{pres.v}"))
        # Ordered by the heartbeat it claims, but never later than now: a presence stamped minutes ahead
        # (inside the clock-skew window) must not make the genuine ones after it look older.
        hb = min(pres.hb, at).astimezone(UTC).isoformat(timespec="microseconds")
        # A peer's Last Will ("away") carries the heartbeat of when it connected, older than the ones it
        # sent since: it is never a replay. Any other presence older than one seen is.
        newest = None if pres.state == "away" else ch.store.newest_presence(ch.url.channel, peer, hb, payload)
        if newest is not None:
            if self._synced:
                self._replayed(peer, topic, payload)
            else:
                self._stale.setdefault(peer, (topic, payload))  # judged once the backlog is in (_after_sync)
            known = decode_presence(newest)
            if known is not None:
                self.presences[peer] = known  # what we know to be newer stands
            return
        self.presences[peer] = pres
        self._fresh.add(peer)
        if peer == ch.me:
            return
        if not self.exclusive:
            return  # a look over a throwaway session (a name check, status beside a live process): no more
        if pres.state in ("left", "away"):
            if pres.state == "left":
                ch.store.forget_paired(ch.url.channel, ch.me, peer)
                self.paired.discard(peer)
            if peer not in self._offline and self._synced:
                self._offline.add(peer)
                ch.on_event(Event("offline", peer, pres.state))
            return
        self._offline.discard(peer)
        if pres.nonce and ch.store.see_nonce(ch.url.channel, peer, pres.nonce):
            self._answer_due = True  # our presence answers it at the next chance (see _routine)
        # Present is not paired: only a presence answering our current challenge proves the peer holds
        # the key now. A stale, replayed or forged presence never yields PAIRED.
        if pres.answers_for(ch.me, self._nonce):
            self.paired.add(peer)
            if ch.store.mark_paired(ch.url.channel, ch.me, peer):
                ch.on_event(Event("paired", peer, pres.role or ""))
        if self._synced and pres.seq:
            ch.store.expect(ch.url.channel, peer, pres.seq)

    def _replayed(self, peer: str, topic: str, payload: bytes) -> None:
        self._drop(topic, payload, "dropped", f"an old presence of {peer} was replayed on {topic}")

    def _drop(self, topic: str, payload: bytes, kind: Literal["dropped", "decrypt_fail"], why: str) -> None:
        """Report a payload we cannot use, once per process (a retained one comes back on every subscribe).
        It is acknowledged and forgotten: never shown, never stored."""
        key = (topic, hash(payload))
        if key not in self._dropped:
            self._dropped.add(key)
            self.dropped += 1
            self.channel.on_event(Event(kind, "", why))

    def _routine(self) -> None:
        """Heartbeat, stale peers, repair notes due, and messages other processes of this peer left in the outbox."""
        mono = time.monotonic()
        for peer, due in list(self._answer_at.items()):
            if mono >= due and peer in self._asks:
                self._answer(self._asks[peer])
        if self._roster_due and self._link is not None:
            self._publish_roster(self._link)
        if self._answer_due and self._announced is not None and self.exclusive:
            self.announce(self._announced)  # answer new challenges at once: the peer may be waiting on it
        if mono >= self._next_beat:
            if self._announced == "online" or (self._sent_more and not self._inflight):
                self.announce(self._announced or "joined")
            self._next_beat = mono + self.channel.settings.heartbeat
            for peer, pres in self.presences.items():
                if _judge(pres, me=False).state == "away" and pres.state == "online" \
                        and peer != self.channel.me and peer not in self._offline:
                    self._offline.add(peer)
                    self.channel.on_event(Event("offline", peer, f"no heartbeat for {_stale_after(pres):g}s"))
        if mono >= self._next_outbox:
            self._next_outbox = mono + OUTBOX_POLL
            if self._batch:
                self._record_batch()
            self._publish_pending()

    def _publish_roster(self, link: Any) -> None:
        ch = self.channel
        self._roster = (self._roster or set()) | {ch.me}
        self._roster_due = False
        link.publish(ch.topics.roster, ch._wrap(ch.topics.roster, encode_roster(self._roster)), retain=True)

    def _publish_pending(self) -> None:
        """Hand pending outbox messages to the network (if this process is the peer's sender)."""
        ch = self.channel
        if self._link is None or not self.exclusive or not self._outbox_lock.acquire():
            return
        pending = ch.store.pending(ch.url.channel, ch.me, after=self._handed)
        if pending:
            self._queued.extend(pending)
            self._handed = max(row.n for row in pending)
        self._hand()

    def _hand(self) -> None:
        """Publish queued rows while the window has room (mqttalk keeps its own window: paho's walks
        every message it holds on each PUBACK)."""
        if self._link is None:
            return
        ch, queued, inflight = self.channel, self._queued, self._inflight
        meta = ch.meta[0]
        if not queued or len(inflight) >= WINDOW:
            return
        with self._link.burst():
            while queued and len(inflight) < WINDOW:
                row = queued.popleft()
                inflight.append((row.n, self._link.publish(row.topic, ch._wrap(row.topic, row.payload), wait=False,
                                                           meta=meta)))

    def _collect_acks(self) -> None:
        done = []
        while self._inflight and self._inflight[0][1].is_published():
            done.append(self._inflight.popleft()[0])
        if done:
            self.channel.store.mark_sent(*done)
            self._sent_more = True
            if self._queued:
                self._hand()

    def _live_link(self) -> Any:
        if self._link is None:
            raise BrokerUnreachable(f"not connected to {self.channel.url.broker.display()}")
        return self._link

    def _lost(self, exc: Exception) -> None:
        if self._link is not None:
            self._link.close()
        self._link = None
        self._inflight.clear()  # unacknowledged: still pending in the outbox, sent again on reconnect
        self._queued.clear()
        self._handed = 0
        self._backoff = 0.5
        self._retry_at = time.monotonic() + self._backoff
        self.channel.on_event(Event("disconnected", "", str(exc)))
        if not self.reconnect:
            raise exc

    def _try_reconnect(self) -> None:
        try:
            self._connect()
        except (*_NETWORK_ERRORS, BrokerRefused):
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            self._retry_at = time.monotonic() + self._backoff
            return
        self._backoff = 0.5
        self.channel.on_event(Event("reconnected", "", self.channel.url.broker.display()))


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sequence ranges sorted and merged: overlapping ones would send the same messages again, once each."""
    out: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out
