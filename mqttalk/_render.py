"""How a message reads for an agent: one header line, then the body, kept short.

Shared by the CLI (`recv`, `log`), the MCP server and the Claude Code hook, so an agent sees the same
shape everywhere. Agents pay for every token they read: a body longer than :data:`LONG_BODY`
characters is written to a file in the state directory and shown as a preview plus that file's path
(the agent reads the file only if it needs the whole text). ``--json`` always carries whole bodies.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

LONG_BODY = 600  # characters: a longer body is shown as a preview and written to a file
PREVIEW = 300  # characters of a long body shown inline


def facts(env: Any) -> str:
    """The key=value header of a message: one line, cheap in tokens."""
    out = [f"from={env.sender}", f"kind={env.kind}" + ("" if env.known_kind else "(unknown)")]
    out += [env.summary()] if env.summary() else []
    out += [f"id={env.id}"] + ([f"re={env.re}"] if env.re else []) + ([f"to={env.to}"] if env.to else [])
    out += [f"seq={env.seq}"] if env.seq is not None else []
    out.append(f"at={env.ts.strftime('%H:%M:%SZ')}")
    return " ".join(out)


def body_file(bodies: Path, msg_id: str) -> Path:
    """Where a long body is kept (one file per message id; the id is a UUID, safe as a file name)."""
    return bodies / f"{''.join(c for c in msg_id if c.isalnum() or c == '-')[:64]}.txt"


def spill(bodies: Path, env: Any) -> Path:
    """Write ``env``'s whole body to its file (private to the user: the state directory is 0700)."""
    bodies.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = body_file(bodies, env.id)
    if not path.exists() or path.read_text(encoding="utf-8", errors="replace") != env.body:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.touch(mode=0o600)
        tmp.write_text(env.body, encoding="utf-8")
        tmp.replace(path)
    return path


def body_text(env: Any, bodies: Path | None, *, limit: int = LONG_BODY) -> str:
    """The body as shown: whole if short (or ``bodies`` is None), else a preview and the file's path."""
    body = str(env.body).rstrip()
    if bodies is None or len(body) <= limit:
        return body
    path = spill(bodies, env)
    cut = body[:PREVIEW]
    if "\n" in cut[PREVIEW // 2:]:  # end the preview on a line break when one is near
        cut = cut[: cut.rindex("\n")]
    return (f"{cut.rstrip()}\n[... {len(env.body)} characters in all; the whole body is in {path}]")


def message_text(env: Any, bodies: Path | None, *, terminal: bool = False) -> str:
    """A whole message as text: ``mqttalk: MESSAGE <facts>`` and its (possibly shortened) body."""
    body = body_text(env, bodies)
    return f"mqttalk: MESSAGE {facts(env)}\n{printable(body) if terminal else body}"


def printable(text: str) -> str:
    """Neutralise control characters (escape sequences could rewrite a terminal's screen)."""
    return "".join(c if c in "\n\t" or c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def on_terminal() -> bool:
    return sys.stdout.isatty()


def status_text(st: Any) -> str:
    """`mqttalk status` as text: the channel, you, your peers with their presence, unread and queued counts."""
    lines = [f"channel: {st.url} ({'sealed' if st.sealed else 'plain'}, {st.protocol})", f"you:     {st.me}"]
    others = [p for p in st.peers if not p.me]
    if not others:
        lines.append("peers:   none yet (share the join URL: `mqttalk pair URL`)")
    for i, p in enumerate(others):
        role = f" [{p.role}]" if p.role else ""
        proof = "" if p.paired else " (has not answered our pairing challenge yet)"
        lines.append(f"{'peers:' if i == 0 else '':9}{p.name}{role}: {p.liveness()}{proof}")
    lines.append(f"unread:  {st.unread}" + (f" (and {st.gaps} gap(s): see `mqttalk recv`)" if st.gaps else ""))
    if st.queued:
        lines.append(f"queued:  {st.queued} message(s) not yet acknowledged by the broker")
    return "\n".join(lines)
