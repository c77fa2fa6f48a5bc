"""The wire format: round trips per kind, a tolerant reader, a strict writer, and a schema snapshot."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from mqttalk import Envelope, SpecData, StatusData
from mqttalk._wire import (
    KINDS,
    MAX_PAYLOAD,
    ContractState,
    Presence,
    RepairNote,
    decode_envelope,
    decode_presence,
    new_envelope,
    uuid7,
)
from mqttalk.errors import BadMessage

SNAPSHOT = Path(__file__).with_name("wire_schema.json")

EXAMPLES = {
    "note": ({}, None),
    "spec": ({"subject": "POST /users", "rev": 2, "state": "agreed"}, None),
    "status": ({"state": "red", "commit": "abc123"}, None),
    "question": ({}, None),
    "answer": ({}, "0190aaaa-0000-7000-8000-000000000000"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_round_trips(kind: str) -> None:
    data, re = EXAMPLES[kind]
    env = new_envelope(
        "impl", kind, 'body with "quotes", $HOME, `ticks` and *globs*\n\nsecond paragraph', data=data, re=re, to="tests"
    )
    back = decode_envelope(env.encode())
    assert back == env
    assert back is not None and back.kind == kind and back.data == data


def test_typed_fields_are_validated_and_exposed() -> None:
    env = new_envelope("impl", "spec", "x", data={"subject": "POST /users"})
    typed = env.typed()
    assert isinstance(typed, SpecData) and (typed.rev, typed.state) == (1, "proposed")
    status = new_envelope("tests", "status", "all red", data={"state": "red"}).typed()
    assert isinstance(status, StatusData) and status.state == "red"


@pytest.mark.parametrize(
    ("kind", "data", "re", "says"),
    [
        ("shout", {}, None, "unknown kind"),
        ("status", {"state": "purple"}, None, "state"),
        ("status", {}, None, "state"),
        ("spec", {"subject": "x", "rev": 0}, None, "rev"),
        ("answer", {}, None, "--re"),
        ("note", {"state": "red"}, None, "no typed fields"),
    ],
)
def test_strict_writer_rejects_bad_messages(kind: str, data: dict[str, object], re: str | None, says: str) -> None:
    with pytest.raises(BadMessage) as err:
        new_envelope("impl", kind, "text", data=data, re=re)
    assert says in err.value.line()


def test_empty_and_oversize_messages_are_refused() -> None:
    with pytest.raises(BadMessage, match="empty"):
        new_envelope("impl", "note", "  \n ")
    with pytest.raises(BadMessage, match="limit"):
        new_envelope("impl", "note", "x" * (MAX_PAYLOAD + 1))


def test_tolerant_reader_keeps_unknown_kinds_and_fields() -> None:
    raw = json.dumps(
        {
            "v": 2,
            "id": "x1",
            "ts": "2026-01-01T00:00:00Z",
            "from": "future",
            "kind": "diff",
            "body": "b",
            "data": {"hunks": 3},
            "sig": "zz",
        }
    ).encode()
    env = decode_envelope(raw)
    assert env is not None and env.kind == "diff" and not env.known_kind
    assert env.data == {"hunks": 3}
    assert env.model_extra == {"sig": "zz"}


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[]",
        b"{}",
        b'{"id": 1}',
        b"\xff\xfe",
        b'{"id":"x","ts":"yesterday","from":"a","kind":"note"}',
        b"{" + b'"a":' * 10 + b"1}",
        b"x" * (MAX_PAYLOAD + 1),
    ],
)
def test_garbage_decodes_to_none_never_raises(payload: bytes) -> None:
    assert decode_envelope(payload) is None
    assert decode_presence(payload) is None


def test_uuid7_ids_are_version_7_and_sort_by_time() -> None:
    before = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(50)]
    after = time.time_ns() // 1_000_000
    assert all(i[14] == "7" and i[19] in "89ab" for i in ids)
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert all(before <= uuid.UUID(i).int >> 80 <= after for i in ids)  # the first 48 bits: Unix milliseconds
    assert len(set(ids)) == 50
    assert ids[0][:13] <= ids[-1][:13]  # the millisecond timestamp prefix never goes backwards


def test_wire_schema_matches_snapshot() -> None:
    """A change to the wire format must show up as a diff of tests/wire_schema.json in review.

    Regenerate with: python -c "import tests.test_wire as t; t.write_snapshot()"
    """
    assert json.loads(SNAPSHOT.read_text()) == _schema()


def _schema() -> dict[str, object]:
    return {
        "envelope": Envelope.model_json_schema(by_alias=True),
        "presence": Presence.model_json_schema(),
        "spec": SpecData.model_json_schema(),
        "status": StatusData.model_json_schema(),
        "repair": RepairNote.model_json_schema(by_alias=True),
        "contract": ContractState.model_json_schema(by_alias=True),
    }


def write_snapshot() -> None:
    SNAPSHOT.write_text(json.dumps(_schema(), indent=2, sort_keys=True) + "\n")
