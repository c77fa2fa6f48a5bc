"""The wire format: the message envelope, its typed kinds, and presence. The one place it lives.

Tolerant reader, strict writer: decoding keeps unknown fields and unknown kinds from newer peers;
encoding writes only what this version knows, after validating a kind's typed ``data``.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._errors import BadMessage

WIRE_VERSION = 1
MAX_PAYLOAD = 256 * 1024  # bytes on the wire; public brokers cap packets at 1-2 MB, keep far below
KINDS = ("note", "spec", "status", "question", "answer")
SpecState = Literal["proposed", "agreed", "rejected"]
StatusState = Literal["red", "green", "blocked", "working", "done"]
PresenceState = Literal["joined", "online", "away", "left"]


class SpecData(BaseModel):
    """Typed fields of a ``spec``: what it specifies, its revision, and where the negotiation stands."""

    model_config = ConfigDict(extra="allow")

    subject: str = Field(min_length=1, max_length=200, description='what the spec is about, e.g. "POST /users"')
    rev: int = Field(1, ge=1, description="revision; bump it when you change the proposal")
    state: SpecState = Field("proposed", description="proposed, agreed or rejected")


class StatusData(BaseModel):
    """Typed fields of a ``status``: the state of the sender's work."""

    model_config = ConfigDict(extra="allow")

    state: StatusState = Field(description="red, green, blocked, working or done")
    commit: str | None = Field(None, max_length=64, description="git commit the status refers to")


DATA_MODELS: dict[str, type[BaseModel]] = {"spec": SpecData, "status": StatusData}


class Envelope(BaseModel):
    """One message, as it travels (JSON)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    v: int = WIRE_VERSION
    id: str = Field(min_length=1, max_length=64)
    ts: datetime
    sender: str = Field(alias="from", min_length=1, max_length=64)
    to: str | None = None
    kind: str = Field(min_length=1, max_length=32)
    re: str | None = Field(None, max_length=64)
    seq: int | None = None
    body: str = ""
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def known_kind(self) -> bool:
        return self.kind in KINDS

    def typed(self) -> BaseModel | None:
        """The kind's typed data, or None for kinds without one (or data a newer peer shaped differently)."""
        model = DATA_MODELS.get(self.kind)
        if model is None:
            return None
        try:
            return model.model_validate(self.data)
        except ValidationError:
            return None

    def summary(self) -> str:
        """Short key=value facts from the typed data (for one-line headers)."""
        typed = self.typed()
        if isinstance(typed, SpecData):
            return f"subject={typed.subject!r} rev={typed.rev} state={typed.state}"
        if isinstance(typed, StatusData):
            return f"state={typed.state}" + (f" commit={typed.commit}" if typed.commit else "")
        return ""

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


class Presence(BaseModel):
    """A peer's retained presence: who it is and whether it is there."""

    model_config = ConfigDict(extra="allow")

    v: int = WIRE_VERSION
    peer: str
    role: str | None = None
    state: PresenceState
    member: str = Field(description="random id of this membership, to tell a namesake from ourselves")
    since: datetime = Field(description="when the state began")
    hb: datetime = Field(description="last heartbeat: when the peer last did anything")
    client: str | None = None
    seq: int | None = Field(None, description="highest message sequence number the peer has sent")
    every: float | None = Field(None, description="seconds between heartbeats while online")
    nonce: str | None = Field(None, description="this peer's pairing challenge, new each time it joins")
    answers: dict[str, str] | None = Field(
        None, description="the challenges of the other peers this one has seen, by peer name: its proof of "
        "holding the channel key now (it can only have seen them by opening their sealed presence)")

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    def answers_for(self, peer: str, nonce: str) -> bool:
        """Whether this presence answers ``peer``'s current challenge."""
        return bool(self.answers) and self.answers.get(peer) == nonce  # type: ignore[union-attr]


def new_envelope(sender: str, kind: str, body: str, *, data: dict[str, Any] | None = None,
                 to: str | None = None, re: str | None = None, seq: int | None = None) -> Envelope:
    """Build a message to send, validating it strictly (raises :class:`BadMessage`)."""
    if kind not in KINDS:
        raise BadMessage(f"unknown kind {kind!r}", f"use one of: {', '.join(KINDS)}")
    data = {k: v for k, v in (data or {}).items() if v is not None}
    if not body.strip() and not data:
        raise BadMessage("empty message", "give the text as an argument, with --file PATH, or '-' for stdin")
    if kind == "answer" and not re:
        raise BadMessage("an answer needs --re ID (the id of the question it answers)")
    model = DATA_MODELS.get(kind)
    if model is not None:
        try:
            data = model.model_validate(data).model_dump(mode="json", exclude_none=True)
        except ValidationError as exc:
            raise BadMessage(f"{kind} fields are not valid: {_first_error(exc)}") from None
    elif data:
        raise BadMessage(f"a {kind} takes no typed fields (got {', '.join(sorted(data))})")
    env = Envelope(id=uuid7(), ts=now(), sender=sender, to=to, kind=kind, re=re, seq=seq, body=body, data=data)
    # JSON escapes a character into at most 6 bytes: only a large message needs encoding to be measured.
    if (len(body) + len(str(data))) * 6 + 1024 > MAX_PAYLOAD and (size := len(env.encode())) > MAX_PAYLOAD:
        raise BadMessage(
            f"message is {size} bytes, over the {MAX_PAYLOAD} byte limit",
            "send a path or a summary instead of the whole file",
        )
    return env


def decode_envelope(payload: bytes) -> Envelope | None:
    """An envelope from wire bytes, or None if the payload is not one (never raises)."""
    if len(payload) > MAX_PAYLOAD:
        return None
    try:
        return Envelope.model_validate_json(payload)
    except (ValidationError, ValueError):
        return None


def decode_presence(payload: bytes) -> Presence | None:
    if not payload or len(payload) > 16 * 1024:
        return None
    try:
        return Presence.model_validate_json(payload)
    except (ValidationError, ValueError):
        return None


def now() -> datetime:
    return datetime.now(UTC)


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then randomness, so ids sort by creation time."""
    rand = int.from_bytes(os.urandom(10), "big") & 0x0FFF_3FFF_FFFF_FFFF_FFFF  # room for version and variant
    h = ((time.time_ns() // 1_000_000) << 80 | 0x7000_8000_0000_0000_0000 | rand).to_bytes(16, "big").hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "value"
    return f"{where}: {err['msg']}"


def encode_roster(peers: set[str]) -> bytes:
    return json.dumps({"peers": sorted(peers)}, separators=(",", ":")).encode()


def decode_roster(payload: bytes) -> set[str]:
    """The member names of a roster payload; anything malformed reads as no names."""
    from ._topics import _PEER_RE

    try:
        peers = json.loads(payload)["peers"] if len(payload) <= 64 * 1024 else []
    except (ValueError, TypeError, KeyError):
        return set()
    return {p for p in peers if isinstance(p, str) and _PEER_RE.match(p)} if isinstance(peers, list) else set()
