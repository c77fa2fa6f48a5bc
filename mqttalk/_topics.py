"""Channel + peer -> topic names and client ids. The one place they are built."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._errors import UsageError

if TYPE_CHECKING:
    from ._seal import Seal

_PEER_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def check_peer(name: str) -> str:
    """A peer name is a topic level too: lowercase letters, digits, - and _, 1-32 long."""
    if not _PEER_RE.match(name):
        raise UsageError(
            f"peer name {name!r} is not valid",
            "use 1-32 of a-z 0-9 - _, starting with a letter or digit, e.g. --as impl",
        )
    return name


def peer_from_directory(path: str) -> str:
    """A default peer name from a directory name ("My API" -> "my-api")."""
    name = re.sub(r"[^a-z0-9_-]+", "-", path.lower()).strip("-_")[:32]
    return name if name and _PEER_RE.match(name) else "peer"


@dataclass(frozen=True)
class Topics:
    """Topic names under PREFIX/CHANNEL. On a sealed channel the channel and peer levels are keyed
    hashes (see :mod:`._seal`): topics name nothing the broker could read."""

    prefix: str
    channel: str
    seal: Seal | None = field(default=None, compare=False)

    @property
    def root(self) -> str:
        level = self.seal.name(f"channel:{self.channel}") if self.seal else self.channel
        return f"{self.prefix}/{level}"

    def level(self, peer: str) -> str:
        """The topic level that stands for ``peer``."""
        return self.seal.name(f"peer:{peer}", 16) if self.seal else peer

    def presence(self, peer: str) -> str:
        """Retained: who PEER is and whether it is there."""
        return f"{self.root}/presence/{self.level(peer)}"

    @property
    def all_presence(self) -> str:
        return f"{self.root}/presence/+"

    @property
    def roster(self) -> str:
        """Retained: the names of the channel's members, at a topic every broker answers an exact
        subscription to with its retained message (RabbitMQ gives none to a wildcard one)."""
        return f"{self.root}/roster"

    def spec(self, peer: str) -> str:
        """Retained: PEER's copy of the channel's spec messages (see :class:`~._wire.ContractState`)."""
        return f"{self.root}/spec/{self.level(peer)}"

    @property
    def all_spec(self) -> str:
        return f"{self.root}/spec/+"

    def msg(self, peer: str) -> str:
        """QoS 1: the messages PEER sends."""
        return f"{self.root}/msg/{self.level(peer)}"

    @property
    def all_msg(self) -> str:
        return f"{self.root}/msg/+"

    def sync(self, client_id: str) -> str:
        """A marker a reader sends itself: once it comes back, the broker's backlog has been delivered.
        Its level is a hash of the client id: a topic anyone can see must not tell the id itself."""
        digest = hashlib.sha256(f"mqttalk sync\n{client_id}".encode()).digest()
        return f"{self.root}/sync/{base64.b32encode(digest).decode().lower()[:20]}"

    def repair(self, to: str, sender: str) -> str:
        """Retained, written by SENDER for TO only: which of TO's messages it misses (and which of its own
        that TO asked for are gone). One per pair of peers, replaced as it changes."""
        return f"{self.root}/repair/{self.level(to)}/{self.level(sender)}"

    def repairs_for(self, peer: str) -> str:
        return f"{self.root}/repair/{self.level(peer)}/+"

    def split(self, topic: str) -> tuple[str, str] | None:
        """(section, peer level) for a topic of this channel, e.g. ("msg", "impl"); for a repair note
        the level of its writer; None for anything else."""
        head = self.root + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) == 3 and parts[0] == "repair":
            return ("repair:" + parts[1], parts[2])
        return (parts[0], parts[1]) if len(parts) == 2 else None

    def client_id(self, peer: str, secret: bytes) -> str:
        """The client id of PEER's persistent broker session (23 chars: fits MQTT 3.1.1's minimum).

        Derived from a secret only this member holds (minted when it joined, kept in its local store)
        and never sent anywhere: nobody else, stranger or fellow member, can compute it, connect
        with it, and take the session and the messages queued in it."""
        digest = hmac.new(secret, f"mqttalk client\n{self.channel}\n{peer}".encode(), hashlib.sha256).digest()
        return "mqk" + base64.b32encode(digest).decode().lower()[:20]
