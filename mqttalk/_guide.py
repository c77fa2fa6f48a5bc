"""`mqttalk guide`: the agent-facing manual of the current channel (its ``llms.txt``).

Who this session is, who the peers are, the exact commands to read, wait and send, and when to use
each. The text lives in package data (``data/guide.md``, ``data/guide-start.md`` before a channel
exists, ``data/roles.md`` for the part a role plays) so it can be read and reviewed as prose.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ._channel import Channel
    from ._config import Settings
    from ._peer import Event, Status

DATA = Path(__file__).parent / "data"
Voice = Literal["cli", "mcp"]  # who reads the guide: an agent with a shell, or one with mqttalk's MCP tools


def data_text(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def fill(template: str, **values: str) -> str:
    """Replace ``{{name}}`` placeholders (braces alone are left alone: the text is full of JSON and shell)."""

    def value(match: re.Match[str]) -> str:
        return values[match.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", value, template)


def _roles() -> dict[str, str]:
    sections: dict[str, str] = {}
    for chunk in data_text("roles.md").split("## ")[1:]:
        name, _, text = chunk.partition("\n")
        sections[name.strip()] = text.strip()
    return sections


def role_part(role: str | None) -> str:
    """The paragraph for a role (``tests``, ``impl``, ``review``), else the general one."""
    sections = _roles()
    key = (role or "").strip().lower()
    return sections.get(key, sections["*"])


def check_role(role: str | None) -> None:
    """``guide --role`` names one of the roles the guide knows (without it, the peer name picks one or none)."""
    if role is None:
        return
    known = [name for name in _roles() if name != "*"]
    if role.strip().lower() not in known:
        from ._errors import UsageError

        raise UsageError(f"unknown role {role[:40]!r}", f"use one of: {', '.join(known)}; or leave --role out")


def share_text(peer: str, url: str) -> str:
    """The sentence a person pastes into the other session: what mqttalk is, the one command to run."""
    other = "impl" if peer == "tests" else "tests"  # never the creator's own name: that pair would be refused
    return data_text("share.txt").strip().format(peer=peer, url=url, other=other)


def start_guide(cwd: Path, voice: Voice = "cli") -> str:
    """The guide before this directory has a channel: how to create or join one."""
    return fill(data_text(_voiced("guide-start.md", voice)), cwd=str(cwd)).rstrip() + "\n"


def _voiced(name: str, voice: Voice) -> str:
    """The guide text for a voice: ``guide.md`` names commands, ``guide-mcp.md`` the MCP tools."""
    return name if voice == "cli" else name.replace(".md", "-mcp.md")


def channel_guide(
    channel: Channel,
    *,
    role: str | None = None,
    status: Status | None = None,
    cwd: Path | None = None,
    status_error: str | None = None,
    voice: Voice = "cli",
) -> str:
    """The guide for a bound channel. ``status`` (a :class:`~._channel.Status`) names the peers; without
    one (broker unreachable) ``status_error`` says why they are not listed."""
    from ._render import LONG_BODY, line, mcp_voiced, more_peers, shown_peers

    if status is not None:  # at most a screenful of peers; names and roles are theirs: escaped
        others, more = shown_peers([p for p in status.peers if not p.me])
        peers = "; ".join(
            f"{line(p.name)}" + (f" [{line(p.role)}]" if p.role else "") + f": {p.liveness()}" for p in others
        ) + (f"; {more_peers(more)}" if more else "")
        peers = peers or "none yet (the other session joins with `mqttalk pair 'URL' --as NAME`)"
        unread = str(status.unread)
    else:
        peers = f"unknown ({status_error or 'broker not reached'}); `mqttalk status` lists them"
        unread = str(channel.store.unread_count(channel.url.channel, channel.me))
    shown_role = channel.role or ""
    text = (
        fill(
            data_text(_voiced("guide.md", voice)),
            me=channel.me,
            role=f" ({shown_role})" if shown_role else "",
            broker=channel.url.broker.display(),
            peers=peers,
            unread=unread,
            cwd=str(cwd or Path.cwd()),
            long=str(LONG_BODY),
            part=role_part(role if role is not None else channel.me),
        ).rstrip()
        + "\n"
    )
    return text if voice == "cli" else mcp_voiced(text)


def guide(
    settings: Settings,
    cwd: Path,
    role: str | None = None,
    on_event: Callable[[Event], None] | None = None,
    *,
    voice: Voice = "cli",
) -> str:
    """The guide for ``cwd``: the channel's if it has one, else how to start one. ``on_event`` hears what
    reading the peers' presence brings (a PAIRED notice); ``voice``: commands ("cli") or MCP tools ("mcp")."""
    from ._api import open_channel
    from ._errors import MqttalkError, NotBound

    try:
        channel = open_channel(settings, cwd, on_event=on_event)
    except NotBound:
        return start_guide(cwd, voice)
    binding = channel.binding
    where = Path(binding.directory) if binding is not None and binding.directory else cwd
    try:
        status = channel.status()
    except MqttalkError as exc:
        return channel_guide(channel, role=role, cwd=where, status_error=exc.message, voice=voice)
    return channel_guide(channel, role=role, status=status, cwd=where, voice=voice)
