"""The one way out: every message a peer sends is recorded in its outbox (the store) before it is
published, published in order with at most WINDOW unacknowledged, and marked sent on its PUBACK.
A one-shot command and a live process send through the same :class:`Outbox`; the outbox lock makes
one process of a peer at a time its sender (the others' messages wait in the store for it).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from ._locks import FileLock
from ._wire import Envelope

if TYPE_CHECKING:
    from ._peer import Peer
    from ._store import Pending
    from ._transport import Link, Sent

WINDOW = 100  # QoS 1 publishes a connection keeps unacknowledged at once (paho itself is told: no limit)
GROUP = 100  # messages sent with wait=False are recorded in the outbox this many at a time


class Outbox:
    """``peer``'s outgoing messages, from the store to the broker."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self._lock = FileLock(peer.lock_path("outbox"))
        self._batch: list[Envelope] = []  # taken with record(later=True), not yet in the store
        self._queued: deque[Pending] = deque()  # taken from the store, waiting for room in the window
        self._inflight: deque[tuple[int, Sent]] = deque()  # (outbox row, its publish), in order
        self._handed = 0  # highest outbox row taken from the store for the current link

    # -- recording -----------------------------------------------------------------------------------

    def record(self, envs: list[Envelope], *, later: bool = False) -> None:
        """Record ``envs`` in the store (numbering them: sets ``env.seq``). ``later``: keep them in
        memory and record them GROUP at a time (one transaction per group, for throughput): see
        :meth:`flush_batch`."""
        self._batch += envs
        if not later or len(self._batch) >= GROUP:
            self.flush_batch()

    def flush_batch(self) -> None:
        """Write what :meth:`record` kept in memory, in one transaction. If the write fails (a full disk),
        every one of them stays for the next write and the error is raised: none lost, none half-written."""
        if self._batch:
            peer = self.peer
            peer.store.enqueue(peer.url.channel, peer.me, peer.topics.msg(peer.me), self._batch)
            self._batch = []

    @property
    def batched(self) -> bool:
        return bool(self._batch)

    # -- sending -------------------------------------------------------------------------------------

    def take(self) -> bool:
        """Become the peer's sender if no other process is (never blocks); whether we are."""
        return self._lock.acquire()

    @property
    def sender(self) -> bool:
        return self._lock.held

    def release(self) -> None:
        self._lock.release()

    @property
    def busy(self) -> bool:
        """Messages handed to the link and not acknowledged yet, or waiting for room in the window."""
        return bool(self._inflight or self._queued)

    def pull(self, link: Link) -> None:
        """Hand what is pending in the store (recorded by any process of this peer) to ``link``, if we
        are the sender."""
        if not self.take():
            return
        peer = self.peer
        pending = peer.store.pending(peer.url.channel, peer.me, after=self._handed)
        if pending:
            self._queued.extend(pending)
            self._handed = max(row.n for row in pending)
        self._hand(link)

    def resend(self, rows: list[Pending], link: Link) -> None:
        """Publish sent messages again (a reader asked: see repair in :mod:`._live`), original payloads and ids."""
        self._queued.extend(rows)
        self._hand(link)

    def collect(self, link: Link) -> int:
        """Mark sent what the broker acknowledged, in order, and fill the window again; how many."""
        done = []
        while self._inflight and self._inflight[0][1].acked():
            done.append(self._inflight.popleft()[0])
        if done:
            self.peer.store.mark_sent(*done)
            self._hand(link)
        return len(done)

    def flush(self, link: Link) -> int:
        """Publish everything pending and wait for each acknowledgement (one-shot commands); how many
        were sent. A timeout raises with the rest still pending: the next sender sends them."""
        self.pull(link)
        sent = 0
        while self._inflight:
            link.wait_published(self._inflight[0][1])
            sent += self.collect(link)
        return sent

    def reset(self) -> None:
        """The link was lost: what it had not acknowledged is still pending in the store, sent again
        over the next link from the start."""
        self._inflight.clear()
        self._queued.clear()
        self._handed = 0

    def _hand(self, link: Link) -> None:
        """Publish queued rows while the window has room (mqttalk keeps its own window: paho's walks
        every message it holds on each PUBACK)."""
        queued, inflight = self._queued, self._inflight
        if not queued or len(inflight) >= WINDOW:
            return
        peer, meta = self.peer, self.peer.meta[0]
        with link.burst():
            while queued and len(inflight) < WINDOW:
                row = queued.popleft()
                inflight.append(
                    (row.n, link.publish(row.topic, peer.wrap(row.topic, row.payload), wait=False, meta=meta))
                )
