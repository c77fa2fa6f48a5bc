"""Keep the embedded broker's sessions, offline queues and retained messages across restarts.

amqtt keeps all of these in memory: stopping the broker would forget every peer's session, and a
message sent to a peer while the broker was down and back up would find nobody subscribed. This
plugin writes them to SQLite (stdlib, one small write per event) and restores them on start.

amqtt's own ``SessionDBPlugin`` needs SQLAlchemy, clears everything on a normal shutdown by default,
never forgets a queued message once delivered (so it would redeliver it after every restart), and
adds a subscription row per re-subscribe. This one avoids those.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import BrokerContext, RetainedApplicationMessage
from amqtt.plugins.base import BasePlugin
from amqtt.session import Session

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (client_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS subscriptions (
    client_id TEXT NOT NULL, topic TEXT NOT NULL, qos INTEGER NOT NULL, PRIMARY KEY (client_id, topic)
);
CREATE TABLE IF NOT EXISTS queued (
    n INTEGER PRIMARY KEY AUTOINCREMENT, client_id TEXT NOT NULL, topic TEXT NOT NULL,
    data BLOB NOT NULL, qos INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, data BLOB NOT NULL, qos INTEGER NOT NULL);
"""


class SQLitePersistencePlugin(BasePlugin[BrokerContext]):
    """Persist persistent (clean_session=False) sessions, their queues, and retained messages."""

    @dataclass
    class Config:
        file: str = "mqttalk-broker.sqlite3"
        """Where the database lives; mqttalk puts it in its state directory."""

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        path = Path(self.config.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def _persistent(self, client_id: str) -> Session | None:
        session = self.context.get_session(client_id)
        if session is None or session.clean_session in (None, True) or session.is_anonymous:
            return None
        return session

    async def on_broker_client_connected(self, client_id: str, client_session: Session) -> None:
        if client_session.clean_session in (None, True):
            self._forget(client_id)  # a clean start discards the old session
            return
        # The broker now hands this session its queued messages: they leave our keeping.
        self.db.execute("INSERT OR IGNORE INTO sessions (client_id) VALUES (?)", (client_id,))
        self.db.execute("DELETE FROM queued WHERE client_id = ?", (client_id,))

    async def on_broker_client_subscribed(self, client_id: str, topic: str, qos: int) -> None:
        if self._persistent(client_id) is not None:
            self.db.execute("INSERT INTO subscriptions (client_id, topic, qos) VALUES (?, ?, ?)"
                            " ON CONFLICT (client_id, topic) DO UPDATE SET qos = excluded.qos", (client_id, topic, qos))

    async def on_broker_client_unsubscribed(self, client_id: str, topic: str) -> None:
        self.db.execute("DELETE FROM subscriptions WHERE client_id = ? AND topic = ?", (client_id, topic))

    async def on_broker_retained_message(self, *, client_id: str | None,
                                         retained_message: RetainedApplicationMessage) -> None:
        msg = retained_message
        if client_id is not None:  # queued for a session that is offline
            self.db.execute("INSERT INTO queued (client_id, topic, data, qos) VALUES (?, ?, ?, ?)",
                            (client_id, msg.topic, bytes(msg.data), msg.qos or 0))
        elif msg.data:
            self.db.execute("INSERT INTO retained (topic, data, qos) VALUES (?, ?, ?) ON CONFLICT (topic)"
                            " DO UPDATE SET data = excluded.data, qos = excluded.qos",
                            (msg.topic, bytes(msg.data), msg.qos or 0))
        else:
            self.db.execute("DELETE FROM retained WHERE topic = ?", (msg.topic,))

    async def on_broker_post_start(self) -> None:
        for topic, data, qos in self.db.execute("SELECT topic, data, qos FROM retained").fetchall():
            self.context.retained_messages[topic] = RetainedApplicationMessage(None, topic, data, qos)
        for (client_id,) in self.db.execute("SELECT client_id FROM sessions").fetchall():
            await self.context.add_subscription(client_id, None, None)
            subs = self.db.execute("SELECT topic, qos FROM subscriptions WHERE client_id = ?", (client_id,))
            for topic, qos in subs.fetchall():
                await self.context.add_subscription(client_id, topic, qos)
            session = self.context.get_session(client_id)
            if session is None:
                continue
            session.clean_session = False
            queued = self.db.execute("SELECT topic, data, qos FROM queued WHERE client_id = ? ORDER BY n",
                                     (client_id,))
            for topic, data, qos in queued.fetchall():
                await session.retained_messages.put(RetainedApplicationMessage(None, topic, data, qos))

    async def on_broker_post_shutdown(self) -> None:
        self.db.close()

    def _forget(self, client_id: str) -> None:
        for table in ("sessions", "subscriptions", "queued"):
            self.db.execute(f"DELETE FROM {table} WHERE client_id = ?", (client_id,))  # noqa: S608

    def __repr__(self) -> str:
        return f"SQLitePersistencePlugin({self.config.file!r})"


__all__: list[Any] = ["SQLitePersistencePlugin"]
