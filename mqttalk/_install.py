"""`mqttalk install claude`: set Claude Code up: the MCP server as a channel, hooks, and a skill.

- ``.mcp.json`` (project): the ``mqttalk`` MCP server, run as ``mqttalk mcp --claude-channel``. In a Claude
  Code started with ``--dangerously-load-development-channels server:mqttalk`` it pushes each peer message
  into the session as it arrives; in one started without, it pushes nothing (see ``_mcp.claude_channels``).
  For ``--user`` the server is Claude Code's own user state (``~/.claude.json``): the ``claude mcp add``
  command that adds it is printed, not run.
- Hooks in ``.claude/settings.json`` (project) or ``~/.claude/settings.json`` (user): the fallback that shows
  peer messages on the next prompt, tool call or stop, in a session started without channels. Both read
  the same cursor: what the channel pushed is read, so the hooks never show it again.

Everything is merged: other settings, hooks and servers are kept; what is mqttalk's is updated in place,
never added twice, so running it again changes nothing. It reports each change and shows the diff.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import UsageError

HOOK_MARK = "hook claude"  # how an mqttalk hook command is recognised (whatever path runs mqttalk)
HOOK_TIMEOUTS = {"UserPromptSubmit": 15, "PostToolUse": 15}  # seconds Claude Code lets each run take
SERVER_NAME = "mqttalk"  # the MCP server's name in Claude Code (server:mqttalk for the channels flag)
CHANNEL_ARGS = ["mcp", "--claude-channel"]


@dataclass
class Plan:
    """What installing would change: files with their old and new text, and one line per change."""

    files: dict[Path, tuple[str | None, str]] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)

    def diff(self) -> str:
        out: list[str] = []
        for path, (old, new) in self.files.items():
            out += difflib.unified_diff(
                (old or "").splitlines(keepends=True),
                new.splitlines(keepends=True),
                fromfile=str(path) if old is not None else "/dev/null",
                tofile=str(path),
            )
        return "".join(out)

    def write(self) -> None:
        for path, (_old, new) in self.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
            tmp.write_text(new, encoding="utf-8")
            tmp.replace(path)


def mqttalk_command() -> str:
    """How the hooks should run mqttalk: by name when PATH finds this same mqttalk, else by its full path
    (a virtualenv's mqttalk that Claude Code's shell would not find)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    here = argv0.resolve() if argv0 is not None and argv0.name == "mqttalk" and argv0.exists() else None
    found = shutil.which("mqttalk")
    if here is None or (found is not None and Path(found).resolve() == here):
        return "mqttalk"
    return str(here)


def wanted_hooks(command: str, stop_wait: float) -> dict[str, dict[str, Any]]:
    """The hook entries, by event (Claude Code's settings shape: matcher group -> command hooks)."""
    hooks: dict[str, dict[str, Any]] = {}
    for event in ("UserPromptSubmit", "PostToolUse", "Stop"):
        cmd = f"{command} hook claude --event {event}"
        timeout = HOOK_TIMEOUTS.get(event, int(stop_wait) + 30)
        if event == "Stop":
            cmd += f" --wait {stop_wait:g}"
        group: dict[str, Any] = {"hooks": [{"type": "command", "command": cmd, "timeout": timeout}]}
        if event == "PostToolUse":
            group = {"matcher": "*", **group}
        hooks[event] = group
    return hooks


def _is_ours(group: Any) -> bool:
    return isinstance(group, dict) and any(
        isinstance(h, dict) and HOOK_MARK in str(h.get("command", "")) and "mqttalk" in str(h.get("command", ""))
        for h in group.get("hooks", []) or []
    )


def merge_settings(settings: dict[str, Any], hooks: dict[str, dict[str, Any]]) -> list[str]:
    """Put ``hooks`` into ``settings`` (in place); returns one line per change (none: already there)."""
    changes: list[str] = []
    table = settings.setdefault("hooks", {})
    if not isinstance(table, dict):
        raise UsageError('the settings file\'s "hooks" is not an object', "fix it by hand, then run this again")
    for event, group in hooks.items():
        groups = table.setdefault(event, [])
        if not isinstance(groups, list):
            raise UsageError(f"the settings file's hooks.{event} is not a list", "fix it by hand")
        ours = [i for i, g in enumerate(groups) if _is_ours(g)]
        command = group["hooks"][0]["command"]
        if not ours:
            groups.append(group)
            changes.append(f"added {event} hook: {command}")
            continue
        first = ours[0]
        if groups[first] != group:
            groups[first] = group
            changes.append(f"updated {event} hook: {command}")
        for i in reversed(ours[1:]):  # a duplicate left by hand: one is enough
            del groups[i]
            changes.append(f"removed a duplicate {event} hook")
    return changes


def start_lines(command: str, *, user: bool) -> list[str]:
    """What to tell the user after installing: how to add the server (user scope) and start Claude Code."""
    lines = []
    if user:
        lines.append(
            f"mqttalk: add the MCP server for every project with: claude mcp add --scope user {SERVER_NAME} -- "
            f"{command} {' '.join(CHANNEL_ARGS)}"
        )
    lines += [
        "mqttalk: start Claude Code with the channel, so peer messages arrive in the session as they come: "
        f"claude --dangerously-load-development-channels server:{SERVER_NAME}",
        "mqttalk: (Claude Code 2.1.80+, signed in with claude.ai; it asks once to trust the project's .mcp.json"
        " server. Started without the flag, the hooks show peer messages on the next prompt, tool call or stop.)",
    ]
    return lines


def merge_mcp_json(config: dict[str, Any], command: str) -> list[str]:
    """Put the mqttalk server into a ``.mcp.json`` object (in place); one line per change."""
    servers = config.setdefault("mcpServers", {})
    if not isinstance(servers, dict):
        raise UsageError('.mcp.json\'s "mcpServers" is not an object', "fix it by hand; nothing was changed")
    wanted = {"command": command, "args": list(CHANNEL_ARGS)}
    current = servers.get(SERVER_NAME)
    if current is None:
        servers[SERVER_NAME] = {"type": "stdio", **wanted}
        return [f"added MCP server {SERVER_NAME}: {command} {' '.join(CHANNEL_ARGS)}"]
    if not isinstance(current, dict) or "mqttalk" not in Path(str(current.get("command", ""))).name:
        raise UsageError(
            f'.mcp.json already has a server named "{SERVER_NAME}" that does not run mqttalk',
            "rename or remove it, then run this again; nothing was changed",
        )
    if {key: current.get(key) for key in wanted} == wanted:
        return []
    current.update(wanted)  # (its env and other keys are the user's: kept)
    return [f"updated MCP server {SERVER_NAME}: {command} {' '.join(CHANNEL_ARGS)}"]


def _json_object(path: Path) -> tuple[str | None, dict[str, Any]]:
    old = path.read_text(encoding="utf-8") if path.exists() else None
    try:
        value = json.loads(old) if old and old.strip() else {}
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}", "fix it by hand; nothing was changed") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} does not hold a JSON object", "fix it by hand; nothing was changed")
    return old, value


def plan_claude(
    target: Path, *, stop_wait: float, skill: bool, command: str | None = None, mcp_json: bool = False
) -> Plan:
    """What `install claude` would write under ``target`` (a project directory or the home directory);
    ``mcp_json``: also the project's ``.mcp.json`` server."""
    plan = Plan()
    command = command or mqttalk_command()
    if mcp_json:
        path = target / ".mcp.json"
        old, config = _json_object(path)
        changes = merge_mcp_json(config, command)
        if changes:
            plan.files[path] = (old, json.dumps(config, indent=2) + "\n")
            plan.changes += [f"{path}: {c}" for c in changes]
    path = target / ".claude" / "settings.json"
    old, settings = _json_object(path)
    changes = merge_settings(settings, wanted_hooks(command, stop_wait))
    if changes:
        plan.files[path] = (old, json.dumps(settings, indent=2) + "\n")
        plan.changes += [f"{path}: {c}" for c in changes]
    if skill:
        from ._guide import data_text

        skill_path = target / ".claude" / "skills" / "mqttalk" / "SKILL.md"
        text = data_text("skill.md")
        current = skill_path.read_text(encoding="utf-8") if skill_path.exists() else None
        if current != text:
            plan.files[skill_path] = (current, text)
            plan.changes.append(f"{skill_path}: {'updated' if current is not None else 'added'} the mqttalk skill")
    return plan
