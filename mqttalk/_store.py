"""The local store: SQLite in the state directory (WAL, safe for several mqttalk processes at once).

Per channel it keeps every message seen (de-duplicated by envelope id: QoS 1 may deliver twice),
a read cursor per local peer, and which peers each local peer has already been told it paired with.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from ._wire import Envelope

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    n INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order
    channel TEXT NOT NULL,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT,
    kind TEXT NOT NULL,
    ts TEXT NOT NULL,
    raw BLOB NOT NULL,
    received REAL NOT NULL,
    UNIQUE (channel, id)
);
CREATE TABLE IF NOT EXISTS cursors (
    channel TEXT NOT NULL, peer TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (channel, peer)
);
CREATE TABLE IF NOT EXISTS paired (
    channel TEXT NOT NULL, peer TEXT NOT NULL, other TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (channel, peer, other)
);
"""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def add(self, channel: str, env: Envelope, raw: bytes) -> bool:
        """Store a message; False if it was already there (a duplicate delivery)."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO messages (channel, id, sender, recipient, kind, ts, raw, received)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (channel, env.id, env.sender, env.to, env.kind, env.ts.isoformat(), raw, time.time()),
        )
        return cur.rowcount == 1

    def unread(self, channel: str, peer: str) -> list[tuple[int, Envelope]]:
        """Messages for ``peer`` (from others, to all or to it) after its cursor, in arrival order."""
        rows = self.db.execute(
            "SELECT n, raw FROM messages WHERE channel = ? AND n > ? AND sender != ?"
            " AND (recipient IS NULL OR recipient = ?) ORDER BY n",
            (channel, self.cursor(channel, peer), peer, peer),
        ).fetchall()
        return [(n, Envelope.model_validate_json(raw)) for n, raw in rows]

    def unread_count(self, channel: str, peer: str) -> int:
        row = self.db.execute(
            "SELECT count(*) FROM messages WHERE channel = ? AND n > ? AND sender != ?"
            " AND (recipient IS NULL OR recipient = ?)",
            (channel, self.cursor(channel, peer), peer, peer),
        ).fetchone()
        return int(row[0])

    def cursor(self, channel: str, peer: str) -> int:
        row = self.db.execute("SELECT n FROM cursors WHERE channel = ? AND peer = ?", (channel, peer)).fetchone()
        return int(row[0]) if row else 0

    def advance(self, channel: str, peer: str, n: int) -> None:
        """Move ``peer``'s cursor forward to ``n`` (never back: two readers may race)."""
        self.db.execute(
            "INSERT INTO cursors (channel, peer, n) VALUES (?, ?, ?)"
            " ON CONFLICT (channel, peer) DO UPDATE SET n = max(n, excluded.n)",
            (channel, peer, n),
        )

    def mark_paired(self, channel: str, peer: str, other: str) -> bool:
        """Record that ``peer`` was told it paired with ``other``; False if it already was."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO paired (channel, peer, other, at) VALUES (?, ?, ?, ?)",
            (channel, peer, other, time.time()),
        )
        return cur.rowcount == 1

    def forget_paired(self, channel: str, peer: str, other: str) -> None:
        """``other`` left: a later rejoin is a new pairing worth announcing."""
        self.db.execute("DELETE FROM paired WHERE channel = ? AND peer = ? AND other = ?", (channel, peer, other))
