"""How a message reads for an agent: one header line, then the body, kept short.

Shared by the CLI (`recv`, `log`), the MCP server and the Claude Code hook, so an agent sees the same
shape everywhere. Agents pay for every token they read: a body longer than :data:`LONG_BODY`
characters is written to a file in the state directory and shown as a preview plus that file's path
(the agent reads the file only if it needs the whole text). ``--json`` always carries whole bodies.
"""

from __future__ import annotations

import hashlib
import os
import sys
from datetime import UTC
from pathlib import Path
from typing import Any

LONG_BODY = 600  # characters: a longer body is shown as a preview and written to a file
PREVIEW = 300  # characters of a long body shown inline


def facts(env: Any) -> str:
    """The key=value header of a message: one line, cheap in tokens. Every value a peer chose is shown
    by :func:`field`: never a control character, newline or escape sequence, and never a space that could
    pass for another key=value, on a terminal or not (an agent reading a pipe must not be shown a forged
    line either). ``--json`` and the store keep the raw values."""
    out = [f"from={field(env.sender)}", f"kind={field(env.kind)}" + ("" if env.known_kind else "(unknown)")]
    out += _typed_facts(env)
    out += [f"id={field(env.id)}"] + ([f"re={field(env.re)}"] if env.re else [])
    out += [f"to={field(env.to)}"] if env.to else []
    out += [f"seq={env.seq}"] if env.seq is not None else []
    out.append(f"at={env.ts.astimezone(UTC).strftime('%H:%M:%SZ')}")  # (a peer may write another offset)
    return " ".join(out)


def _typed_facts(env: Any) -> list[str]:
    """A spec's subject, rev and state, a status's state and commit (as :meth:`Envelope.summary`
    words them), each value made safe."""
    typed = env.typed() if env.kind in ("spec", "status") else None
    if typed is None:
        return []
    if env.kind == "spec":
        return [f"subject={printable(repr(str(typed.subject)), line=True)}", f"rev={field(str(typed.rev))}",
                f"state={field(str(typed.state))}"]
    commit = getattr(typed, "commit", None)
    return [f"state={field(str(typed.state))}"] + ([f"commit={field(str(commit))}"] if commit else [])


_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:/@+#")


def field(value: Any) -> str:
    """One header value: as is when it is plain (letters, digits, ``_-.:/@+#``), else quoted the way
    Python writes a string literal, with every control or invisible character escaped."""
    text = str(value)
    if text and all(c in _PLAIN for c in text):
        return text
    return printable(repr(text), line=True)


def line(text: Any) -> str:
    """Text a peer controls, shown inside one line of ours (a name, a role, a reason): control
    characters, newlines and escape sequences escaped, everywhere (not only on a terminal)."""
    return printable(str(text), line=True)


def gap_text(gap: Any) -> str:
    """The one line for messages that never arrived, and why nobody can bring them back now (a
    :class:`~mqttalk._store.Gap`: the sender no longer has them, or did not answer a request to resend)."""
    who, count = line(gap.sender), gap.last - gap.first + 1
    what = f"{count} message{'s' if count > 1 else ''} sent by {who}"
    if gap.state == "gone":
        why = f"{what} never arrived, and {who} no longer has them (its store was reset or lost)"
    else:
        why = (f"{what} never arrived, and {who} did not answer a request to resend them (not running since, or "
               "the request did not reach it); they are still shown if they come")
    return f"mqttalk: GAP from={who} seq={gap.first}-{gap.last} ({why})"


def gap_lines(gaps: list[Any], limit: int = 20) -> list[str]:
    """The GAP lines of a read, at most ``limit`` of them and one saying how many more (made-up peers
    could otherwise fill an agent's context with them)."""
    lines = [gap_text(gap) for gap in gaps[:limit]]
    if len(gaps) > limit:
        lines.append(f"mqttalk: … and {len(gaps) - limit:,} more GAP lines (`mqttalk recv --json` lists them all)")
    return lines


def outdated_text(peer: str, version: str) -> str:
    """A peer speaks another wire version than this mqttalk (see :data:`mqttalk._wire.WIRE_VERSION`)."""
    from ._wire import WIRE_VERSION

    who = line(peer)
    if version.isdigit() and int(version) < WIRE_VERSION:
        return (f"{who} runs an older mqttalk (wire v{line(version)}, this one v{WIRE_VERSION}): ask {who} to "
                "upgrade (pip install -U mqttalk); until then messages it misses cannot be resent to it")
    return (f"{who} runs a newer mqttalk (wire v{line(version)}, this one v{WIRE_VERSION}): upgrade this one "
            "(pip install -U mqttalk)")


def body_file(bodies: Path, msg_id: str) -> Path:
    """Where a long body is kept: one file per message id, named by the id's safe characters and a hash
    of the whole id, so two ids that differ only in other characters (``X`` and ``X_``: a member forging
    a twin of another peer's message) never share a file."""
    safe = "".join(c for c in msg_id if c.isalnum() or c == "-")[:64]
    return bodies / f"{safe}.{hashlib.sha256(msg_id.encode()).hexdigest()[:12]}.txt"


def spill(bodies: Path, env: Any) -> Path:
    """Write ``env``'s whole body to its file (private to the user: the state directory is 0700)."""
    from ._state import private_dir, private_file

    private_dir(bodies)
    path = body_file(bodies, env.id)
    if not path.exists() or path.read_text(encoding="utf-8", errors="replace") != env.body:
        tmp = private_file(path.with_suffix(f".{os.getpid()}.tmp"))  # 0600 whatever the umask
        tmp.write_text(env.body, encoding="utf-8")
        tmp.replace(path)
    return path


def body_text(env: Any, bodies: Path | None, *, limit: int = LONG_BODY) -> str:
    """The body as shown (:func:`framed`): whole if short (or ``bodies`` is None), else a preview and the
    file's path."""
    body = str(env.body).rstrip()
    if bodies is None or len(body) <= limit:
        return framed(body)
    path = spill(bodies, env)
    cut = body[:PREVIEW]
    if "\n" in cut[PREVIEW // 2:]:  # end the preview on a line break when one is near
        cut = cut[: cut.rindex("\n")]
    return (f"{framed(cut.rstrip())}\n[... {len(env.body)} characters in all; the whole body is in {path}]")


def message_text(env: Any, bodies: Path | None, *, terminal: bool = False) -> str:
    """A whole message as text: ``mqttalk: MESSAGE <facts>`` and its (possibly shortened) body, framed
    (see :func:`framed`). ``terminal`` is kept for callers; a body is shown the same way everywhere."""
    return f"mqttalk: MESSAGE {facts(env)}\n{body_text(env, bodies)}"


def framed(body: str) -> str:
    """A peer's body as shown, on a terminal or piped to an agent: newlines and tabs kept (agents need
    them), every other control character and escape sequence escaped, and any line that starts the way
    mqttalk's own lines do (``mqttalk:``, or the ``[...`` of a long body's pointer) shown behind ``| ``,
    so a body can never pass for a PAIRED, MESSAGE or GAP line of ours. ``--json`` keeps it as sent."""
    lines = printable(body).split("\n")
    return "\n".join(f"| {text}" if text.startswith(_OURS) else text for text in lines)


_OURS = ("mqttalk:", "[...", "| ")


def printable(text: str, *, line: bool = False) -> str:
    """Neutralise control characters (escape sequences could rewrite a terminal's screen): each one, and
    every invisible formatting character (bidi overrides), is shown as its escape. Newlines and tabs stay
    unless ``line``: then the text cannot break out of the line it is printed in."""
    keep = "" if line else "\n\t"
    return "".join(c if c in keep or c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def on_terminal() -> bool:
    return sys.stdout.isatty()


SCREENFUL = 20  # peers listed at most by `status`, the guide and MCP's status; the rest are counted


def shown_peers(peers: list[Any], limit: int = SCREENFUL) -> tuple[list[Any], int]:
    """The peers worth a line (those that answered our pairing challenge first, then by name) and how
    many more there are: 10,000 made-up presences must not cost an agent 10,000 lines."""
    ranked = sorted(peers, key=lambda p: not getattr(p, "paired", False))  # stable: name order stays within
    return ranked[:limit], max(0, len(ranked) - limit)


def more_peers(count: int) -> str:
    return f"… and {count:,} more peer{'s' if count != 1 else ''} (`mqttalk status --json` lists them all)"


def more_notes(count: int) -> str:
    plural = "s" if count != 1 else ""
    return f"mqttalk: … and {count:,} more PAIRED / OFFLINE notice{plural} (`mqttalk status` lists the peers)"


def bounded(notes: list[str], limit: int = SCREENFUL) -> list[str]:
    """At most ``limit`` notice lines, and one saying how many more there were."""
    return notes if len(notes) <= limit else [*notes[:limit], more_notes(len(notes) - limit)]


def status_text(st: Any) -> str:
    """`mqttalk status` as text: the channel, you, your peers with their presence, unread and queued counts.
    Names and roles are the peers' own words: shown escaped, and at most :data:`SCREENFUL` of them."""
    lines = [f"channel: {st.url} ({'sealed' if st.sealed else 'plain'}, {st.protocol})", f"you:     {line(st.me)}"]
    others, more = shown_peers([p for p in st.peers if not p.me])
    if not others:
        lines.append("peers:   none yet (share the join URL: `mqttalk pair URL`)")
    for i, p in enumerate(others):
        role = f" [{line(p.role)}]" if p.role else ""
        proof = "" if p.paired else " (has not answered our pairing challenge yet)"
        lines.append(f"{'peers:' if i == 0 else '':9}{line(p.name)}{role}: {p.liveness()}{proof}")
    if more:
        lines.append(f"{'':9}{more_peers(more)}")
    lines.append(f"unread:  {st.unread}" + (f" (and {st.gaps} gap(s): see `mqttalk recv`)" if st.gaps else ""))
    if st.queued:
        lines.append(f"queued:  {st.queued} message(s) not yet acknowledged by the broker")
    return "\n".join(lines)
