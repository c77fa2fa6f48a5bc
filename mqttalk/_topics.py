"""Channel + peer -> topic names and client ids. The one place they are built."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from ._errors import UsageError

_PEER_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def check_peer(name: str) -> str:
    """A peer name is a topic level too: lowercase letters, digits, - and _, 1-32 long."""
    if not _PEER_RE.match(name):
        raise UsageError(f"peer name {name!r} is not valid",
                         "use 1-32 of a-z 0-9 - _, starting with a letter or digit, e.g. --as impl")
    return name


def peer_from_directory(path: str) -> str:
    """A default peer name from a directory name ("My API" -> "my-api")."""
    name = re.sub(r"[^a-z0-9_-]+", "-", path.lower()).strip("-_")[:32]
    return name if name and _PEER_RE.match(name) else "peer"


@dataclass(frozen=True)
class Topics:
    """Topic names under PREFIX/CHANNEL."""

    prefix: str
    channel: str

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.channel}"

    def presence(self, peer: str) -> str:
        """Retained: who PEER is and whether it is there."""
        return f"{self.root}/presence/{peer}"

    @property
    def all_presence(self) -> str:
        return f"{self.root}/presence/+"

    def msg(self, peer: str) -> str:
        """QoS 1: the messages PEER sends."""
        return f"{self.root}/msg/{peer}"

    @property
    def all_msg(self) -> str:
        return f"{self.root}/msg/+"

    def sync(self, client_id: str) -> str:
        """A marker a reader sends itself: once it comes back, the broker's backlog has been delivered."""
        return f"{self.root}/sync/{client_id}"

    def split(self, topic: str) -> tuple[str, str] | None:
        """(section, peer) for a topic of this channel, e.g. ("msg", "impl"); None for anything else."""
        head = self.root + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        return (parts[0], parts[1]) if len(parts) == 2 else None

    def client_id(self, peer: str) -> str:
        """The stable client id of PEER's persistent broker session (23 chars: fits MQTT 3.1.1's minimum)."""
        digest = hashlib.sha256(f"{self.root}\n{peer}".encode()).digest()
        return "mqk" + base64.b32encode(digest).decode().lower()[:20]
