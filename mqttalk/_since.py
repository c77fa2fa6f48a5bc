"""`log --since`: a point in the channel's history, given as a time or a message id.

Times are normalised to the exact form the store writes message times in (``ts``:
``datetime.isoformat()`` of a UTC time, microseconds included), so the store compares strings and
gets the order of times. Accepted:

* an ISO 8601 time, with or without ``Z`` or an offset (``2026-11-25T12:00``, ``2026-11-25T12:00:00Z``,
  ``2026-11-25T14:00+02:00``, ``2026-11-25``); without a zone it is UTC, like every time mqttalk prints;
* ``HH:MM`` or ``HH:MM:SS``: that time today (UTC);
* relative: ``90s``, ``10m``, ``2h``, ``3d``, ``1w`` ago;
* a message id (as in ``id=`` of a MESSAGE header): the messages after it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from ._errors import UsageError

# What a message id may look like (the wire's rule: 1-64 of letters, digits, _ . : -; mqttalk's own are UUIDs).
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_CLOCK = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?")
_RELATIVE = re.compile(r"(\d{1,9})\s*(s|sec|m|min|h|d|w)")
_LOOKS_LIKE_TIME = re.compile(r"\d{4}-\d{1,2}-\d{1,2}(?!\d)|\d{1,2}:\d{2}(?!\d)|\d+\s*[a-z]+$")  # a time mistyped
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

FORMS = "an ISO time (2026-11-25T12:00, ...Z or +02:00), HH:MM today (UTC), 10m / 2h / 3d ago, or a message id"


def stamp(moment: datetime) -> str:
    """A time in the form the store writes ``ts`` in (UTC, microseconds, ``+00:00``)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def parse_time(value: str, *, now: datetime | None = None) -> datetime | None:
    """``value`` as a time (aware, UTC), or None if it is no time of a form we read."""
    text = value.strip()
    now = now or datetime.now(UTC)
    if m := _RELATIVE.fullmatch(text):
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
        if seconds > 100 * 365 * 86400:
            return None
        return now - timedelta(seconds=seconds)
    if m := _CLOCK.fullmatch(text):
        hour, minute, second = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        return now.astimezone(UTC).replace(hour=hour, minute=minute, second=second, microsecond=0)
    if not text[:4].isdigit() or len(text) < 8:  # an ISO time starts with its year (2026-11-25 at least)
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def normalise(value: str) -> str:
    """What the store takes for ``since``: the time in the form ``ts`` is written in, or a message id
    (unchanged). Raises :class:`UsageError` (exit 2) for anything else. Idempotent."""
    moment = parse_time(value)
    if moment is not None:
        return stamp(moment)
    if ID_PATTERN.fullmatch(value) and not _LOOKS_LIKE_TIME.match(value):
        return value
    raise UsageError(f"--since {value!r} is not a time or a message id", f"give {FORMS}")
