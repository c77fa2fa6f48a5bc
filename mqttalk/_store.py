"""The local store: SQLite in the state directory (WAL; safe for several mqttalk processes at once).

Per channel it keeps every message seen (de-duplicated by envelope id: QoS 1 may deliver twice),
a read cursor per local peer, the outbox of messages this machine's peers send (recorded before
they are published, marked sent only on PUBACK), per-sender sequence heads and the gaps they
reveal, and which pairings each local peer has been told about.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import ClassVar, NamedTuple

from pydantic import ValidationError

from ._wire import MAX_AHEAD, Envelope

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    n INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order
    channel TEXT NOT NULL,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT,
    kind TEXT NOT NULL,
    seq INTEGER,
    ts TEXT NOT NULL,
    raw BLOB NOT NULL,
    received REAL NOT NULL,
    UNIQUE (channel, id)
);
CREATE INDEX IF NOT EXISTS messages_by_channel ON messages (channel, n);
CREATE TABLE IF NOT EXISTS cursors (
    channel TEXT NOT NULL, peer TEXT NOT NULL,
    n INTEGER NOT NULL DEFAULT 0,       -- last message shown
    gap INTEGER NOT NULL DEFAULT 0,     -- last gap reported
    PRIMARY KEY (channel, peer)
);
CREATE TABLE IF NOT EXISTS outbox (       -- what this machine's peers send; also their history
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL, sender TEXT NOT NULL, seq INTEGER NOT NULL,
    id TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, kind TEXT NOT NULL, ts TEXT NOT NULL,
    created REAL NOT NULL,
    sent REAL,  -- no longer written: stores made before the unsent table (user_version 2) marked sends here
    UNIQUE (channel, sender, seq)
);
-- Outbox rows the broker has not acknowledged yet. A small table of its own: marking a message sent
-- deletes one short row here instead of rewriting the outbox row and its payload (9 us -> 1 us a message).
CREATE TABLE IF NOT EXISTS unsent (n INTEGER PRIMARY KEY);
DROP INDEX IF EXISTS outbox_pending;
DROP INDEX IF EXISTS outbox_unsent;
DROP INDEX IF EXISTS outbox_by_id;  -- each indexed entry cost every send ~4 us; lookups go by (channel, sender, seq)
CREATE TABLE IF NOT EXISTS heads (
    channel TEXT NOT NULL, sender TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (channel, sender)
);
CREATE TABLE IF NOT EXISTS gaps (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL, sender TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    found REAL NOT NULL
    -- (user_version 3) state: 'open' while the sender is asked to resend them (never shown), then
    -- 'gone' (the sender no longer has them) or 'silent' (it did not answer in time): shown as a GAP
);
CREATE TABLE IF NOT EXISTS floors (  -- per sender: the last seq it sent before this store's peer joined, and when
    channel TEXT NOT NULL, sender TEXT NOT NULL, seq INTEGER NOT NULL, joined TEXT NOT NULL,
    PRIMARY KEY (channel, sender)
);
CREATE TABLE IF NOT EXISTS answered (  -- the newest repair request of each peer this machine answered
    channel TEXT NOT NULL, asker TEXT NOT NULL, sender TEXT NOT NULL, ts TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (channel, asker, sender)
);
CREATE TABLE IF NOT EXISTS presence_seen (  -- the newest presence seen per peer: older ones are replays
    channel TEXT NOT NULL, peer TEXT NOT NULL, hb TEXT NOT NULL, raw BLOB NOT NULL,
    PRIMARY KEY (channel, peer)
);
CREATE TABLE IF NOT EXISTS nonces (    -- pairing challenges: our own (new at each join) and the latest seen of others
    channel TEXT NOT NULL, peer TEXT NOT NULL, nonce TEXT NOT NULL,
    PRIMARY KEY (channel, peer)
);
CREATE TABLE IF NOT EXISTS identities (  -- who this machine is in a channel: never on the wire
    channel TEXT NOT NULL, peer TEXT NOT NULL,
    member TEXT NOT NULL,  -- random id of the membership (in presence: tells a namesake from ourselves)
    secret BLOB NOT NULL,  -- random; the broker session's client id is derived from it (see Channel.client_id)
    PRIMARY KEY (channel, peer)
);
CREATE TABLE IF NOT EXISTS relayed (  -- no longer read: its rows do not say whose retained state held them
    channel TEXT NOT NULL, id TEXT NOT NULL, raw BLOB NOT NULL,
    PRIMARY KEY (channel, id)
);
CREATE TABLE IF NOT EXISTS relayed_from (  -- spec messages read from a member's retained contract state (_spec)
    channel TEXT NOT NULL, id TEXT NOT NULL,
    source TEXT NOT NULL,  -- the member whose state held it (spec/SOURCE); only its own messages count
    sender TEXT NOT NULL, raw BLOB NOT NULL,
    PRIMARY KEY (channel, id, source)
);
CREATE TABLE IF NOT EXISTS paired (
    channel TEXT NOT NULL, peer TEXT NOT NULL, other TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (channel, peer, other)
);
"""
MAX_JUMP = 1_000_000  # messages a presence may say were sent beyond what arrived (see expect)
_VERSION = 3  # PRAGMA user_version: 2 = unsent table, 3 = gaps.state


class Gap(NamedTuple):
    """Messages ``first``..``last`` from ``sender`` that never arrived, and why they are shown: the
    sender no longer has them (``gone``) or did not answer a request to resend them (``silent``)."""

    n: int
    sender: str
    first: int
    last: int
    state: str = "silent"


class Pending(NamedTuple):
    n: int
    id: str
    topic: str
    payload: bytes


_local = threading.local()
CHECKPOINT_AT = 4 * 1024 * 1024  # bytes of WAL past which a background thread copies it into the database
BACKSTOP_PAGES = 16384  # ... and past which (64 MiB at 4 KiB pages) a committing connection does it itself


class _Checkpointer:
    """Copies the WAL back into the database (a checkpoint: writes and an fsync) from a thread of its
    own, off the path of the connection that commits. SQLite otherwise checkpoints inside the COMMIT
    that crosses 1,000 pages: a sender paused there every few thousand messages. A passive checkpoint
    never blocks writers or readers; one cut short (the process exits) is finished by the next."""

    _all: ClassVar[dict[Path, _Checkpointer]] = {}
    _lock = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        self.wake = threading.Event()
        threading.Thread(target=self._run, name="mqttalk-checkpoint", daemon=True).start()

    @classmethod
    def poke(cls, path: Path) -> None:
        with cls._lock:
            worker = cls._all.get(path)
            if worker is None:
                worker = cls._all[path] = cls(path)
        worker.wake.set()

    def _run(self) -> None:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        while True:
            self.wake.wait()
            self.wake.clear()
            with suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # run to the end: no statement left open


class Store:
    @classmethod
    def shared(cls, path: Path) -> Store:
        """This thread's connection to the store at ``path``. Channels share it: a process holding
        hundreds of channels keeps one connection per thread, not hundreds, and a connection is never
        used by two threads at once (their transactions would interleave)."""
        stores: dict[Path, Store] | None = getattr(_local, "stores", None)
        if stores is None:
            stores = _local.stores = {}
        store = stores.get(path)
        if store is None:
            store = stores[path] = cls(path)
        return store

    def __init__(self, path: Path) -> None:
        from ._state import store_errors

        with store_errors(path):  # damaged, read-only, disk full: one line naming the file and what to do
            self._open(path)

    def _open(self, path: Path) -> None:
        from ._state import private_store

        private_store(path)  # the directory 0700, the database (and its -wal/-shm) 0600, whatever the umask
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
        self.db.executescript(_SCHEMA)
        self.path, self._wal = path, path.with_name(path.name + "-wal")
        if self.db.execute("PRAGMA user_version").fetchone()[0] < _VERSION:
            with self._tx() as db:  # once per store, whichever process gets there first
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version < 2:  # outbox.sent -> unsent
                    db.execute("INSERT OR IGNORE INTO unsent (n) SELECT n FROM outbox WHERE sent IS NULL")
                if version < 3:  # gaps found before repair existed are shown as before
                    db.execute("ALTER TABLE gaps ADD COLUMN state TEXT NOT NULL DEFAULT 'silent'")
                db.execute(f"PRAGMA user_version = {_VERSION}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the write lock up front (no upgrade deadlocks). Inside another
        one (see :meth:`transaction`) it is part of that one."""
        if self.db.in_transaction:
            yield self.db
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # SQLite ends it itself on some errors (a full disk)
                self.db.execute("ROLLBACK")
            raise
        with suppress(OSError):
            if self._wal.stat().st_size > CHECKPOINT_AT:
                _Checkpointer.poke(self.path)

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """One transaction for many writes (a reader's whole batch of incoming packets): each write
        costs a commit otherwise, and 10,000 presences were 10,000 commits."""
        return self._tx()

    # -- received messages -------------------------------------------------------------------------

    def add_many(self, channel: str, items: list[tuple[Envelope, bytes]]) -> list[Envelope]:
        """Store messages in one transaction; returns those that were new (not duplicates)."""
        new: list[Envelope] = []
        if not items:
            return new
        received = time.time()
        with self._tx() as db:
            floors = {
                sender: (seq, datetime.fromisoformat(joined))
                for sender, seq, joined in db.execute(
                    "SELECT sender, seq, joined FROM floors WHERE channel = ?", (channel,)
                )
            }
            for env, raw in items:
                floor = floors.get(env.sender)
                if floor and env.seq is not None and env.seq <= floor[0] and env.ts < floor[1]:
                    continue  # sent before this store's peer joined: not ours (see start_head)
                cur = db.execute(
                    "INSERT OR IGNORE INTO messages (channel, id, sender, recipient, kind, seq, ts, raw, received)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (channel, env.id, env.sender, env.to, env.kind, env.seq, _utc(env.ts), raw, received),
                )
                if cur.rowcount != 1:
                    continue
                new.append(env)
                if env.seq is not None and env.seq > 0:
                    self._track(db, channel, env.sender, env.seq)
        return new

    def _track(self, db: sqlite3.Connection, channel: str, sender: str, seq: int) -> None:
        row = db.execute("SELECT seq FROM heads WHERE channel = ? AND sender = ?", (channel, sender)).fetchone()
        head = int(row[0]) if row else 0
        if seq > head + MAX_JUMP:
            return  # not believed (see expect): stored, but it opens no gap of millions to ask for
        if seq > head + 1:
            db.execute(
                "INSERT INTO gaps (channel, sender, first, last, found, state) VALUES (?, ?, ?, ?, ?, 'open')",
                (channel, sender, head + 1, seq - 1, time.time()),
            )
        if seq > head:
            db.execute(
                "INSERT INTO heads (channel, sender, seq) VALUES (?, ?, ?)"
                " ON CONFLICT (channel, sender) DO UPDATE SET seq = excluded.seq",
                (channel, sender, seq),
            )
            return
        gap = db.execute(
            "SELECT n, first, last, found, state FROM gaps WHERE channel = ? AND sender = ?"
            " AND first <= ? AND last >= ?",
            (channel, sender, seq, seq),
        ).fetchone()
        if gap is None:
            if seq == 1:  # the sender started counting again (a new membership): follow it
                db.execute("UPDATE heads SET seq = 1 WHERE channel = ? AND sender = ?", (channel, sender))
            return
        n, first, last, found, state = gap  # a late (or resent) message fills (part of) a gap
        db.execute("DELETE FROM gaps WHERE n = ?", (n,))
        for lo, hi in ((first, seq - 1), (seq + 1, last)):
            if lo <= hi:  # an open piece keeps its age (its deadline); a shown one is shown again, smaller
                db.execute(
                    "INSERT INTO gaps (channel, sender, first, last, found, state) VALUES (?, ?, ?, ?, ?, ?)",
                    (channel, sender, lo, hi, found if state == "open" else time.time(), state),
                )

    def expect(self, channel: str, sender: str, seq: int) -> None:
        """``sender`` says it has sent up to ``seq``: anything after our head that never came is a gap (a
        claim of more than MAX_JUMP beyond it is not believed: a made-up peer's seq of 2^53 opened a gap
        of 2^53 messages to ask for and report)."""
        with self._tx() as db:
            row = db.execute("SELECT seq FROM heads WHERE channel = ? AND sender = ?", (channel, sender)).fetchone()
            head = int(row[0]) if row else 0
            if head < seq <= head + MAX_JUMP:
                db.execute(
                    "INSERT INTO gaps (channel, sender, first, last, found, state) VALUES (?, ?, ?, ?, ?, 'open')",
                    (channel, sender, head + 1, seq, time.time()),
                )
                db.execute(
                    "INSERT INTO heads (channel, sender, seq) VALUES (?, ?, ?)"
                    " ON CONFLICT (channel, sender) DO UPDATE SET seq = excluded.seq",
                    (channel, sender, seq),
                )

    def start_head(self, channel: str, sender: str, seq: int) -> None:
        """On joining: what ``sender`` sent before we were a member is not ours to miss, nor ours to read
        when it comes round again (a sender repairing an older member's gap sends to the whole channel)."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO heads (channel, sender, seq) VALUES (?, ?, ?)", (channel, sender, seq))
            if not db.execute(
                "SELECT 1 FROM messages WHERE channel = ? AND sender = ? LIMIT 1", (channel, sender)
            ).fetchone():  # (nothing of its here: this store joined now)
                db.execute(
                    "INSERT OR IGNORE INTO floors (channel, sender, seq, joined) VALUES (?, ?, ?, ?)",
                    (channel, sender, seq, _iso(time.time())),
                )

    def unread(self, channel: str, peer: str) -> list[tuple[int, Envelope]]:
        """Messages for ``peer`` (from others, to all or to it) after its cursor, in arrival order."""
        rows = self.db.execute(
            "SELECT n, raw FROM messages WHERE channel = ? AND n > ? AND sender != ?"
            " AND (recipient IS NULL OR recipient = ?) ORDER BY n",
            (channel, self._cursor(channel, peer)[0], peer, peer),
        ).fetchall()
        return [(n, env) for n, raw in rows if (env := _envelope(raw)) is not None]

    def unread_count(self, channel: str, peer: str) -> int:
        row = self.db.execute(
            "SELECT count(*) FROM messages WHERE channel = ? AND n > ? AND sender != ?"
            " AND (recipient IS NULL OR recipient = ?)",
            (channel, self._cursor(channel, peer)[0], peer, peer),
        ).fetchone()
        return int(row[0])

    def new_gaps(self, channel: str, peer: str) -> list[Gap]:
        """Gaps in other peers' sequences not yet reported to ``peer`` (open ones, being repaired, are not)."""
        rows = self.db.execute(
            "SELECT n, sender, first, last, state FROM gaps WHERE channel = ? AND n > ?"
            " AND sender != ? AND state != 'open' ORDER BY n",
            (channel, self._cursor(channel, peer)[1], peer),
        ).fetchall()
        return [Gap(*row) for row in rows]

    # -- repair ------------------------------------------------------------------------------------

    def open_gaps(self, channel: str) -> dict[str, list[tuple[int, int]]]:
        """Ranges of each sender's messages to ask for again, by sender: open gaps, and those shown after
        the sender did not answer in time (it may answer later: then they come after all)."""
        found: dict[str, list[tuple[int, int]]] = {}
        for sender, first, last in self.db.execute(
            "SELECT sender, first, last FROM gaps WHERE channel = ? AND state != 'gone' ORDER BY sender, first",
            (channel,),
        ):
            found.setdefault(str(sender), []).append((int(first), int(last)))
        return found

    def settle_gaps(
        self, channel: str, *, timeout: float, sender: str | None = None, gone: list[tuple[int, int]] | None = None
    ) -> None:
        """Gaps become shown ones: those of ``sender`` within ``gone`` (it no longer has them), and any
        open for longer than ``timeout`` seconds (no answer: ``silent``, still asked for). Each gets a
        new number, so a reader's gap cursor shows it once."""
        cutoff = time.time() - timeout
        with self._tx() as db:
            rows = db.execute(
                "SELECT n, sender, first, last, found, state FROM gaps WHERE channel = ? AND"
                " ((state = 'open' AND found < ?) OR (sender = ? AND state != 'gone'))",
                (channel, cutoff, sender),
            ).fetchall()
            for n, who, first, last, found, state in rows:
                rest = "silent" if state == "open" and found < cutoff else state
                marks = (gone or []) if who == sender else []
                pieces = [(lo, hi, rest if part == "open" else "gone") for lo, hi, part in _cut(first, last, marks)]
                if pieces == [(first, last, state)]:
                    continue
                db.execute("DELETE FROM gaps WHERE n = ?", (n,))
                for lo, hi, part in pieces:
                    db.execute(
                        "INSERT INTO gaps (channel, sender, first, last, found, state) VALUES (?, ?, ?, ?, ?, ?)",
                        (channel, who, lo, hi, found if part == "open" else time.time(), part),
                    )

    def sent_rows(
        self, channel: str, sender: str, ranges: list[tuple[int, int]], limit: int = 5000
    ) -> tuple[list[Pending], list[tuple[int, int]]]:
        """``sender``'s acknowledged outbox rows with a sequence number in ``ranges`` (to send again; at
        most ``limit``, the lowest first), and the ranges asked for that this store does not hold (never
        sent from here, or the store is newer), up to where the rows given stop. Work is bounded by the
        rows found, never by the width of a range: a range of 2^53 costs what its rows cost."""
        rows: list[Pending] = []
        gone: list[tuple[int, int]] = []
        for first, last in sorted(ranges):
            at = first
            for n, seq, msg_id, topic, payload in self.db.execute(
                "SELECT n, seq, id, topic, payload FROM outbox WHERE channel = ? AND sender = ? AND seq BETWEEN"
                " ? AND ? AND n NOT IN (SELECT n FROM unsent) ORDER BY seq LIMIT ?",
                (channel, sender, first, last, limit - len(rows) + 1),
            ):
                if len(rows) == limit:
                    return rows, gone  # the asker asks again for the rest
                if seq > at:
                    gone.append((at, seq - 1))
                rows.append(Pending(n, msg_id, topic, payload))
                at = seq + 1
            if at <= last:
                gone.append((at, last))
        return rows, gone

    def answer_once(self, channel: str, asker: str, sender: str, ts: str, *, every: float = 0.0) -> bool | None:
        """Record that ``sender`` answers ``asker``'s request stamped ``ts``: True; False if it already
        answered that one (or a newer); None if it answered another less than ``every`` seconds ago (ask
        again later: a member rewriting its note must not make a sender resend without pause)."""
        now_ = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT ts, at FROM answered WHERE channel = ? AND asker = ? AND sender = ?", (channel, asker, sender)
            ).fetchone()
            if row and row[0] >= ts:
                return False
            if row and now_ - row[1] < every:
                return None
            db.execute(
                "INSERT INTO answered (channel, asker, sender, ts, at) VALUES (?, ?, ?, ?, ?) ON CONFLICT"
                " (channel, asker, sender) DO UPDATE SET ts = excluded.ts, at = excluded.at",
                (channel, asker, sender, ts, now_),
            )
            return True

    def history(
        self,
        channel: str,
        *,
        peer: str | None = None,
        kind: str | None = None,
        since: str | None = None,
        limit: int | None = None,
    ) -> list[Envelope]:
        """Messages received and sent here, in the order they were written (their timestamps; arrival
        breaks ties); ``since`` is an ISO time or a message id (exclusive)."""
        where, args = "channel = ?", [channel]
        if peer:
            where += " AND sender = ?"
            args.append(peer)
        if kind:
            where += " AND kind = ?"
            args.append(kind)
        if since:  # (see _since: times come as `ts` is written, so strings compare as times)
            from ._since import FORMS, normalise

            since = normalise(since)
            mark = self.db.execute(
                "SELECT ts FROM messages WHERE channel = ? AND id = ? UNION ALL"
                " SELECT ts FROM outbox WHERE channel = ? AND id = ?",
                (channel, since, channel, since),
            ).fetchone()
            if mark is None and "+" not in since:  # not a time (those end in +00:00), and no message has that id
                from ._errors import UsageError

                raise UsageError(
                    f"--since {since!r} is not a time, nor the id of a message in this channel's history",
                    f"give {FORMS}",
                )
            where += " AND ts > ?" if mark else " AND ts >= ?"
            args.append(mark[0] if mark else since)
        rows = self.db.execute(
            f"SELECT raw, ts, n FROM messages WHERE {where} UNION ALL"  # noqa: S608 - only placeholders vary
            f" SELECT payload, ts, n FROM outbox WHERE {where}"
            # A local peer received it too: shown once. Only the same sender's message counts: another
            # peer reusing our id must not hide what we said (and put its own words in its place).
            " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.channel = ? AND m.id = outbox.id"
            " AND m.sender = outbox.sender)"
            " ORDER BY 2, 3",
            [*args, *args, channel],
        ).fetchall()
        if limit:
            rows = rows[-limit:]
        return [env for raw, _ts, _n in rows if (env := _envelope(raw)) is not None]

    def add_relayed(self, channel: str, source: str, envs: list[Envelope]) -> int:
        """Keep the spec messages of ``source`` that it relayed in its retained contract state (not
        messages of ours to read: they go into no sequence, no cursor); a message of anyone else in it
        is not kept. Returns how many were new."""
        rows = [(channel, env.id, source, env.sender, env.encode()) for env in envs if env.sender == source]
        if not rows:
            return 0
        with self._tx() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO relayed_from (channel, id, source, sender, raw) VALUES (?, ?, ?, ?, ?)", rows
            )
            return db.total_changes - before

    def specs(self, channel: str, me: str | None = None) -> list[Envelope]:
        """Every spec message of a channel known here: received, sent, and relayed (duplicates removed).
        A relayed one counts only if the member whose retained state held it sent it, and (``me``) never
        one that claims to be from ``me``: what we sent is in our own history."""
        envs = {env.id: env for env in self.history(channel, kind="spec")}
        rows = self.db.execute(
            "SELECT raw, source FROM relayed_from WHERE channel = ? AND sender = source AND source IS NOT ?",
            (channel, me),
        )
        for raw, source in rows:
            env = _envelope(raw)
            if env is not None and env.kind == "spec" and env.sender == source:
                envs.setdefault(env.id, env)
        return list(envs.values())

    def last_statuses(self, channel: str) -> list[Envelope]:
        """Each sender's newest status message (received or sent here)."""
        rows = self.db.execute(
            "SELECT raw FROM messages WHERE n IN (SELECT max(n) FROM messages WHERE channel = ? AND kind = 'status'"
            " GROUP BY sender) UNION ALL SELECT payload FROM outbox WHERE n IN (SELECT max(n) FROM outbox"
            " WHERE channel = ? AND kind = 'status' GROUP BY sender)",
            (channel, channel),
        ).fetchall()
        newest: dict[str, Envelope] = {}
        for (raw,) in rows:
            env = _envelope(raw)
            if env is not None and (env.sender not in newest or env.ts > newest[env.sender].ts):
                newest[env.sender] = env
        return sorted(newest.values(), key=lambda e: e.ts, reverse=True)

    def newer(self, channel: str, after: tuple[int, int], limit: int = 500) -> tuple[list[Envelope], tuple[int, int]]:
        """Messages written since ``after`` (the newest received row and the newest sent row seen: see
        :meth:`ends`), at most ``limit`` of each table in their order, and the marks to ask from next time.
        For a reader that follows the channel as it grows (`mqttalk watch`)."""
        got: list[Envelope] = []
        ends = list(after)
        queries = (
            ("SELECT n, raw FROM messages WHERE channel = ? AND n > ? ORDER BY n LIMIT ?", (channel, after[0], limit)),
            (
                "SELECT n, payload FROM outbox WHERE channel = ? AND n > ?"
                " AND id NOT IN (SELECT id FROM messages WHERE channel = ?) ORDER BY n LIMIT ?",
                (channel, after[1], channel, limit),
            ),
        )
        for i, (sql, args) in enumerate(queries):
            for n, raw in self.db.execute(sql, args).fetchall():
                ends[i] = max(ends[i], int(n))
                env = _envelope(raw)
                if env is not None:
                    got.append(env)
        got.sort(key=lambda env: env.ts)
        return got, (ends[0], ends[1])

    def message(self, channel: str, msg_id: str) -> Envelope | None:
        """One message of the channel by its id (received or sent here), or None."""
        row = self.db.execute(
            "SELECT raw FROM messages WHERE channel = ? AND id = ? UNION ALL"
            " SELECT payload FROM outbox WHERE channel = ? AND id = ? LIMIT 1",
            (channel, msg_id, channel, msg_id),
        ).fetchone()
        return _envelope(row[0]) if row else None

    def ends(self, channel: str) -> tuple[int, int]:
        """The newest received and sent row numbers of a channel (see :meth:`newer`)."""
        row = self.db.execute(
            "SELECT (SELECT coalesce(max(n), 0) FROM messages WHERE channel = ?),"
            " (SELECT coalesce(max(n), 0) FROM outbox WHERE channel = ?)",
            (channel, channel),
        ).fetchone()
        return int(row[0]), int(row[1])

    def gap_list(self, channel: str, limit: int = 200) -> list[tuple[Gap, float]]:
        """The channel's gaps, newest last, with when each was found: ``open`` ones are being repaired (the
        sender was asked to send them again), ``silent`` and ``gone`` ones are shown as GAP."""
        rows = self.db.execute(
            "SELECT n, sender, first, last, state, found FROM gaps WHERE channel = ? ORDER BY n DESC LIMIT ?",
            (channel, limit),
        ).fetchall()
        return [(Gap(n, sender, first, last, state), float(found)) for n, sender, first, last, state, found in rows][
            ::-1
        ]

    def marks(self, channel: str) -> tuple[int, int]:
        """The newest message and gap numbers of a channel (a new member's cursors start there)."""
        row = self.db.execute(
            "SELECT (SELECT coalesce(max(n), 0) FROM messages WHERE channel = ?),"
            " (SELECT coalesce(max(n), 0) FROM gaps WHERE channel = ?)",
            (channel, channel),
        ).fetchone()
        return int(row[0]), int(row[1])

    def cursor(self, channel: str, peer: str) -> tuple[int, int]:
        """Where ``peer``'s read cursors stand: the last message and gap numbers it has read."""
        return self._cursor(channel, peer)

    def _cursor(self, channel: str, peer: str) -> tuple[int, int]:
        row = self.db.execute("SELECT n, gap FROM cursors WHERE channel = ? AND peer = ?", (channel, peer)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def advance(self, channel: str, peer: str, n: int, gap: int = 0) -> None:
        """Move ``peer``'s cursors forward (never back: two readers may race)."""
        self.db.execute(
            "INSERT INTO cursors (channel, peer, n, gap) VALUES (?, ?, ?, ?) ON CONFLICT (channel, peer)"
            " DO UPDATE SET n = max(n, excluded.n), gap = max(gap, excluded.gap)",
            (channel, peer, n, gap),
        )

    # -- outbox ------------------------------------------------------------------------------------

    def enqueue(self, channel: str, sender: str, topic: str, envs: list[Envelope]) -> None:
        """Number ``envs`` with the sender's next sequence numbers (sets ``env.seq``) and record them in
        the outbox (which is also their sender's history), in one transaction: they exist here before
        they are published."""
        if not envs:
            return
        at = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT max(seq) FROM outbox WHERE channel = ? AND sender = ?", (channel, sender)
            ).fetchone()
            first = int(row[0] or 0) + 1
            for seq, env in enumerate(envs, first):
                env.seq = seq
            db.executemany(
                "INSERT INTO outbox (channel, sender, seq, id, topic, payload, kind, ts, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (channel, sender, env.seq, env.id, topic, env.encode(), env.kind, env.ts.isoformat(), at)
                    for env in envs
                ],
            )
            db.execute(
                "INSERT INTO unsent (n) SELECT n FROM outbox WHERE channel = ? AND sender = ? AND seq >= ?",
                (channel, sender, first),
            )

    def pending(self, channel: str, sender: str, after: int = 0) -> list[Pending]:
        """Outbox messages not yet acknowledged, in sequence order (``after``: only rows past that n)."""
        # CROSS JOIN makes SQLite start from the few unsent rows; left to itself it walks the sender's
        # whole history in the outbox (tests/test_delivery.py counts the steps).
        rows = self.db.execute(
            "SELECT o.n, o.id, o.topic, o.payload FROM unsent u CROSS JOIN outbox o ON o.n = u.n"
            " WHERE u.n > ? AND o.channel = ? AND o.sender = ? ORDER BY o.seq",
            (after, channel, sender),
        ).fetchall()
        return [Pending(*row) for row in rows]

    def mark_sent(self, *ns: int) -> None:
        """The broker acknowledged these outbox rows."""
        if ns:
            marks = ",".join("?" * len(ns))
            self.db.execute(f"DELETE FROM unsent WHERE n IN ({marks})", ns)  # noqa: S608

    def is_sent(self, channel: str, sender: str, seq: int | None) -> bool:
        """Whether the broker acknowledged ``sender``'s message ``seq`` (False if it is not in the outbox)."""
        row = self.db.execute(
            "SELECT n NOT IN (SELECT n FROM unsent) FROM outbox WHERE channel = ? AND sender = ? AND seq = ?",
            (channel, sender, seq),
        ).fetchone()
        return bool(row and row[0])

    def last_sent_seq(self, channel: str, sender: str) -> int:
        """The highest sequence number of ``sender``'s that the broker acknowledged (0: none)."""
        row = self.db.execute(
            "SELECT seq FROM outbox WHERE channel = ? AND sender = ? AND n NOT IN"
            " (SELECT n FROM unsent) ORDER BY seq DESC LIMIT 1",
            (channel, sender),
        ).fetchone()
        return int(row[0]) if row else 0

    # -- presence ----------------------------------------------------------------------------------

    def newest_presence(self, channel: str, peer: str, hb: str, raw: bytes) -> bytes | None:
        """Record ``peer``'s presence if it is the newest seen (by heartbeat time) and return None; else
        (a replayed, older presence) return the newest one seen. A remembered heartbeat from the future
        (a store written before presence times were checked at the wire) judges nothing."""
        with self._tx() as db:
            row = db.execute(
                "SELECT hb, raw FROM presence_seen WHERE channel = ? AND peer = ?", (channel, peer)
            ).fetchone()
            if row and row[0] == hb and bytes(row[1]) == raw:
                return None  # the same presence again (a retained one comes on every subscribe)
            if row and row[0] > hb and row[0] <= _iso(time.time() + MAX_AHEAD):
                return bytes(row[1])
            db.execute(
                "INSERT INTO presence_seen (channel, peer, hb, raw) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (channel, peer) DO UPDATE SET hb = excluded.hb, raw = excluded.raw",
                (channel, peer, hb, raw),
            )
            return None

    def known_presences(self, channel: str) -> dict[str, bytes]:
        """The newest presence seen of every peer of ``channel`` (its raw plaintext), by peer name."""
        rows = self.db.execute("SELECT peer, raw FROM presence_seen WHERE channel = ?", (channel,)).fetchall()
        return {str(peer): bytes(raw) for peer, raw in rows}

    # -- identity ----------------------------------------------------------------------------------

    def recorded_identity(self, channel: str, peer: str) -> tuple[str, bytes] | None:
        """This machine's membership of ``channel`` as ``peer`` (member id, secret), if it has one."""
        row = self.db.execute(
            "SELECT member, secret FROM identities WHERE channel = ? AND peer = ?", (channel, peer)
        ).fetchone()
        return (str(row[0]), bytes(row[1])) if row else None

    def identity(self, channel: str, peer: str, member: str | None = None) -> tuple[str, bytes]:
        """This machine's membership of ``channel`` as ``peer``: (member id, secret).

        ``member`` names the membership the caller holds (a binding's); a different one, or none
        recorded, mints a new secret (a new membership gets a broker session of its own). With
        ``member`` None the recorded membership is used, or a new one minted."""
        with self._tx() as db:
            row = db.execute(
                "SELECT member, secret FROM identities WHERE channel = ? AND peer = ?", (channel, peer)
            ).fetchone()
            if row and (member is None or row[0] == member):
                return str(row[0]), bytes(row[1])
            fresh = (member or os.urandom(16).hex(), os.urandom(32))
            db.execute(
                "INSERT INTO identities (channel, peer, member, secret) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (channel, peer) DO UPDATE SET member = excluded.member, secret = excluded.secret",
                (channel, peer, *fresh),
            )
            return fresh

    # -- pairing announcements ---------------------------------------------------------------------

    def mark_paired(self, channel: str, peer: str, other: str) -> bool:
        """Record that ``peer`` was told it paired with ``other``; False if it already was."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO paired (channel, peer, other, at) VALUES (?, ?, ?, ?)",
            (channel, peer, other, time.time()),
        )
        return cur.rowcount == 1

    def forget_paired(self, channel: str, peer: str, other: str) -> None:
        """``other`` left: a later rejoin is a new pairing worth announcing (and its challenge is void)."""
        with self._tx() as db:
            db.execute("DELETE FROM paired WHERE channel = ? AND peer = ? AND other = ?", (channel, peer, other))
            db.execute("DELETE FROM nonces WHERE channel = ? AND peer = ?", (channel, other))

    # -- pairing challenges ------------------------------------------------------------------------

    def nonce(self, channel: str, peer: str, *, renew: bool = False) -> str:
        """Local ``peer``'s pairing challenge; ``renew`` mints a new one (a join), voiding every answer
        to the old one, so each pairing this peer announces is proved afresh."""
        with self._tx() as db:
            row = (
                None
                if renew
                else db.execute("SELECT nonce FROM nonces WHERE channel = ? AND peer = ?", (channel, peer)).fetchone()
            )
            if row:
                return str(row[0])
            fresh = os.urandom(16).hex()
            db.execute(
                "INSERT INTO nonces (channel, peer, nonce) VALUES (?, ?, ?) ON CONFLICT (channel, peer)"
                " DO UPDATE SET nonce = excluded.nonce",
                (channel, peer, fresh),
            )
            db.execute("DELETE FROM paired WHERE channel = ? AND peer = ?", (channel, peer))
            return fresh

    def see_nonce(self, channel: str, peer: str, nonce: str) -> bool:
        """Record the challenge another peer's presence carries; True if it is new to us (answer it)."""
        cur = self.db.execute(
            "INSERT INTO nonces (channel, peer, nonce) VALUES (?, ?, ?) ON CONFLICT (channel, peer)"
            " DO UPDATE SET nonce = excluded.nonce WHERE nonce != excluded.nonce",
            (channel, peer, nonce),
        )
        return cur.rowcount == 1

    def answers(self, channel: str, peer: str, limit: int = 64) -> dict[str, str]:
        """The challenges of the other peers of ``channel`` that ``peer`` answers in its presence."""
        rows = self.db.execute(
            "SELECT peer, nonce FROM nonces WHERE channel = ? AND peer != ? ORDER BY rowid DESC LIMIT ?",
            (channel, peer, limit),
        )
        return {str(p): str(n) for p, n in rows}


def _cut(first: int, last: int, gone: list[tuple[int, int]]) -> list[tuple[int, int, str]]:
    """The range first..last in pieces: those inside a ``gone`` range marked gone, the rest still open."""
    marks = sorted((max(first, lo), min(last, hi)) for lo, hi in gone if lo <= last and hi >= first)
    pieces: list[tuple[int, int, str]] = []
    at = first
    for lo, hi in marks:
        if lo > at:
            pieces.append((at, lo - 1, "open"))
        if hi >= at:
            pieces.append((max(lo, at), hi, "gone"))
            at = hi + 1
    if at <= last:
        pieces.append((at, last, "open"))
    return pieces


def _envelope(raw: bytes) -> Envelope | None:
    """A stored message; None for a row an older mqttalk stored before it checked every field at the wire."""
    try:
        return Envelope.model_validate_json(raw)
    except (ValidationError, ValueError):
        return None


def _iso(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds")


def _utc(ts: datetime) -> str:
    """A message time as the store keeps it: UTC, so times written with other offsets sort and compare
    (``log --since``, history order) as the instants they are."""
    from datetime import UTC

    return ts.astimezone(UTC).isoformat()
