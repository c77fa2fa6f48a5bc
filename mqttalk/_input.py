"""What the CLI reads from its user, checked before anything connects: each bad input is one
:class:`UsageError` line (exit 2), never an internal error.

The message text (an argument, ``-`` for stdin, or ``--file``) is read as bytes, at most the wire's
limit plus one byte (``--file /dev/zero`` ends at once), and must be UTF-8. A kind's typed fields
must belong to it. Ids, peer names and seconds are checked for their form. Kept free of heavy
imports: the CLI imports it on every start of `send`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import IO, Any

from ._errors import BadMessage, UsageError

# Options whose value is a file system path: a path need not be UTF-8 (everything else must be).
PATH_OPTIONS = ("--file", "-f", "--ca", "--db")

# Which typed fields each kind takes (as `send` flags); the other kinds take none.
KIND_FIELDS = {"spec": ("subject", "rev", "state"), "status": ("state", "commit")}


def _limit() -> int:
    from ._wire import MAX_PAYLOAD

    return MAX_PAYLOAD


def check_args(args: list[str]) -> None:
    """Refuse an argument that is not UTF-8 (Python hands such bytes over as lone surrogates, which
    would fail much later, as an internal error). Values of path options are exempt."""
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in PATH_OPTIONS:
            skip = True
            continue
        if arg.startswith(tuple(f"{o}=" for o in PATH_OPTIONS if o.startswith("--"))) or (
            arg.startswith("-f") and not arg.startswith("--")
        ):
            continue
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise UsageError(
                f"argument '{shown[:60]}' is not valid UTF-8 text",
                "give text as UTF-8 (check the terminal's or the script's encoding)",
            ) from None


def read_body(text: str | None, file: Path | None, stdin: IO[str] | None) -> str:
    """The message text: ``text``, ``-`` for ``stdin``, or ``file`` (read untouched). Either text or a
    file, not both; never more than the wire's limit (plus one byte, to know it is over) is read."""
    if file is not None and text is not None:
        raise UsageError(
            "give the message as TEXT or with --file, not both", f"drop {'--file' if text else 'the TEXT argument'}"
        )
    limit = _limit()
    if file is not None:
        try:
            with open(file, "rb") as handle:
                data = handle.read(limit + 1)
        except OSError as exc:
            raise UsageError(f"cannot read message file {file}: {exc.strerror or exc}") from None
        return _decode(data, f"message file {file}", limit)
    if text == "-":
        if stdin is None or getattr(stdin, "closed", False):
            raise UsageError(
                "'-' reads the message from stdin, but stdin is closed",
                "pipe the text in (… | mqttalk send -), or give it as an argument or with --file",
            )
        try:
            data = stdin.buffer.read(limit + 1) if hasattr(stdin, "buffer") else stdin.read(limit + 1).encode()
        except OSError as exc:
            raise UsageError(f"cannot read the message from stdin: {exc.strerror or exc}") from None
        return _decode(data, "the message on stdin", limit)
    body = text or ""
    if len(body) > limit:  # (each character is a byte at least; the envelope check measures the rest)
        raise BadMessage(
            f"the message is over the {limit} byte limit", "send a path or a summary instead of the whole file"
        )
    return body


def read_url(stdin: IO[str] | None) -> str:
    """`pair -`: the join URL on stdin's first line."""
    if stdin is None or getattr(stdin, "closed", False):
        raise UsageError(
            "'-' reads the join URL from stdin, but stdin is closed", "pipe it in: echo 'URL' | mqttalk pair -"
        )
    try:
        data = stdin.buffer.readline(64 * 1024) if hasattr(stdin, "buffer") else stdin.readline().encode()
    except OSError as exc:
        raise UsageError(f"cannot read the join URL from stdin: {exc.strerror or exc}") from None
    url = _decode(data, "the join URL on stdin", 64 * 1024).strip()
    if not url:
        raise UsageError(
            "'-' reads the join URL from stdin, but stdin was empty", "pipe it in: echo 'URL' | mqttalk pair -"
        )
    return url


def _decode(data: bytes, what: str, limit: int) -> str:
    if len(data) > limit:
        raise BadMessage(f"{what} is over the {limit} byte limit", "send a path or a summary instead of the whole file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{what} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})",
            "convert it first, e.g. iconv -t UTF-8",
        ) from None


def typed_fields(
    kind: str,
    body: str,
    *,
    subject: str | None,
    rev: int | None,
    state: str | None,
    commit: str | None,
    flag: str = "--",
) -> dict[str, Any]:
    """A kind's typed fields from flat options; any option that does not belong to ``kind`` is refused
    (``flag`` is how options are named in the error: ``--state`` for the CLI, ``state`` for MCP)."""
    from ._wire import KINDS

    if kind not in KINDS:
        raise BadMessage(f"unknown kind {kind!r}", f"use one of: {', '.join(KINDS)}")
    given = {"subject": subject, "rev": rev, "state": state, "commit": commit}
    takes = KIND_FIELDS.get(kind, ())
    stray = [f"{flag}{name}" for name, value in given.items() if value is not None and name not in takes]
    if stray and not takes:
        verb = "applies" if len(stray) == 1 else "apply"
        raise BadMessage(f"{', '.join(stray)} only {verb} to {flag}kind spec or status, not {kind}")
    if stray:
        verb = "does" if len(stray) == 1 else "do"
        raise BadMessage(
            f"{', '.join(stray)} {verb} not apply to a {kind}",
            f"a {kind} takes {', '.join(flag + name for name in takes)}",
        )
    data: dict[str, Any] = {}
    if kind == "spec":
        first = body.strip().splitlines()[0][:200] if body.strip() else None
        data = {"subject": subject or first, "rev": rev, "state": state}
    elif kind == "status":
        if state is None:
            raise BadMessage(f"a status needs {flag}state", "one of red, green, blocked, working, done")
        data = {"state": state, "commit": commit}
    if not body.strip() and all(value is None for value in data.values()):  # (as the envelope judges it)
        raise BadMessage("empty message", "give the text as an argument, with --file PATH, or '-' for stdin")
    return data


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def check_id(value: str | None, flag: str = "--re") -> str | None:
    """A message id as given to ``flag``: the id= value of a MESSAGE header. mqttalk writes UUIDs (strict
    writer); the wire accepts other ids from other writers (tolerant reader), but an answer names one
    of ours."""
    if value is None or _UUID.fullmatch(value.lower()):
        return value.lower() if value else value
    hint = (
        "give the id alone, without 'id='"
        if value.startswith(("id=", "re="))
        else "a message id is the id= value of a MESSAGE header, e.g. 0192f0c3-6a1e-7cc4-9d3e-3f1b2a4c5d6e"
    )
    raise UsageError(f"{flag} {value[:80]!r} is not a message id", hint)


def check_seconds(value: float | None, flag: str) -> float | None:
    """A number of seconds to wait: 0 or more, and a number (not nan or inf)."""
    if value is not None and (not math.isfinite(value) or value < 0):
        raise UsageError(f"{flag} {value:g} is not a number of seconds", f"give 0 or more, e.g. {flag} 60")
    return value
