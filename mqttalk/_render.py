"""How a message reads for an agent: one header line, then the body, kept short.

Shared by the CLI (`recv`, `log`), the MCP server and the Claude Code hook, so an agent sees the same
shape everywhere. Agents pay for every token they read: a body longer than :data:`LONG_BODY`
characters is written to a file in the state directory and shown as a preview plus that file's path
(the agent reads the file only if it needs the whole text). ``--json`` always carries whole bodies.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._peer import Event, PeerInfo, Status
    from ._spec import Contract, Revision, Subject
    from ._store import Gap
    from ._wire import Envelope

LONG_BODY = 600  # characters: a longer body is shown as a preview and written to a file
PREVIEW = 300  # characters of a long body shown inline


def facts(env: Envelope) -> str:
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


def _typed_facts(env: Envelope) -> list[str]:
    """A spec's subject, rev and state, a status's state and commit (as :meth:`Envelope.summary`
    words them), each value made safe."""
    from ._wire import SpecData, StatusData

    typed = env.typed() if env.kind in ("spec", "status") else None
    if isinstance(typed, SpecData):
        return [
            f"subject={printable(repr(str(typed.subject)), line=True)}",
            f"rev={field(str(typed.rev))}",
            f"state={field(str(typed.state))}",
        ]
    if isinstance(typed, StatusData):
        commit = typed.commit
        spec = (
            [f"spec={printable(repr(str(typed.spec)), line=True)}", f"rev={typed.rev}"]
            if typed.spec and typed.rev
            else []
        )
        return [f"state={field(str(typed.state))}"] + ([f"commit={field(str(commit))}"] if commit else []) + spec
    return []


_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:/@+#")


def field(value: Any) -> str:
    """One header value: as is when it is plain (letters, digits, ``_-.:/@+#``), else quoted the way
    Python writes a string literal, with every control or invisible character escaped."""
    text = str(value)
    if text and all(c in _PLAIN for c in text):
        return text
    return printable(repr(text), line=True)


def line(text: Any, limit: int = 0) -> str:
    """Text a peer controls, shown inside one line of ours (a name, a role, a reason): control
    characters, newlines and escape sequences escaped, everywhere (not only on a terminal);
    ``limit``: at most that many characters."""
    shown = printable(str(text), line=True)
    return shown if not limit or len(shown) <= limit else shown[: limit - 1] + "…"


def gap_text(gap: Gap) -> str:
    """The one line for messages that never arrived, and why nobody can bring them back now (a
    :class:`~mqttalk._store.Gap`: the sender no longer has them, or did not answer a request to resend)."""
    who, count = line(gap.sender), gap.last - gap.first + 1
    what = f"{count} message{'s' if count > 1 else ''} sent by {who}"
    if gap.state == "gone":
        why = f"{what} never arrived, and {who} no longer has them (its store was reset or lost)"
    else:
        why = (
            f"{what} never arrived, and {who} did not answer a request to resend them (not running since, or "
            "the request did not reach it); they are still shown if they come"
        )
    return f"mqttalk: GAP from={who} seq={gap.first}-{gap.last} ({why})"


def gap_lines(gaps: list[Gap], limit: int = 20) -> list[str]:
    """The GAP lines of a read, at most ``limit`` of them and one saying how many more (made-up peers
    could otherwise fill an agent's context with them)."""
    lines = [gap_text(gap) for gap in gaps[:limit]]
    if len(gaps) > limit:
        lines.append(f"mqttalk: … and {len(gaps) - limit:,} more GAP lines (`mqttalk recv --json` lists them all)")
    return lines


def outdated_text(peer: str, version: int | None) -> str:
    """A peer speaks another wire version than this mqttalk (see :data:`mqttalk._wire.WIRE_VERSION`)."""
    from ._wire import WIRE_VERSION

    who = line(peer)
    if version is not None and version < WIRE_VERSION:
        return (
            f"{who} runs an older mqttalk (wire v{version}, this one v{WIRE_VERSION}): ask {who} to "
            "upgrade (pip install -U mqttalk); until then messages it misses cannot be resent to it"
        )
    return (
        f"{who} runs a newer mqttalk (wire v{version}, this one v{WIRE_VERSION}): upgrade this one "
        "(pip install -U mqttalk)"
    )


# -- the voice: how a sentence tells its reader what to do next --------------------------------------


@dataclass(frozen=True)
class Voice:
    """The words for the reader's next step: commands for a shell (the CLI, the hooks), tool calls for
    an MCP client. Every sentence below that suggests an action takes one."""

    wait: str  # how to wait for a pairing or a message
    send: str  # how to send


CLI = Voice(wait="`mqttalk recv --wait SECONDS`", send="`mqttalk send`")
MCP = Voice(wait="calling `receive` with a wait", send="calling `send`")

# A command a sentence names, as the MCP tool that does the same (first match wins; `mqttalk broker` and
# `mqttalk mcp` have no tool: they stay commands for the user's terminal).
_AS_TOOLS = [
    (r"`mqttalk recv --wait[^`]*`", "calling `receive` with a wait"),
    (r"`mqttalk recv[^`]*`", "`receive`"),
    (r"`mqttalk status[^`]*`", "`status`"),
    (r"`mqttalk log[^`]*`", "`history`"),
    (r"`mqttalk send[^`]*`", "`send`"),
    (r"`mqttalk create[^`]*`", "`create`"),
    (r"`mqttalk pair[^`]*`", "`pair`"),
    (r"`mqttalk leave[^`]*`", "`leave`"),
    (r"`mqttalk guide[^`]*`", "the `mqttalk://guide` resource"),
    *[(rf"`mqttalk spec {name}[^`]*`", f"`spec_{name}`") for name in ("propose", "agree", "reject", "withdraw")],
    *[(rf"`mqttalk spec {name}[^`]*`", f"`spec_{name}`") for name in ("list", "show", "diff", "export")],
]
_TOOL_NAMES = re.compile("|".join(f"(?:{pattern})" for pattern, _ in _AS_TOOLS))
_RUN_TOOL = re.compile(r"\b(run|use|try) (?=`mqttalk (?!broker|mcp))")


def mcp_voiced(text: str) -> str:
    """A sentence written for a shell, said to an MCP agent: each mqttalk command it names becomes the
    tool that does the same ("run `mqttalk create --as NAME`" -> "call `create`")."""

    def tool(match: re.Match[str]) -> str:
        for pattern, words in _AS_TOOLS:
            if re.fullmatch(pattern, match.group(0)):
                return words
        return match.group(0)  # (unreachable: the alternation is made of the same patterns)

    text = text.replace(" (`mqttalk recv --json` lists them all)", "")  # (no tool lists gaps: all are read)
    return _FLAGS.sub(_parameter, _TOOL_NAMES.sub(tool, _RUN_TOOL.sub("call ", text)))


_FLAGS = re.compile(r"`--([a-z][a-z-]*)(?: ([^`]*))?`")  # a flag named in a sentence: `--re ID`, `--as impl`
_PARAMETERS = {"as": "name"}  # a flag whose tool parameter has another name


def _parameter(match: re.Match[str]) -> str:
    name = _PARAMETERS.get(match.group(1), match.group(1).replace("-", "_"))
    return f"`{name}={match.group(2)}`" if match.group(2) else f"`{name}`"


def paired_text(peer: str, role: str | None) -> str:
    return f"mqttalk: PAIRED with {line(peer, 64)}" + (f" ({line(role, 200)})" if role else "")


def offline_text(peer: str, why: str) -> str:
    return f"mqttalk: OFFLINE {line(peer, 64)} ({line(why, 200)})"


def link_text(down: bool, detail: str) -> str:
    detail = detail.removesuffix(": Unspecified error")  # (paho's word for a connection that just ended)
    return f"mqttalk: {'BROKER_DOWN' if down else 'BROKER_UP'} {line(detail, 300)}"


_NOTICES: dict[str, Callable[[Event], str]] = {
    "paired": lambda e: paired_text(e.peer, e.role),
    "offline": lambda e: offline_text(e.peer, e.detail),
    "outdated": lambda e: f"mqttalk: {outdated_text(e.peer, e.version)}",
    "gap": lambda e: gap_text(e.gap) if e.gap is not None else "",
    "disconnected": lambda e: link_text(True, e.detail),
    "reconnected": lambda e: link_text(False, e.broker),
}


def notice_text(event: Event) -> str | None:
    """The one line for a pairing, a peer gone offline, another wire version, a gap, or the broker
    link going down or up; None for the events that are not notices (messages, drops, waits)."""
    word = _NOTICES.get(event.kind)
    return word(event) or None if word else None


_DATA: dict[str, Callable[[Event], dict[str, Any]]] = {
    "paired": lambda e: {"event": "paired", "peer": e.peer, "role": e.role},
    "offline": lambda e: {"event": "offline", "peer": e.peer, "detail": e.detail},
    "outdated": lambda e: {"event": "outdated", "peer": e.peer, "version": e.version},
    "gap": lambda e: gap_data(e.gap) if e.gap is not None else {"event": "gap"},
    "message": lambda e: {
        "event": "message",
        **(e.envelope.model_dump(mode="json", by_alias=True, exclude_none=True) if e.envelope is not None else {}),
    },
    "reconnected": lambda e: {"event": "reconnected", "detail": e.broker},
}


def event_data(event: Event) -> dict[str, Any]:
    """An event as one JSON object (``--json``): the same facts as its line, as fields."""
    shape = _DATA.get(event.kind)
    return shape(event) if shape else {"event": event.kind, "detail": event.detail}


def gap_data(gap: Gap) -> dict[str, Any]:
    return {"event": "gap", "peer": gap.sender, "first": gap.first, "last": gap.last, "why": gap.state}


def names_text(names: list[str], limit: int = 5) -> str:
    """``a and b``, or ``a, b, c and 9,997 more``: peer names, bounded and made safe."""
    shown = [line(n, 64) for n in names[:limit]]
    if len(names) > limit:
        return ", ".join(shown) + f" and {len(names) - limit:,} more"
    return " and ".join(shown)


def unanswered_text(me: str, names: list[str], voice: Voice, wait: float | None = None) -> str:
    """Joined, and peers are there, but none answered the pairing challenge (in ``wait`` s)."""
    are, it = ("are", "them") if len(names) > 1 else ("is", "it")
    within = f" within {wait:.3g}s" if wait is not None else ""
    return (
        f"joined as {line(me)}; {names_text(names)} {are} in the channel but did not answer the pairing challenge"
        f"{within} (not running now?). Messages you send wait for {it}; {voice.wait} shows PAIRED once an "
        "answer comes (their next mqttalk command gives it)."
    )


def alone_text(me: str, voice: Voice) -> str:
    """Joined, and nobody else is in the channel now."""
    return f"joined as {line(me)}, but no other peer is in the channel now; {voice.wait} shows PAIRED when one comes."


def body_file(bodies: Path, msg_id: str) -> Path:
    """Where a long body is kept: one file per message id, named by the id's safe characters and a hash
    of the whole id, so two ids that differ only in other characters (``X`` and ``X_``: a member forging
    a twin of another peer's message) never share a file."""
    safe = "".join(c for c in msg_id if c.isalnum() or c == "-")[:64]
    return bodies / f"{safe}.{hashlib.sha256(msg_id.encode()).hexdigest()[:12]}.txt"


def spill(bodies: Path, env: Envelope) -> Path:
    """Write ``env``'s whole body to its file (private to the user: the state directory is 0700)."""
    from ._state import private_dir, private_file

    private_dir(bodies)
    path = body_file(bodies, env.id)
    if not path.exists() or path.read_text(encoding="utf-8", errors="replace") != env.body:
        tmp = private_file(path.with_suffix(f".{os.getpid()}.tmp"))  # 0600 whatever the umask
        tmp.write_text(env.body, encoding="utf-8")
        tmp.replace(path)
    return path


def body_text(env: Envelope, bodies: Path | None, *, limit: int = LONG_BODY) -> str:
    """The body as shown (:func:`framed`): whole if short (or ``bodies`` is None), else a preview and the
    file's path."""
    body = str(env.body).rstrip()
    if bodies is None or len(body) <= limit:
        return framed(body)
    path = spill(bodies, env)
    cut = body[:PREVIEW]
    if "\n" in cut[PREVIEW // 2 :]:  # end the preview on a line break when one is near
        cut = cut[: cut.rindex("\n")]
    return f"{framed(cut.rstrip())}\n[... {len(env.body)} characters in all; the whole body is in {path}]"


def message_text(env: Envelope, bodies: Path | None, *, terminal: bool = False) -> str:
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


SCREENFUL = 20  # peers listed at most by `status`, the guide and MCP's status; the rest are counted


def shown_peers(peers: list[PeerInfo], limit: int = SCREENFUL) -> tuple[list[PeerInfo], int]:
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


def status_text(st: Status) -> str:
    """`mqttalk status` as text: the channel, you, your peers with their presence, unread and queued counts.
    Names and roles are the peers' own words: shown escaped, and at most :data:`SCREENFUL` of them."""
    lines = [f"channel: {st.url} ({'sealed' if st.sealed else 'plain'}, {st.protocol})", f"you:     {line(st.me)}"]
    others, more = shown_peers([p for p in st.peers if not p.me])
    if not others:
        lines.append("peers:   none yet (the other session joins with `mqttalk pair URL`)")
    for i, p in enumerate(others):
        role = f" [{line(p.role)}]" if p.role else ""
        proof = "" if p.paired else " (has not answered our pairing challenge yet)"
        lines.append(f"{'peers:' if i == 0 else '':9}{line(p.name)}{role}: {p.liveness()}{proof}")
    if more:
        lines.append(f"{'':9}{more_peers(more)}")
    lines.append(f"unread:  {st.unread}" + (f" (and {st.gaps} gap(s): see `mqttalk recv`)" if st.gaps else ""))
    if st.queued:
        lines.append(f"queued:  {st.queued} message(s) not yet acknowledged by the broker")
    for i, w in enumerate(st.work):
        on = f" on {line(w.spec, 80)} rev {w.rev}" if w.spec else ""
        lines.append(f"{'status:' if i == 0 else '':9}{line(w.peer)}: {w.state}{on}, {w.ago()} ago")
    for w in st.work:
        if w.outdated:
            spec = line(w.spec, 80)
            lines.append(f"warning: {line(w.peer)}'s green is against {spec} rev {w.rev}; rev {w.in_force} is in force")
    return "\n".join(lines)


# -- spec contracts ----------------------------------------------------------------------------------


def spec_state_text(subj: Subject) -> str:
    """Where a subject stands, in a few words: agreed by all (NAMES), agreed by some (NAMES), waiting for
    NAMES, rejected by NAME, conflict, withdrawn; and the revision in force when it is an older one."""
    rev = subj.latest
    state = subj.state
    if state == "withdrawn" and subj.withdrawn is not None:
        text = f"withdrawn by {line(subj.withdrawn[0])}"
    elif state == "conflict":
        names = " and ".join(sorted({line(p.proposer) for p in subj.conflict}))
        text = f"conflict: {names} each proposed a rev {subj.latest_rev} (a new proposal settles it)"
    elif state == "rejected":
        who, why = next(iter(rev.rejected.items()))
        text = f"rejected by {line(who)}: {line(why, 120)}"
    elif state == "agreed":
        text = f"agreed by all ({names_text(sorted({rev.proposer, *rev.others, *rev.agreed}), 8)})"
    else:
        waiting = rev.waiting_for(subj.seen)
        some = f"agreed by some ({names_text(sorted(rev.agreed), 8)}), " if rev.agreed else "proposed, "
        text = some + (f"waiting for {names_text(waiting, 8)}" if waiting else "waiting for another peer to agree")
    force = subj.in_force
    if force is not None and force.rev != rev.rev:
        text += f"; rev {force.rev} is in force"
    return text


def spec_line(subj: Subject) -> str:
    """`spec list`: one line per subject."""
    from ._peer import _ago
    from ._spec import quoted
    from ._wire import now

    rev = subj.latest
    ago = _ago((now() - rev.ts).total_seconds())
    return f"{quoted(subj.name)} rev {rev.rev}: {spec_state_text(subj)} (proposed by {line(rev.proposer)}, {ago} ago)"


def spec_revision_text(subj: Subject, rev: Revision) -> str:
    """`spec show`'s facts line (on stderr; the text itself goes to stdout untouched)."""
    from ._spec import quoted

    agreed = f", agreed by {names_text(sorted(rev.agreed), 8)}" if rev.agreed else ""
    return f"{quoted(subj.name)} rev {rev.rev} by {line(rev.proposer)}, sha256 {rev.digest[:12]}{agreed}" + (
        "" if rev.rev == subj.latest_rev else f" (the latest is rev {subj.latest_rev})"
    )


def spec_data(subj: Subject) -> dict[str, Any]:
    rev = subj.latest
    force = subj.in_force
    return {
        "subject": subj.name,
        "rev": rev.rev,
        "state": subj.state,
        "digest": rev.digest,
        "proposer": rev.proposer,
        "proposed_at": rev.ts.isoformat(),
        "agreed_by": sorted({rev.proposer, *rev.others, *rev.agreed}),  # (a proposal is its proposer's agreement)
        "waiting_for": rev.waiting_for(subj.seen),
        "rejected_by": sorted(rev.rejected),
        "in_force": force.rev if force else None,
    }


def spec_done_text(verb: str, env: Envelope | None, contract: Contract, subject: str) -> str:
    """What a spec command did: ``PROPOSED 'POST /users' rev 2 id=ID sha256=…: waiting for tests``."""
    from ._spec import quoted

    subj = contract.subject(subject)
    rev = subj.revisions.get(int(env.data["rev"]), [subj.latest])[0] if env is not None else subj.latest
    sent = f" id={env.id}" if env is not None else ""
    return f"mqttalk: {verb} {quoted(subject)} rev {rev.rev}{sent} sha256={rev.digest[:12]}: {spec_state_text(subj)}"


def spec_done_data(verb: str, env: Envelope | None, contract: Contract, subject: str) -> dict[str, Any]:
    subj = contract.subject(subject)
    rev = subj.revisions.get(int(env.data["rev"]), [subj.latest])[0] if env is not None else subj.latest
    return {
        "event": verb.lower(),
        "id": env.id if env is not None else None,
        **spec_data(subj),
        "rev": rev.rev,
        "digest": rev.digest,
    }


def status_against(env: Envelope, specs: list[Envelope]) -> str:
    """What a status just sent is against: the spec revision it names (and whether a newer one is in
    force), or that it names none (and which subjects it could have named)."""
    from ._spec import fold, quoted

    contract = fold(specs)
    subject, rev = env.data.get("spec"), env.data.get("rev")
    if isinstance(subject, str) and isinstance(rev, int):
        said = f"the status is against {quoted(subject)} rev {rev}"
        subj = contract.subjects.get(subject)
        force = subj.in_force if subj is not None else None
        named = subj.revisions.get(rev, []) if subj is not None else []
        if named and named[0].rejected:
            who = ", ".join(line(p) for p in sorted(named[0].rejected))
            said += f"; warning: rev {rev} was rejected (by {who}), it is not an agreed revision"
        if force is not None and force.rev > rev:
            said += f"; warning: rev {force.rev} is in force (--rev {force.rev}, or leave --rev out)"
        return said
    agreed = [quoted(s.name) for s, _ in contract.agreed()]
    if not agreed:
        return "the status is not tied to a spec (none is agreed yet)"
    return (
        f"the status is not tied to a spec: {len(agreed)} are agreed ({', '.join(agreed[:5])}); "
        "name one with --spec SUBJECT"
    )
