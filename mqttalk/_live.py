"""A live connection: holds one peer's persistent broker session for as long as a process wants it.

Used by one-shot reads (for the seconds they run) and by long-lived processes (`listen`, waits, a
program using the library). It stores every message as it arrives (acknowledging each to the broker
only once stored), tracks presence and sequence gaps, keeps presence ``online`` with a heartbeat,
sends the outbox (its own and what other processes of the peer queued), and reconnects with backoff.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ._errors import BrokerRefused, BrokerUnreachable, Queued, SessionBusy, TimedOut
from ._locks import FileLock
from ._outbox import Outbox
from ._peer import Event, Peer, judge, stale_after
from ._topics import check_peer
from ._wire import (
    WIRE_VERSION,
    Envelope,
    Presence,
    RepairNote,
    decode_contract,
    decode_envelope,
    decode_note,
    decode_presence,
    decode_roster,
    encode_contract,
    encode_roster,
    in_window,
    new_envelope,
    now,
)

if TYPE_CHECKING:
    from ._transport import Incoming, Link

BACKOFF_MAX = 30.0  # longest wait between reconnect attempts
OUTBOX_POLL = 0.2  # how often a live process looks for messages other processes queued
SYNC_AGAIN = 0.25  # s without the sync marker and with nothing arriving: send another (see _sync)
REPAIR_EVERY = 2.0  # s: a sender answers one repair note of a peer at most this often
REPAIR_MAX = 5000  # messages sent again for one note at most (the reader asks again for the rest)
MAX_PEERS = 256  # peers a reader takes presence from, beyond those in the roster (see _crowded)
MAX_EXACT = 64  # presence topics a connect subscribes to by name at most (see _connect)
MAX_SPEC_EXACT = 16  # spec contract topics a connect subscribes to by name at most (see _connect)
_NETWORK_ERRORS = (BrokerUnreachable, TimedOut)


class Service(Protocol):
    """Work a live process does beside its connection, woken by a descriptor of its own (the hand-off of
    other processes' commands: see :mod:`._handoff_server`). :meth:`serve` runs in :meth:`Live.poll`'s
    thread, the one that owns the connection and the store."""

    def fileno(self) -> int: ...
    def serve(self) -> None: ...
    def close(self) -> None: ...


ServiceStart = Callable[["Live"], Service | None]  # given the open Live; None: not here (then nothing runs)


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

    def __init__(
        self,
        peer: Peer,
        *,
        online: bool = True,
        reconnect: bool = False,
        new_member: bool = False,
        exclusive: bool = True,
        service: ServiceStart | None = None,
    ) -> None:
        """``service``: started once this process holds the peer's session, polled beside the connection
        and closed before the session is let go (see :class:`Service`)."""
        self.peer = peer
        self._start_service = service if exclusive else None
        self._service: Service | None = None
        self.online = online
        self.reconnect = reconnect
        self.new_member = new_member
        self.exclusive = exclusive
        self.presences: dict[str, Presence] = {}
        self.protocol = 0
        self._session_lock = FileLock(peer.lock_path("session"))
        self._outbox = Outbox(peer)
        self._link: Link | None = None
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
        self._node: int | None = None  # a cluster's node tried first on the next connect (None: the one that
        # answered last time, remembered in the state directory; after a lost node, the next one)
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
        self._held: list[tuple[Envelope, bytes, Incoming]] = []  # messages from a sender not known yet (while syncing)
        self._asks: dict[str, RepairNote] = {}  # the newest repair note each peer wrote to us
        self._gone: dict[str, list[tuple[int, int]]] = {}  # per peer: what it asked us for that we no longer have
        self._noted: dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {}  # what our notes said
        self._outdated: set[str] = set()  # peers told to be running another wire version
        self._answer_at: dict[str, float] = {}  # peer -> when its newest note may be answered (see _answer)
        self._budget_at = 0.0  # no note is answered before this (monotonic): REPAIR_MAX were just sent again
        self._budget_used = 0
        self._contracts: list[tuple[str, str, bytes]] = []  # retained contract states to take in (see _take_contracts)
        self.contracts: dict[str, set[str]] = {}  # member -> ids of the spec messages its retained contract state holds

    # -- lifecycle ---------------------------------------------------------------------------------

    def open(self) -> Live:
        """Connect (a :class:`Live` used in a ``with`` block opens itself)."""
        if self._link is not None:
            return self
        us = self.peer
        self._known = set(us.store.known_presences(us.url.channel))
        if self.exclusive and not self._session_lock.acquire():
            raise SessionBusy(
                "another mqttalk process of this peer holds its broker session",
                "stop it, or let it receive: `mqttalk recv` reads what it stores",
            )
        self._gap_mark = max((g.n for g in us.store.new_gaps(us.url.channel, us.me)), default=0)
        self._nonce = us.nonce
        try:
            self._connect()
        except BaseException:
            self._release()
            raise
        if self._start_service is not None:
            self._service = self._start_service(self)
        return self

    def __enter__(self) -> Live:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Leave presence ``joined`` (if it was ``online``, or to tell what we sent), disconnect
        cleanly, release the locks."""
        try:
            self._outbox.flush_batch()  # recorded even if it cannot go out now: sent later
            if (
                self._link is not None
                and self.exclusive
                and (self._announced == "online" or self._sent_more or self._outbox.busy)
            ):
                with contextlib.suppress(*_NETWORK_ERRORS):
                    self.drain()
                    self.announce("joined")
        finally:
            if self._service is not None:  # (before the session lock goes: the next holder serves)
                self._service.close()
                self._service = None
            if self._link is not None:
                self._link.close()
                self._link = None
            self._release()

    def _release(self) -> None:
        self._outbox.release()
        self._session_lock.release()

    @property
    def roster(self) -> set[str]:
        """Member names from the channel's retained roster (empty if there is none)."""
        return set(self._roster or ())

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def node(self) -> str:
        """The broker node this process is connected to, as a user reads it (for a cluster: which node)."""
        link = self._link
        return (link.broker if link is not None else self.peer.url.broker.nodes[self._node or 0]).display()

    @property
    def sending(self) -> bool:
        """Whether this process is its peer's sender now (the others' messages wait for it)."""
        return self._outbox.sender

    def others(self) -> list[str]:
        """Peers present in the channel (by their presence, which may be stale: see :meth:`paired_peers`)."""
        return sorted(p for p, pres in self.presences.items() if p != self.peer.me and pres.state != "left")

    def paired_peers(self) -> list[str]:
        """Peers that answered this peer's current pairing challenge (and have not left since)."""
        return sorted(p for p in self.paired if p in self.presences and self.presences[p].state != "left")

    # -- operations --------------------------------------------------------------------------------

    def announce(self, state: Literal["joined", "online", "left"]) -> None:
        """Publish this peer's presence (``online`` also starts the heartbeat). It carries the highest
        sequence number sent, so readers can tell when the last messages never reached them."""
        self.presences[self.peer.me] = self.peer.announce(self._live_link(), state)
        self._announced = state
        self._sent_more = False
        self._answer_due = False
        self._next_beat = time.monotonic() + self.peer.settings.heartbeat

    def send(
        self,
        body: str,
        kind: str = "note",
        *,
        data: dict[str, Any] | None = None,
        to: str | None = None,
        re: str | None = None,
        wait: bool = True,
    ) -> Envelope:
        """Send over this connection; with ``wait``, return once the broker acknowledged it.

        ``wait=False`` is for throughput: messages are recorded in the outbox in groups (one SQLite
        transaction per group, so a group's ``env.seq`` is filled in when it is recorded) and each
        group is recorded before it is published. :meth:`drain`, :meth:`poll` and leaving the
        ``with`` block record and send what is left. A connection lost meanwhile raises nothing here
        (what was sent is in the outbox, for the next sender): :meth:`drain` says so.
        """
        if to is not None:
            check_peer(to)
        env = new_envelope(self.peer.me, kind, body, data=data, to=to, re=re)
        self._outbox.record([env], later=not wait)
        try:  # (from here the message is recorded: a link lost now leaves it queued, it goes out later)
            if not self._outbox.batched:  # recorded now (a whole group, or this one): publish
                try:
                    self._publish_pending()
                    if not wait and self._link is not None:  # take in the acks that came meanwhile:
                        self._link.pump(0)  # keeps the in-flight window moving
                        self._collect_acks()
                except _NETWORK_ERRORS as exc:
                    self._lost(exc)
            if wait:
                if self._link is None or not self._outbox.sender:
                    raise Queued(
                        env.id,
                        "not connected to the broker"
                        if self._link is None
                        else "another mqttalk process of this peer is sending",
                    )
                self.drain()
        except _NETWORK_ERRORS as exc:
            if wait:
                raise Queued(env.id, exc.message) from None
            # wait=False: recorded (alone or in its group) or still in the group being filled; either way it
            # goes out with the next sender, as the rest of the outbox does: no error for this message
        if wait and not self.peer.store.is_sent(self.peer.url.channel, self.peer.me, env.seq):
            raise Queued(env.id, "the broker did not acknowledge it")
        return env

    def publish_contract(self, envs: list[Envelope]) -> None:
        """Retain this peer's own spec messages, for peers that join later (a reader takes from our
        state only ours; each member retains its own)."""
        from ._spec import retained

        us = self.peer
        topic = us.topics.spec(us.me)
        mine, first = retained(envs, us.me)
        payload = us.wrap(topic, encode_contract(us.me, mine, first=first))
        self._live_link().publish(topic, payload, retain=True, meta=us.meta[1])
        self.contracts[us.me] = {env.id for env in mine}

    def drain(self, timeout: float | None = None) -> None:
        """Wait until everything handed to the network was acknowledged (``timeout`` 0: send what is
        pending and take in the acknowledgements already there, without waiting)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.peer.settings.connect_timeout)
        if self._outbox.batched:
            self._outbox.flush_batch()
            self._publish_pending()
        us = self.peer
        if self._link is None and not self.reconnect and us.store.pending(us.url.channel, us.me):
            raise BrokerUnreachable(
                f"not connected to {us.url.broker.display()}: what was sent waits in the outbox and goes out "
                "with the next mqttalk command that reaches the broker"
            )
        while self._outbox.busy and self._link is not None:
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
                    raise BrokerUnreachable(f"lost the connection to {self.peer.url.broker.display()}")
                if now_ >= self._retry_at:
                    self._try_reconnect()
                    continue
                self._nap(max(0.0, min(deadline, self._retry_at) - now_))
            else:
                try:
                    self._link.pump(
                        max(0.0, min(deadline, self._next_beat, self._next_outbox) - now_),
                        wake=None if self._service is None else self._service.fileno(),
                    )
                    self._collect_acks()
                    self._routine()
                except _NETWORK_ERRORS as exc:
                    self._lost(exc)
            if self._service is not None:
                self._service.serve()
            if self._handled or time.monotonic() >= deadline:
                got, self._handled = self._handled, 0
                return got

    # -- internals ---------------------------------------------------------------------------------

    def _connect(self) -> None:
        from ._transport import Will

        us = self.peer
        will_topic = us.topics.presence(us.me)
        will = Will(will_topic, us.wrap(will_topic, us.presence("away").encode())) if self.online else None
        made: list[Link] = []  # (the receiver needs the link it is given to)
        link = us.link(
            client_id=us.client_id if self.exclusive else None,
            persistent=self.exclusive,
            will=will,
            on_messages=lambda batch: self._absorb(made[0], batch),
            first_node=self._node,
        )
        made.append(link)
        link.open()
        self._node = link.node_index
        try:
            self._synced = False
            self._stale.clear()
            self._fresh.clear()
            topics = [us.topics.all_presence, us.topics.roster, us.topics.all_spec, us.topics.sync(link.client_id)]
            if self.exclusive:
                topics += [us.topics.all_msg, us.topics.repairs_for(us.me)]
            link.subscribe(topics, no_local=frozenset({us.topics.all_msg}))
            self._sync(link)
            # A broker that sends no retained message to a wildcard subscription (RabbitMQ) left out the
            # presence of members we know by name (from the roster, or seen before on this machine):
            # subscribe to those exactly, which every broker answers with the retained presence. (Those
            # we only met in stale copies from our queue too: the retained one tells a replay from them.)
            known = us.store.known_presences(us.url.channel)
            # (At most MAX_EXACT of them, roster names first: a flood of fake presences must not make
            # every connect subscribe to thousands of topics.)
            # Our own name included: a name check (Channel._check_name) must see who holds it.
            roster = sorted((self._roster or set()) - self._fresh)
            missing = (roster + sorted(set(known) - self._fresh - set(roster)))[:MAX_EXACT]
            if missing:
                link.subscribe([us.topics.presence(peer) for peer in missing])
                # ... and the retained spec contract states such a broker left out too: of roster members
                # only (sealed names members wrote), in a SUBSCRIBE of their own (NATS refuses long ones).
                owners = [p for p in missing if p in (self._roster or ())][:MAX_SPEC_EXACT]
                if owners:
                    link.subscribe([us.topics.spec(p) for p in owners])
                self._sync(link)
            for peer, raw in known.items():  # still unheard of: the newest presence this machine saw
                pres = decode_presence(raw, at=now())
                if (
                    pres is not None
                    and peer not in self.presences
                    and (len(self.presences) < MAX_PEERS or peer in (self._roster or ()))
                ):
                    self.presences[peer] = pres
            if self.exclusive and (self._roster_due or us.me not in (self._roster or set())):  # later joiners find us
                self._publish_roster(link)
        except BaseException:
            link.close()
            # a cluster's node that took the connection but not the session (it cannot place it yet, or
            # died since): the next attempt starts at the next node
            self._node = (link.node_index + 1) % len(us.url.broker.nodes)
            raise
        self._link, self.protocol = link, link.protocol
        self._synced = True
        self._after_sync()
        if self._announced is not None:  # a reconnect: say again who we are
            self.announce("online" if self._announced == "online" else "joined")
        if self.exclusive:
            self._publish_pending()

    def _sync(self, link: Link) -> None:
        """Send ourselves a marker and wait for it: then everything the broker had for us is in.

        A broker whose queue for this client overflows (Mosquitto keeps 1,000 by default: a flood of
        retained presence fills it) drops the marker: after a quiet SYNC_AGAIN another one is sent."""
        us = self.peer
        topic = us.topics.sync(link.client_id)
        tokens: set[bytes] = set()
        # The backlog may be long: the wait runs out only after a quiet connect_timeout.
        deadline = time.monotonic() + us.settings.connect_timeout
        again = 0.0  # when to send another marker: after SYNC_AGAIN with nothing arriving
        while True:
            if time.monotonic() >= again:
                token = os.urandom(16).hex().encode()
                tokens.add(token)
                link.publish(topic, us.wrap(topic, token))  # (its wait for the PUBACK may take it in)
                again = time.monotonic() + SYNC_AGAIN
            if tokens & self._tokens:
                return
            if time.monotonic() >= deadline:
                raise TimedOut(
                    f"broker at {us.url.broker.display()} did not deliver the channel "
                    f"within {us.settings.connect_timeout:g}s"
                )
            if link.pump(max(0.0, min(deadline, again) - time.monotonic())):
                deadline = time.monotonic() + us.settings.connect_timeout
                again = time.monotonic() + SYNC_AGAIN

    def _after_sync(self) -> None:
        """The backlog is in: report replayed presence; compare what each peer says it sent with what arrived."""
        us = self.peer
        # A session's queue holds the presence updates published while it was away, older than the
        # retained presence it also gets: stale copies the broker hands over in any order, no replay. A
        # replay is when nothing newer came: the retained presence itself was put back to an old one.
        for peer, (topic, payload) in self._stale.items():
            if peer not in self._fresh:
                self._replayed(peer, topic, payload)
        self._stale.clear()
        self._take_contracts()
        if not self.exclusive:
            return
        held, self._held = self._held, []
        if held:  # the backlog is in: a sender still unknown never joined the channel
            self._store([(env, data) for env, data, _ in held if self._member(env.sender)])
            for env, _, item in held:
                if not self._member(env.sender):
                    self._drop(item.topic, item.payload, "dropped", f"message from {env.sender}, who never joined")
        # A new member starts each sender's sequence where it stands: what was sent before went to the
        # members of then, not to it. Except the first to join a sender alone in the channel: what that
        # sender sent meanwhile was sent to whoever would join, and comes by repair (expect opens the gap).
        members = ((self._roster or set()) | set(self.presences)) - {us.me}
        for peer, pres in self.presences.items():
            if peer == us.me or not pres.seq:
                continue
            if self.new_member and members - {peer}:
                us.store.start_head(us.url.channel, peer, pres.seq)
            else:
                us.store.expect(us.url.channel, peer, pres.seq)
        if self.new_member:  # what this machine stored before we joined is not ours to read
            self.new_member = False
            us.store.advance(us.url.channel, us.me, *us.store.marks(us.url.channel))
            self._gap_mark = us.store.marks(us.url.channel)[1]
        for note in list(self._asks.values()):
            self._answer(note)
        self._write_notes(every=True)
        self._report_gaps()

    def _report_gaps(self) -> None:
        us = self.peer
        us.store.settle_gaps(us.url.channel, timeout=us.settings.repair_timeout)
        for gap in us.store.new_gaps(us.url.channel, us.me):
            if gap.n > self._gap_mark:
                self._gap_mark = gap.n
                self.peer.on_event(Event("gap", gap.sender, gap=gap))

    # -- repair: a reader asks the sender for what never arrived; the sender sends it again ----------

    def _answer(self, note: RepairNote) -> None:
        """``note.sender`` wrote to us: mark what it says is gone, and send again what it misses (once per
        version of its note), or tell it which of those we no longer have."""
        us = self.peer
        peer = note.sender
        if note.gone:
            us.store.settle_gaps(us.url.channel, timeout=us.settings.repair_timeout, sender=peer, gone=list(note.gone))
        if not note.want or not self._member(peer):
            return  # only members are answered (a stranger's made-up names would each cost a resend)
        mono = time.monotonic()
        if mono < self._budget_at:  # what this process sends again is bounded across all askers
            self._answer_at[peer] = self._budget_at
            return
        fresh = us.store.answer_once(us.url.channel, peer, us.me, note.ts.isoformat(), every=REPAIR_EVERY)
        if fresh is None:  # answered another note of peer's moments ago: this one in a while (_routine)
            self._answer_at[peer] = mono + REPAIR_EVERY
            return
        self._answer_at.pop(peer, None)
        if not fresh:
            return
        rows, gone = us.store.sent_rows(us.url.channel, us.me, _merged(note.want), limit=REPAIR_MAX)
        self._budget_used += len(rows)
        if self._budget_used >= REPAIR_MAX:
            self._budget_at, self._budget_used = mono + REPAIR_EVERY, 0
        if rows and self._link is not None:  # the original payloads and ids: a reader that has one ignores it
            self._outbox.resend(rows, self._link)
        gone = gone[-64:]
        if gone != self._gone.get(peer, []):
            self._gone[peer] = gone
            self._write_notes(only=peer)

    def _write_notes(self, *, only: str | None = None, every: bool = False) -> None:
        """Publish our note to each peer whose want or gone changed (``every``: to each with something
        to say, as on a new connection, whose requests may have been lost with the broker's state)."""
        us, link = self.peer, self._link
        if link is None or not self.exclusive:
            return
        wants = us.store.open_gaps(us.url.channel)
        for peer in sorted((set(wants) | set(self._gone) | set(self._noted)) - {us.me}):
            if only is not None and peer != only:
                continue
            said = (wants.get(peer, [])[:64], self._gone.get(peer, []))
            if said == self._noted.get(peer, ([], [])) and not (every and (said[0] or said[1])):
                continue
            self._noted[peer] = said
            topic = us.topics.repair(peer, us.me)
            note = RepairNote(sender=us.me, to=peer, ts=now(), want=said[0], gone=said[1])
            payload = us.wrap(topic, note.encode()) if said[0] or said[1] else b""
            link.publish(topic, payload, retain=True, wait=False)

    def _absorb(self, link: Link, incoming: list[Incoming]) -> None:
        """Store messages (one transaction per batch), track presence, announce pairings; then ack
        each, so a crash before the commit makes the broker deliver them again."""
        us = self.peer
        messages: list[tuple[Envelope, bytes, Incoming]] = []
        notes: list[RepairNote] = []
        mine = us.topics.level(us.me)
        at = now()
        with us.store.transaction():  # one commit for the batch's presence, gaps and messages
            self._take(incoming, mine, at, messages, notes)
            # A sender must be a member, known by its presence (taken in first: it may be in this batch).
            held = {id(item) for env, _, item in messages if not self._member(env.sender)}
            if held and not self._synced:  # its presence may still be in the backlog: decide once it is in
                self._held += [m for m in messages if id(m[2]) in held]
            elif held:
                for env, _, item in messages:
                    if id(item) in held:
                        self._drop(item.topic, item.payload, "dropped", f"message from {env.sender}, who never joined")
                held = set()
            self._store([(env, data) for env, data, item in messages if id(item) not in held])
            if self._synced:
                self._take_contracts()
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

    def _take(
        self,
        incoming: list[Incoming],
        mine: str,
        at: datetime,
        messages: list[tuple[Envelope, bytes, Incoming]],
        notes: list[RepairNote],
    ) -> None:
        """Sort a batch: presence and roster taken in at once, messages and repair notes collected, the
        rest dropped (and reported once)."""
        us = self.peer
        for item in incoming:
            if item.topic == us.topics.roster:
                opened = us.unwrap(item.topic, item.payload)
                if opened:
                    names = decode_roster(opened)
                    self._roster = (self._roster or set()) | names
                    # Two members joining at once each publish the roster they read plus themselves: the
                    # later one wins. The one left out puts itself (and all it knows) back, in _routine.
                    self._roster_due = self.exclusive and us.me not in names
                continue
            where = us.topics.split(item.topic)
            section, level = where if where else ("", "")
            if section == "msg" and level == mine:
                continue  # our own message, echoed by the broker: already in our history since we sent it
            if section.startswith("repair:"):
                if section != "repair:" + mine or not item.payload:
                    continue  # a note to another peer (or one cleared)
                section = "repair"
            elif section not in ("msg", "presence", "sync", "spec"):
                continue
            if section == "presence" and item.payload and self._crowded(level):
                self._drop(
                    item.topic,
                    b"",
                    "dropped",
                    f"presence of a peer past the first {MAX_PEERS} of the channel (a flood of made-up peers?)",
                )
                continue
            if section == "spec":  # opened only if a member wrote it (a flood of made-up ones costs no decryption)
                if item.payload:  # (an empty one clears it)
                    self._contracts.append((item.topic, level, item.payload))
                continue
            data = us.unwrap(item.topic, item.payload)
            if data is None:
                self._drop(
                    item.topic,
                    item.payload,
                    "decrypt_fail",
                    f"payload on {item.topic} does not open with this channel's key",
                )
            elif section == "msg":
                env = decode_envelope(data)
                if env is None or us.topics.level(env.sender) != level:
                    self._drop(item.topic, item.payload, "dropped", f"malformed message on {item.topic}")
                elif not in_window(env.ts, at):
                    self._drop(
                        item.topic,
                        item.payload,
                        "dropped",
                        f"message {env.id} from {env.sender} has a stale or future timestamp",
                    )
                else:
                    messages.append((env, data, item))
            elif section == "presence":
                self._handled += 1
                self._see_presence(item.topic, level, data, at)
            elif section == "spec":
                pass  # (taken in once the backlog is in: _take_contracts)
            elif section == "repair":
                note = decode_note(data, at=at)
                if note is None or us.topics.level(note.sender) != level or note.to != us.me:
                    self._drop(item.topic, item.payload, "dropped", f"malformed repair note on {item.topic}")
                else:
                    notes.append(note)
            else:
                self._tokens.add(data)

    def _take_contracts(self) -> None:
        """Keep the spec messages of members' retained contract states (a late joiner's view of the
        negotiations it was not there for). Taken in once the backlog is in: the writer must be a
        member, known by its presence or the roster, and so must each message's sender."""
        us = self.peer
        pending, self._contracts = self._contracts, []
        if not pending:
            return
        at = now()
        members = set(self.presences) | self._known | set(self._roster or ())
        levels = {us.topics.level(name): name for name in members}
        for topic, level, payload in pending:
            if level not in levels:
                self._drop(topic, payload, "dropped", f"spec contract state on {topic} of a name that never joined")
                continue
            data = us.unwrap(topic, payload)
            if data is None:
                self._drop(topic, payload, "decrypt_fail", f"payload on {topic} does not open with this channel's key")
                continue
            got = decode_contract(data, at=at)
            if got is None or us.topics.level(got[0].sender) != level:
                self._drop(topic, data, "dropped", f"malformed spec contract state on {topic}")
                continue
            state, envs = got
            if not self._member(state.sender):
                self._drop(topic, data, "dropped", f"spec contract state of {state.sender}, who never joined")
                continue
            envs = [env for env in envs if self._member(env.sender)]
            self.contracts[state.sender] = {env.id for env in envs}
            if state.sender != us.me:  # (what we sent is in our history: a state at spec/ME tells us nothing)
                # only the owner's own messages: a member cannot speak for another (nor for us) here
                us.store.add_relayed(us.url.channel, state.sender, [e for e in envs if e.sender == state.sender])

    def _crowded(self, level: str) -> bool:
        """Whether a presence at topic level ``level`` comes from a peer past the first MAX_PEERS this
        reader knows, and not in the roster either: it is dropped before it costs a decryption, a
        decode and a write (10,000 made-up peers arrive on every connect as retained messages)."""
        if len(self.presences) < MAX_PEERS:
            return False
        sizes = (len(self.presences), len(self._roster or ()))
        if self._levels is None or self._levels[0] != sizes:
            names = set(self.presences) | set(self._roster or ())
            self._levels = (sizes, {self.peer.topics.level(n) for n in names})
        return level not in self._levels[1]

    def _member(self, peer: str) -> bool:
        return peer in self.presences or peer in self._known or peer in (self._roster or ())

    def _store(self, messages: list[tuple[Envelope, bytes]]) -> int:
        us = self.peer
        new = us.store.add_many(us.url.channel, messages)
        for env in new:
            self._handled += 1
            if env.sender != us.me:
                us.on_event(Event("message", env.sender, envelope=env))
        return len(new)

    def _see_presence(self, topic: str, level: str, payload: bytes, at: datetime) -> None:
        us = self.peer
        if not payload:  # retained presence cleared
            for name in [p for p in self.presences if us.topics.level(p) == level]:
                del self.presences[name]
            return
        pres = decode_presence(payload, at=at)
        if pres is None or us.topics.level(pres.peer) != level:
            self._drop(
                topic, payload, "dropped", f"malformed presence (or one stamped outside the time window) on {topic}"
            )
            return
        peer = pres.peer
        self._known.add(peer)
        if pres.v != WIRE_VERSION and peer != us.me and peer not in self._outdated:
            self._outdated.add(peer)
            us.on_event(Event("outdated", peer, version=pres.v))
        # Ordered by the heartbeat it claims, but never later than now: a presence stamped minutes ahead
        # (inside the clock-skew window) must not make the genuine ones after it look older.
        hb = min(pres.hb, at).astimezone(UTC).isoformat(timespec="microseconds")
        # A peer's Last Will ("away") carries the heartbeat of when it connected, older than the ones it
        # sent since: it is never a replay. Any other presence older than one seen is.
        newest = None if pres.state == "away" else us.store.newest_presence(us.url.channel, peer, hb, payload)
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
        if peer == us.me:
            return
        if not self.exclusive:
            return  # a look over a throwaway session (a name check, status beside a live process): no more
        if pres.state in ("left", "away"):
            if pres.state == "left":
                us.store.forget_paired(us.url.channel, us.me, peer)
                self.paired.discard(peer)
            if peer not in self._offline and self._synced:
                self._offline.add(peer)
                us.on_event(Event("offline", peer, pres.state))
            return
        self._offline.discard(peer)
        if pres.nonce and us.store.see_nonce(us.url.channel, peer, pres.nonce):
            self._answer_due = True  # our presence answers it at the next chance (see _routine)
        # Present is not paired: only a presence answering our current challenge proves the peer holds
        # the key now. A stale, replayed or forged presence never yields PAIRED.
        if pres.answers_for(us.me, self._nonce):
            self.paired.add(peer)
            if us.store.mark_paired(us.url.channel, us.me, peer):
                us.on_event(Event("paired", peer, role=pres.role))
        if self._synced and pres.seq:
            us.store.expect(us.url.channel, peer, pres.seq)

    def _replayed(self, peer: str, topic: str, payload: bytes) -> None:
        self._drop(topic, payload, "dropped", f"an old presence of {peer} was replayed on {topic}")

    def _drop(self, topic: str, payload: bytes, kind: Literal["dropped", "decrypt_fail"], why: str) -> None:
        """Report a payload we cannot use, once per process (a retained one comes back on every subscribe).
        It is acknowledged and forgotten: never shown, never stored."""
        key = (topic, hash(payload))
        if key not in self._dropped:
            self._dropped.add(key)
            self.dropped += 1
            self.peer.on_event(Event(kind, detail=why))

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
            if self._announced == "online" or (self._sent_more and not self._outbox.busy):
                self.announce(self._announced or "joined")
            self._next_beat = mono + self.peer.settings.heartbeat
            for peer, pres in self.presences.items():
                if (
                    judge(pres, me=False).state == "away"
                    and pres.state == "online"
                    and peer != self.peer.me
                    and peer not in self._offline
                ):
                    self._offline.add(peer)
                    self.peer.on_event(Event("offline", peer, f"no heartbeat for {stale_after(pres):g}s"))
        if mono >= self._next_outbox:
            self._next_outbox = mono + OUTBOX_POLL
            self._outbox.flush_batch()
            self._publish_pending()

    def _publish_roster(self, link: Link) -> None:
        us = self.peer
        self._roster = (self._roster or set()) | {us.me}
        self._roster_due = False
        link.publish(us.topics.roster, us.wrap(us.topics.roster, encode_roster(self._roster)), retain=True)

    def _publish_pending(self) -> None:
        """Hand pending outbox messages to the network (if this process is the peer's sender)."""
        if self._link is not None and self.exclusive:
            self._outbox.pull(self._link)

    def _collect_acks(self) -> None:
        if self._link is not None and self._outbox.collect(self._link):
            self._sent_more = True

    def _nap(self, seconds: float) -> None:
        """Sleep while disconnected, but wake up for the service."""
        if self._service is None:
            time.sleep(seconds)
        else:
            select.select([self._service.fileno()], [], [], seconds)

    def _live_link(self) -> Link:
        if self._link is None:
            raise BrokerUnreachable(f"not connected to {self.peer.url.broker.display()}")
        return self._link

    def _lost(self, exc: Exception) -> None:
        if self._link is not None:
            self._link.close()
            # a cluster's node that failed is tried last
            self._node = (self._link.node_index + 1) % len(self.peer.url.broker.nodes)
        self._link = None
        self._outbox.reset()  # unacknowledged: still pending in the outbox, sent again on reconnect
        self._backoff = 0.5
        self._retry_at = time.monotonic() + self._backoff
        self.peer.on_event(Event("disconnected", detail=str(exc)))
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
        self.peer.on_event(Event("reconnected", broker=self.node))


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sequence ranges sorted and merged: overlapping ones would send the same messages again, once each."""
    out: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out
