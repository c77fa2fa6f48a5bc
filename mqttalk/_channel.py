"""A local peer's one-shot operations (join, send, fetch, status, leave, history): each opens what
it needs and closes it. Built on :class:`~._peer.Peer` (who the peer is), :class:`~._outbox.Outbox`
(the way out) and :class:`~._live.Live` (the way in).

Two kinds of connection:

* :class:`~._live.Live` holds this peer's persistent broker session (one process at a time, by file
  lock): it stores every message as it arrives, keeps presence, sends the outbox, reconnects if asked.
* One-shot sends use a throwaway clean session, so they never kick a live process off the broker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ._bindings import Binding
from ._config import Settings
from ._errors import BrokerUnreachable, EmptyChannel, NameTaken, Queued, SessionBusy, TimedOut, UsageError
from ._live import Live, ServiceStart
from ._locks import held, waiting_lock
from ._outbox import Outbox
from ._peer import Event, Inbox, Message, Peer, PeerInfo, Status, Work, judge
from ._topics import check_peer
from ._url import JoinURL
from ._wire import Envelope, StatusData, new_envelope

SpecPlan = tuple[str, dict[str, Any], str | None]  # what a spec command sends: body, spec fields, --re
SpecDone = tuple[Envelope | None, "Contract"]  # what a spec command sent (None: nothing), and the contract after

if TYPE_CHECKING:
    from ._spec import Contract

__all__ = ["Channel", "Event", "Inbox", "Message", "PeerInfo", "Status"]

ANSWER_GRACE = 1.0  # s a join waits for an answer from peers that are present but show no live process
SCREENFUL_WORK = 20  # peers' last statuses `status` shows at most
SEND_POLL = 0.02  # s between looks at the store while another process of this peer sends our message
READ_LOCK_WAIT = 15.0  # s a reader waits for another to finish handing messages over (then goes on)
_NETWORK_ERRORS = (BrokerUnreachable, TimedOut)


class Channel(Peer):
    """One local peer (``me``) in one channel. One-shot methods open and close their own connection.

    What :func:`mqttalk.pair` and :func:`mqttalk.open_channel` found is kept on it: :attr:`paired`
    (the peers that answered the pairing challenge), :attr:`unanswered`, :attr:`binding`."""

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
        binding: Binding | None = None,
    ) -> None:
        super().__init__(url, me, member=member, settings=settings, role=role, joined=joined, on_event=on_event)
        self.binding = binding  # the directory binding this channel was opened from (None: --channel/--as)
        self.paired: list[str] = []  # after join(): peers that answered our pairing challenge
        self.unanswered: list[str] = []  # after join(): peers present that have not answered it
        self.waited = 0.0  # after join(): how long it waited (less than asked once nobody present could answer)
        self.service: ServiceStart | None = None  # run by the live sessions this channel holds (see Live)

    # -- one-shot operations -----------------------------------------------------------------------

    def join(
        self, wait: float = 0.0, *, new_member: bool = True, new_challenge: bool = True, check: bool = False
    ) -> list[str]:
        """Join the channel (creates this peer's broker session); wait up to ``wait`` s for another peer
        to pair.

        Each join mints a new pairing challenge, carried in this peer's presence. Another peer is
        *paired* once its presence answers that challenge: proof that it holds the channel key now,
        which no stale, replayed or forged presence can give. Returns the peers paired (also kept in
        :attr:`paired`); :attr:`unanswered` lists those present that have not answered (yet: they
        answer when they next run). ``check`` (joining a channel someone else created) first looks,
        over a throwaway connection, whether the name is taken (raises :class:`NameTaken`) and whether
        anyone was ever there (raises :class:`EmptyChannel` if not): either way nothing is joined or
        recorded.
        """
        if check and self._check_name(self._member):  # (before anything is recorded: a refusal leaves nothing)
            raise EmptyChannel(
                f"nobody is in this channel on {self.url.broker.display()} (no presence, no roster), so nothing was "
                "joined: the join URL most likely names another broker or prefix than the one the channel was "
                "created on, or the broker lost (or someone erased) its retained messages",
                "check it against the creator's; the creator's next mqttalk command puts its presence back: pair "
                "again then",
            )
        self.waited = wait
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
                    self.on_event(
                        Event(
                            "waiting",
                            detail=f"up to {wait:g}s for {names} to answer"
                            if seen
                            else f"up to {wait:g}s for another peer",
                        )
                    )
                if seen and waited > ANSWER_GRACE and all(judge(p, me=False).state != "online" for p in seen):
                    self.waited = waited
                    break  # those present run no mqttalk process now: nobody can answer before their next one
                live.poll(min(left, 0.1))
            self.unanswered = [p for p in live.others() if p not in live.paired]
            self.paired = live.paired_peers()
            return self.paired

    def send(
        self,
        body: str,
        kind: str = "note",
        *,
        data: dict[str, Any] | None = None,
        to: str | None = None,
        re: str | None = None,
    ) -> Envelope:
        """Send one message: recorded in the outbox first, returned once the broker acknowledged it.

        Raises :class:`Queued` if the broker could not be reached: the message stays in the outbox
        and goes out with the next command that reaches the broker.
        """
        if to is not None:
            check_peer(to)
        self._ident()  # the name is ours (or refused) before anything is queued under it
        if kind == "status" and data is not None and "spec" not in data:
            data = {**data, **self._spec_in_force()}
        env = new_envelope(self.me, kind, body, data=data, to=to, re=re)
        outbox = Outbox(self)
        outbox.record([env])
        deadline = time.monotonic() + self.settings.connect_timeout
        while not outbox.take():  # another process of this peer (a live one, or another send) sends ours
            if self.store.is_sent(self.url.channel, self.me, env.seq):
                return env
            if time.monotonic() >= deadline:
                raise Queued(env.id, "another mqttalk process of this peer is sending and has not sent it yet")
            time.sleep(SEND_POLL)
        try:
            with self.link() as link:
                outbox.flush(link)
                if not held(self.lock_path("session")):
                    self.announce(link, "joined", wait_ack=False)  # refresh "last seen"
        except _NETWORK_ERRORS as exc:
            raise Queued(env.id, exc.message) from None
        finally:
            outbox.release()
        return env

    def _spec_in_force(self) -> dict[str, Any]:
        """A status's default spec fields: the revision in force when exactly one subject has one."""
        envs = self.store.specs(self.url.channel, self.me)
        if not envs:
            return {}
        from ._spec import fold, status_spec

        return status_spec(fold(envs), None, None)

    def fetch(self, wait: float = 0.0) -> Inbox:
        """Unread messages (and new gaps) for this peer; with ``wait``, block up to that long for one,
        or for another peer to pair (:attr:`Inbox.paired`).

        Nothing is marked read: call :meth:`mark_read` once the messages were shown.
        """
        deadline = time.monotonic() + wait
        live = Live(self, online=wait > 0, service=self.service if wait > 0 else None)
        try:
            live.open()
        except SessionBusy:
            # A live process of this peer holds the broker session and stores what arrives.
            got = self.unread()
            if wait > 0 and not got:
                self.on_event(Event("waiting", detail=f"up to {wait:g}s for a message"))
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
                    self.on_event(Event("waiting", detail=f"up to {wait:g}s for a message"))
                while not got and not paired and time.monotonic() < deadline:
                    if live.poll(deadline - time.monotonic()):
                        got = self.unread()
        finally:
            self.on_event = emit
        got.paired = paired
        return got

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold this peer's read lock: from choosing which unread messages to show to marking them read,
        no other reader of this peer (a `recv`, a hook, the MCP server's push, in any process) shows the
        same ones. Pair it with :meth:`still_unread` (what another reader took meanwhile is dropped)."""
        with waiting_lock(self.lock_path("read"), READ_LOCK_WAIT):
            yield

    def still_unread(self, inbox: Inbox) -> Inbox:
        """``inbox`` without what was marked read since it was fetched (by another reader)."""
        n, gap = self.store.cursor(self.url.channel, self.me)
        return Inbox([m for m in inbox.messages if m.n > n], [g for g in inbox.gaps if g.n > gap], inbox.paired)

    def spec_op(
        self, plan: Callable[[list[Envelope], list[str]], SpecPlan | None] | None = None, *, publish: bool = True
    ) -> tuple[Envelope | None, list[Envelope]]:
        """Read the channel's spec messages (what is queued for us taken in, and the members' retained
        contract states: a late joiner's only source), let ``plan`` decide from them and the members
        present what to send (a body, spec fields, the id it answers) or nothing, send it, and keep our
        own retained contract state up to date (unless ``publish`` is false: a plain `send --kind spec`, whose
        kind a write on the spec topic would show on the wire). Returns what was sent and every spec
        message known."""
        live = Live(self, online=False)
        try:
            live.open()
        except SessionBusy:  # a live process of this peer holds the session (and stores what arrives)
            live = Live(self, online=False, exclusive=False).open()
        with live:
            if live.exclusive:
                live.announce("joined")
                live.drain()
            channel = self.url.channel
            envs = self.store.specs(channel, self.me)
            # (a person watching, `mqttalk watch`, takes part in the conversation, not in the agreement)
            agents = [p for p in live.others() if (live.presences[p].role or "") != "person"]
            todo = plan(envs, agents) if plan is not None else None
            env = None
            if todo is not None:
                body, data, re = todo
                if live.exclusive:
                    env = live.send(body, "spec", data=data, re=re)
                else:
                    env = self.send(body, "spec", data=data, re=re)
                envs = self.store.specs(channel, self.me)
            mine = {e.id for e in envs if e.sender == self.me and e.to is None}
            if publish and mine != live.contracts.get(self.me, set()):  # (lacking some, or holding what we never sent)
                live.publish_contract(envs)
            return env, envs

    # (the spec commands: each reads the contract, checks the command against it, sends, see _spec)

    def spec_propose(self, subject: str, text: str, *, re: str | None = None, to: list[str] | None = None) -> SpecDone:
        """Propose the next revision of ``subject``; it needs the agreement of ``to`` (default: every member
        present now)."""
        from ._spec import check_subject, plan_propose

        check_subject(subject)
        for name in to or []:
            check_peer(name)
        if to and not set(to) - {self.me}:
            raise UsageError(
                f"--to names only you ({self.me}): a revision needs the agreement of another member",
                "name the peers who must agree, or leave --to out (every member present)",
            )

        def plan(envs: list[Envelope], members: list[str]) -> SpecPlan:
            return text, plan_propose(_fold(envs), subject, text, self.me, to or members, envs), re

        return self._spec_done(self.spec_op(plan))

    def spec_agree(self, subject: str, rev: int | None = None) -> SpecDone:
        """Agree to the latest revision of ``subject`` (its digest); refused for any other revision."""
        from ._spec import check_rev, check_subject, plan_agree

        check_subject(subject)
        check_rev(rev)

        def plan(envs: list[Envelope], _members: list[str]) -> SpecPlan | None:
            data, target = plan_agree(_fold(envs), subject, self.me, rev)
            if self.me in target.agreed:  # agreed already: saying it twice changes nothing, sends nothing
                return None
            return f"agreed to rev {target.rev} (sha256 {target.digest})", data, target.id

        return self._spec_done(self.spec_op(plan))

    def spec_reject(self, subject: str, why: str) -> SpecDone:
        """Reject the latest revision of ``subject``, saying why."""
        from ._spec import check_subject, plan_reject

        check_subject(subject)

        def plan(envs: list[Envelope], _members: list[str]) -> SpecPlan:
            data, target = plan_reject(_fold(envs), subject, self.me, why)
            return why, data, target.id

        return self._spec_done(self.spec_op(plan))

    def spec_withdraw(self, subject: str) -> SpecDone:
        """Withdraw ``subject`` (its latest proposer only)."""
        from ._spec import check_subject, plan_withdraw

        check_subject(subject)

        def plan(envs: list[Envelope], _members: list[str]) -> SpecPlan:
            data, target = plan_withdraw(_fold(envs), subject, self.me)
            return f"withdrew rev {target.rev}", data, target.id

        return self._spec_done(self.spec_op(plan))

    def contract(self) -> Contract:
        """The channel's contract now (what the broker holds for us taken in first)."""
        return _fold(self.spec_op()[1])

    def _spec_done(self, done: tuple[Envelope | None, list[Envelope]]) -> SpecDone:
        return done[0], _fold(done[1])

    def mark_read(self, inbox: Inbox) -> None:
        n = max((m.n for m in inbox.messages), default=0)
        gap = max((g.n for g in inbox.gaps), default=0)
        if n or gap:
            self.store.advance(self.url.channel, self.me, n, gap)

    def status(self) -> Status:
        """Who is in the channel and whether they are there, plus this peer's unread count."""
        live = Live(self, online=False)
        try:
            live.open()
        except SessionBusy:  # a live process holds the session: read presence over a throwaway one
            live = Live(self, online=False, exclusive=False).open()
        with live:
            if live.exclusive:
                live.announce("joined")
                live.drain()  # (what this connect sent from the outbox is not "queued" any more)
            return self.status_of(live)

    def status_of(self, live: Live) -> Status:
        """The channel as the open ``live`` sees it now: presences judged, this peer's counts."""
        proto = "MQTT 5" if live.protocol == 5 else "MQTT 3.1.1"
        nonce = self.nonce
        peers = [judge(p, me=p.peer == self.me, paired=p.answers_for(self.me, nonce)) for p in live.presences.values()]
        peers.sort(key=lambda p: (not p.me, p.name))
        channel = self.url.channel
        return Status(
            self.url.display(),
            self.me,
            proto,
            peers,
            self.store.unread_count(channel, self.me),
            len(self.store.new_gaps(channel, self.me)),
            len(self.store.pending(channel, self.me)),
            self.url.sealed,
            self.work(),
        )

    def work(self) -> list[Work]:
        """Each peer's last status, with the spec revision it is against and the one in force now."""
        statuses = self.store.last_statuses(self.url.channel)
        force: dict[str, int] = {}
        if any(env.data.get("spec") for env in statuses):
            from ._spec import fold

            force = {s.name: r.rev for s, r in fold(self.store.specs(self.url.channel, self.me)).agreed()}
        work = []
        for env in statuses[:SCREENFUL_WORK]:
            data = env.typed()
            if isinstance(data, StatusData):
                spec = data.spec if data.rev else None
                work.append(Work(env.sender, data.state, env.ts, spec, data.rev, force.get(spec or "")))
        return work

    def leave(self) -> None:
        """Mark this peer ``left`` and end its broker session (the broker drops its queue)."""
        if held(self.lock_path("session")):
            raise UsageError(
                f"a live mqttalk process of {self.me} (listen, recv --wait) is running", "stop it first, then leave"
            )
        with self.link(client_id=self.client_id) as link:  # a clean start: the broker drops the session
            self.announce(link, "left")

    def history(
        self, *, peer: str | None = None, kind: str | None = None, since: str | None = None, limit: int | None = None
    ) -> list[Envelope]:
        """Messages of this channel in the local store, oldest first (see :meth:`Store.history`)."""
        return list(self.store.history(self.url.channel, peer=peer, kind=kind, since=since, limit=limit))

    def live(self, *, online: bool = True, reconnect: bool = False, new_member: bool = False) -> Live:
        """A long-lived connection holding this peer's broker session (see :class:`Live`)."""
        return Live(self, online=online, reconnect=reconnect, new_member=new_member, service=self.service)

    def unread(self) -> Inbox:
        """What the local store holds unread for this peer (no network): each sender's messages in its
        sequence order, and new gaps. Nothing is marked read (see :meth:`mark_read`)."""
        channel = self.url.channel
        return Inbox(
            _in_sender_order([Message(n, env) for n, env in self.store.unread(channel, self.me)]),
            self.store.new_gaps(channel, self.me),
        )

    # -- internals ---------------------------------------------------------------------------------

    def _before_claim(self) -> None:
        self._check_name(None)  # acting as NAME here for the first time: is NAME someone else's?

    def _check_name(self, member: str | None) -> bool:
        """Raise :class:`NameTaken` if another membership (another machine, or another state directory)
        holds this peer's name, judged over a throwaway session that touches nobody's queue. Returns
        whether the channel is empty: no presence and no roster, nobody was ever there."""
        with Live(self, online=False, exclusive=False) as live:
            taken = live.presences.get(self.me)
            empty = not live.presences and not live.roster
        if taken is not None and taken.member != member and taken.state != "left":
            raise NameTaken(
                f"peer name {self.me!r} is already used in this channel by another member (another "
                "machine, or another state directory or name binding here)",
                "pick another with --as NAME",
            )
        return empty


def _fold(envs: list[Envelope]) -> Contract:
    from ._spec import fold

    return fold(envs)


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
