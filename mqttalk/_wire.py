"""The wire format: the message envelope, its typed kinds, and presence. The one place it lives.

Tolerant reader, strict writer: decoding keeps unknown fields and unknown kinds from newer peers;
encoding writes only what this version knows, after validating a kind's typed ``data``.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ._errors import BadMessage

WIRE_VERSION = 2  # 2: members' session ids are secret, peers repair each other's gaps (see _repair.py)
MAX_PAYLOAD = 256 * 1024  # bytes on the wire; public brokers cap packets at 1-2 MB, keep far below
MAX_SEQ = 2**53  # sequence numbers a peer can reach in practice (and JSON numbers hold exactly)
MAX_AGE = 8 * 24 * 3600.0  # s: a message or presence older than this (past 7-day session expiries) is a replay
MAX_AHEAD = 600.0  # s: ... and one stamped this far in the future is forged or from a broken clock

# Every value a peer controls is checked here, where bytes become values: nothing past this border can
# raise on it later (an int too large for SQLite, a name with an escape sequence, a heartbeat in year 9999).
PeerName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
MessageId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
KindName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
Token = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Text = Annotated[str, StringConstraints(max_length=200)]
MAX_ANSWERS = 64  # challenges a presence answers at most
MAX_RANGES = 64  # sequence ranges a repair note names at most
KINDS = ("note", "spec", "status", "question", "answer")
SpecState = Literal["proposed", "agreed", "rejected"]
SpecAction = Literal["propose", "agree", "reject", "withdraw"]
Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
MAX_NEEDS = 64  # members a proposal names as the ones whose agreement it needs, at most
MAX_SPECS = 512  # spec messages one peer's retained contract state carries at most
StatusState = Literal["red", "green", "blocked", "working", "done"]
PresenceState = Literal["joined", "online", "away", "left"]


class SpecData(BaseModel):
    """Typed fields of a ``spec``: what it specifies, its revision, and where the negotiation stands."""

    model_config = ConfigDict(extra="allow")

    subject: str = Field(min_length=1, max_length=200, description='what the spec is about, e.g. "POST /users"')
    rev: int = Field(1, ge=1, le=1_000_000, description="revision; bump it when you change the proposal")
    state: SpecState = Field("proposed", description="proposed, agreed or rejected")
    # (wire v2, added by `mqttalk spec`; optional, so `send --kind spec` messages and older readers still fit)
    action: SpecAction | None = Field(
        None, description="what `mqttalk spec` did: propose, agree, reject or withdraw (withdraw reads as rejected)"
    )
    digest: Digest | None = Field(
        None, description="sha256 (hex) of the exact text of the revision proposed, agreed to or rejected"
    )
    needs: list[PeerName] | None = Field(
        None, max_length=MAX_NEEDS, description="propose: the members whose agreement the revision needs"
    )


class StatusData(BaseModel):
    """Typed fields of a ``status``: the state of the sender's work."""

    model_config = ConfigDict(extra="allow")

    state: StatusState = Field(description="red, green, blocked, working or done")
    commit: str | None = Field(
        None, pattern=r"^[\x21-\x7e]{1,64}$", description="git commit the status refers to (printable ASCII, no spaces)"
    )
    spec: str | None = Field(None, min_length=1, max_length=200, description="the spec subject the result is against")
    rev: int | None = Field(None, ge=1, le=1_000_000, description="... and its revision")


DATA_MODELS: dict[str, type[BaseModel]] = {"spec": SpecData, "status": StatusData}


class Envelope(BaseModel):
    """One message, as it travels (JSON)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    v: int = Field(WIRE_VERSION, ge=1, le=1000)
    id: MessageId
    ts: AwareDatetime
    sender: PeerName = Field(alias="from")
    to: PeerName | None = None
    kind: KindName
    re: MessageId | None = None
    seq: int | None = Field(None, ge=1, le=MAX_SEQ)
    body: str = Field("", max_length=MAX_PAYLOAD)
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
            return (
                f"state={typed.state}"
                + (f" commit={typed.commit}" if typed.commit else "")
                + (f" spec={typed.spec!r} rev={typed.rev}" if typed.spec and typed.rev else "")
            )
        return ""

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


class Presence(BaseModel):
    """A peer's retained presence: who it is and whether it is there."""

    model_config = ConfigDict(extra="allow")

    v: int = Field(WIRE_VERSION, ge=1, le=1000)
    peer: PeerName
    role: Text | None = None
    state: PresenceState
    member: Token = Field(description="random id of this membership, to tell a namesake from ourselves")
    since: AwareDatetime = Field(description="when the state began")
    hb: AwareDatetime = Field(description="last heartbeat: when the peer last did anything")
    client: Text | None = None
    seq: int | None = Field(None, ge=0, le=MAX_SEQ, description="highest message sequence number the peer has sent")
    every: float | None = Field(None, ge=0.2, le=3600, description="seconds between heartbeats while online")
    nonce: Token | None = Field(None, description="this peer's pairing challenge, new each time it joins")
    answers: dict[PeerName, Token] | None = Field(
        None,
        max_length=MAX_ANSWERS,
        description="the challenges of the other peers this one has seen, by peer name: its proof of "
        "holding the channel key now (it can only have seen them by opening their sealed presence)",
    )

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    def answers_for(self, peer: str, nonce: str) -> bool:
        """Whether this presence answers ``peer``'s current challenge."""
        return bool(self.answers) and self.answers.get(peer) == nonce  # type: ignore[union-attr]


Seq = Annotated[int, Field(ge=1, le=MAX_SEQ)]


class ContractState(BaseModel):
    """A member's copy of the channel's spec messages, retained at ``spec/FROM`` (sealed like presence),
    so a peer that joins after a negotiation still sees each subject's revisions and agreements. Every
    member keeps its own; a reader takes the union, checking each message as if it had come on its own."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    v: int = Field(WIRE_VERSION, ge=1, le=1000)
    sender: PeerName = Field(alias="from")
    ts: AwareDatetime
    specs: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_SPECS)

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


CONTRACT_BUDGET = 128 * 1024  # bytes of spec messages one contract state carries (sealed and padded: under MAX_PAYLOAD)


def contract_item_size(env: Envelope) -> int:
    """The bytes ``env`` takes of a contract state's budget."""
    return (
        len(json.dumps(env.model_dump(mode="json", by_alias=True, exclude_none=True), ensure_ascii=False).encode()) + 1
    )


def encode_contract(
    sender: str, envs: list[Envelope], budget: int = CONTRACT_BUDGET, first: frozenset[str] = frozenset()
) -> bytes:
    """``sender``'s contract state: of ``envs``, those whose ids are in ``first`` (what must never be
    dropped), then the newest of the others, as many as fit in ``budget`` bytes (at most MAX_SPECS)."""
    chosen: list[Envelope] = []
    size = 0
    newest = sorted(envs, key=lambda e: (e.ts, e.id), reverse=True)
    for env in [e for e in newest if e.id in first] + [e for e in newest if e.id not in first]:
        if len(chosen) >= MAX_SPECS:
            break
        n = contract_item_size(env)
        if size + n <= budget:
            chosen.append(env)
            size += n
    chosen.sort(key=lambda e: (e.ts, e.id))
    items = [env.model_dump(mode="json", by_alias=True, exclude_none=True) for env in chosen]
    return ContractState(sender=sender, ts=now(), specs=items).encode()


def decode_contract(payload: bytes, *, at: datetime) -> tuple[ContractState, list[Envelope]] | None:
    """A retained contract state from wire bytes and the spec messages in it that pass every check an
    envelope on its own would (kind spec, typed fields valid, not stamped in the future); None if the
    state itself is malformed, too big or stamped outside the time window (never raises)."""
    state = _parse(ContractState, payload, MAX_PAYLOAD)
    if state is None or not in_window(state.ts, at):
        return None
    envs: list[Envelope] = []
    for item in state.specs:
        try:
            env = Envelope.model_validate(item)
        except (ValidationError, ValueError, TypeError):
            continue
        if (
            env.kind == "spec"
            and isinstance(env.typed(), SpecData)
            and _not_ahead(env.ts, at)
            and plausible_past(env.ts)
        ):
            envs.append(env)
    return state, envs


RELAYED_FLOOR = datetime(2020, 1, 1, tzinfo=UTC)  # a relayed spec message stamped earlier is forged


def plausible_past(ts: datetime) -> bool:
    """Not before RELAYED_FLOOR, and a date every reader can convert (never raises)."""
    try:
        return ts >= RELAYED_FLOOR and ts.year < 9999  # (then converting it to UTC cannot overflow)
    except (OverflowError, ValueError):
        return False


def _not_ahead(ts: datetime, at: datetime) -> bool:
    try:
        return (ts - at).total_seconds() < MAX_AHEAD
    except (OverflowError, TypeError):
        return False


class RepairNote(BaseModel):
    """A peer's note to one other peer (retained at ``repair/TO/FROM``): the ranges of TO's messages it
    never got (``want``: send them again), and of the ranges TO asked it for, those it no longer has
    (``gone``). Replaced whenever either changes; an empty note clears it."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    v: int = Field(WIRE_VERSION, ge=1, le=1000)
    sender: PeerName = Field(alias="from")
    to: PeerName
    ts: AwareDatetime
    want: list[tuple[Seq, Seq]] = Field(default_factory=list, max_length=MAX_RANGES)
    gone: list[tuple[Seq, Seq]] = Field(default_factory=list, max_length=MAX_RANGES)

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


def decode_note(payload: bytes, *, at: datetime) -> RepairNote | None:
    """A repair note from wire bytes, or None (never raises); ranges must run forwards."""
    note = _parse(RepairNote, payload, 16 * 1024)
    ok = note is not None and in_window(note.ts, at) and all(a <= b for a, b in (*note.want, *note.gone))
    return note if ok else None


def new_envelope(
    sender: str,
    kind: str,
    body: str,
    *,
    data: dict[str, Any] | None = None,
    to: str | None = None,
    re: str | None = None,
    seq: int | None = None,
) -> Envelope:
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
    try:  # a lone surrogate cannot be written as UTF-8: refused here, not when a batch is written later
        body.encode()
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise BadMessage(
            "message text is not valid Unicode (it holds a lone surrogate)",
            "send UTF-8 text; read binary data from a file and send its path instead",
        ) from None
    if len(body) > MAX_PAYLOAD:
        raise BadMessage(
            f"message is over the {MAX_PAYLOAD} byte limit", "send a path or a summary instead of the whole file"
        )
    try:
        env = Envelope(id=uuid7(), ts=now(), sender=sender, to=to, kind=kind, re=re, seq=seq, body=body, data=data)
    except ValidationError as exc:
        raise BadMessage(f"message is not valid: {_first_error(exc)}") from None
    # JSON escapes a character into at most 6 bytes: only a large message needs encoding to be measured.
    if (len(body) + len(str(data))) * 6 + 1024 > MAX_PAYLOAD and (size := len(env.encode())) > MAX_PAYLOAD:
        raise BadMessage(
            f"message is {size} bytes, over the {MAX_PAYLOAD} byte limit",
            "send a path or a summary instead of the whole file",
        )
    return env


def decode_envelope(payload: bytes) -> Envelope | None:
    """An envelope from wire bytes, or None if the payload is not one (never raises). Its time is judged
    by the reader (:func:`in_window`), which says why it dropped one."""
    return _parse(Envelope, payload, MAX_PAYLOAD)


def decode_presence(payload: bytes, *, at: datetime | None = None) -> Presence | None:
    """A presence from wire bytes, or None (never raises); with ``at`` (now, for what just came off the
    wire), also None if its heartbeat is outside the time window around it or it started after it."""
    pres = _parse(Presence, payload, 16 * 1024)
    if pres is not None and at is not None and not (in_window(pres.hb, at) and pres.since <= pres.hb + _SKEW):
        return None
    return pres


_M = TypeVar("_M", bound=BaseModel)


def _parse(model: type[_M], payload: bytes, limit: int) -> _M | None:
    """``model`` from JSON bytes of at most ``limit``, or None: the one place wire bytes become a value."""
    if not payload or len(payload) > limit:
        return None
    try:
        return model.model_validate_json(payload)
    except (ValidationError, ValueError):
        return None


_SKEW = timedelta(seconds=MAX_AHEAD)


def in_window(ts: datetime, at: datetime) -> bool:
    """Whether a peer's timestamp is plausible now: not older than MAX_AGE, not ahead by more than MAX_AHEAD."""
    try:
        return -MAX_AHEAD < (at - ts).total_seconds() < MAX_AGE
    except (OverflowError, TypeError):  # a naive time, or one at the end of the calendar
        return False


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
