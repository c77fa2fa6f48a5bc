"""A channel as a document: `mqttalk log --format md|html|json` and the page `mqttalk watch` serves.

The html transcript and the live page are the same rendering (:mod:`._view`'s trees, ``data/watch.html``
and ``data/watch.css``); the transcript has no script and a policy that forbids any, the page adds the
script that keeps it live and the box to take part.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from html import escape as html_escape
from importlib import resources
from string import Template
from typing import TYPE_CHECKING, Any

from ._view import (
    Member,
    Node,
    Spec,
    clock,
    gap_tree,
    is_person,
    last_statuses,
    members_of,
    members_tree,
    message_tree,
    spec_view,
    specs_tree,
    stamp,
    to_html,
)
from ._wire import Envelope, decode_presence

if TYPE_CHECKING:
    from ._channel import Channel
    from ._store import Gap

TRANSCRIPT_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


@dataclass
class Document:
    """Everything a transcript or the page shows, at one moment."""

    channel: str  # the channel's URL as shown (no key, no password)
    at: datetime
    envelopes: list[Envelope]  # the conversation, oldest first
    gaps: list[tuple[Gap, float]] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    persons: set[str] = field(default_factory=set)  # peers whose presence says they are a person
    me: str | None = None  # the person watching (the page)
    earlier: int = 0  # older messages not in ``envelopes`` (the page shows the newest PAGE_ROWS)
    specs: list[Spec] = field(default_factory=list)
    _by_id: dict[str, Envelope] = field(default_factory=dict, init=False, repr=False)
    _indexed: tuple[int, int] = field(default=(0, -1), init=False, repr=False)

    def lookup(self, msg_id: str) -> Envelope | None:
        """A message of the document by id (what an answer answers), if the document holds it."""
        made_of = (id(self.envelopes), len(self.envelopes))
        if self._indexed != made_of:
            self._by_id, self._indexed = {env.id: env for env in self.envelopes}, made_of
        return self._by_id.get(msg_id)


def document(channel: Channel, *, since: str | None = None, limit: int | None = None) -> Document:
    """The channel as this machine's store holds it: messages, gaps, specs, and the members' last known
    presence (a transcript needs no network)."""
    store = channel.store
    cid = channel.url.channel
    envs = channel.history(since=since, limit=limit)
    presences = [p for raw in store.known_presences(cid).values() if (p := decode_presence(raw)) is not None]
    specs_from = envs if since is None and limit is None else channel.history(kind="spec")
    return Document(
        channel.url.display(),
        datetime.now(UTC),
        envs,
        store.gap_list(cid),
        members_of(presences, None),
        {p.peer for p in presences if is_person(p.role)},
        specs=spec_view(specs_from),
    )


def conversation(doc: Document, *, shown: int | None = None, token: str = "") -> list[Node]:
    """The conversation's rows: messages and gaps, in time order."""
    body = (lambda i: f"/body/{i}?token={token}") if token else (lambda i: None)
    rows = [
        (
            env.ts.timestamp(),
            message_tree(env, doc.persons, doc.lookup, shown=shown, body_href=body(env.id) if shown else None),
        )
        for env in doc.envelopes
    ]
    rows += [(found, gap_tree(gap, found)) for gap, found in doc.gaps]
    rows.sort(key=lambda r: r[0])
    return [tree for _, tree in rows]


def _asset(name: str) -> str:
    return resources.files("mqttalk").joinpath("data", name).read_text(encoding="utf-8")


def html(doc: Document, *, page: dict[str, str] | None = None) -> str:
    """The document as one self-contained HTML file (``page``: the live page's extras, see _watch)."""
    statuses = last_statuses(doc.envelopes)
    shown = None if page is None else int(page.get("shown", "0")) or None
    earlier = ""
    if doc.earlier:
        earlier = to_html(["p", {"id": "earlier", "class": "earlier"}, f"{doc.earlier:,} earlier messages not shown"])
    extras = page or {}
    values = {
        "title": html_escape(f"mqttalk: {doc.channel}"),
        "csp": extras.get("csp", TRANSCRIPT_CSP),
        "nonce": extras.get("nonce_attr", ""),
        "css": _asset("watch.css"),
        "body_attrs": extras.get("body_attrs", ' class="transcript"'),
        "channel": to_html(["span", {}, doc.channel]),
        "meta": to_html(["span", {}, extras.get("meta", f"transcript written {clock(doc.at)}")]),
        "members": to_html(members_tree(doc.members, statuses)),
        "specs": to_html(specs_tree(doc.specs)),
        "earlier": earlier + extras.get("older", ""),
        "rows": "\n".join(to_html(t) for t in conversation(doc, shown=shown, token=extras.get("token", ""))),
        "compose": extras.get("compose", ""),
        "script": extras.get("script", ""),
        "link": extras.get("link", ""),
    }
    return Template(_asset("watch.html")).substitute(values)


def markdown(doc: Document) -> str:
    """The document as Markdown: every body and spec text in a fence longer than any it holds, so
    nothing a peer wrote becomes a heading, a link or an image."""
    out = [f"# mqttalk transcript: {_inline(doc.channel)}", "", f"Written {clock(doc.at)}.", ""]
    if doc.members:
        out += ["## Members", ""]
        for m in doc.members:
            who = f"**{m.name}**" + (" (person)" if m.person else f" ({_inline(m.role)})" if m.role else "")
            out.append(f"- {who}: {m.seen}")
        out.append("")
    out += ["## Specs", ""]
    if not doc.specs:
        out += ["No spec yet.", ""]
    for s in doc.specs:
        out += [f"### {_inline(s.subject)}: rev {s.rev}, {s.state}", ""]
        out += [f"- rev {r.rev} {r.state} by {r.sender} at {clock(r.ts)} (id {r.id})" for r in s.history]
        out += ["", *_fenced(s.text, ""), ""]
        for a, b, lines in s.diffs:
            out += [f"Changes from rev {a} to rev {b}:", "", *_fenced("\n".join(lines), "diff"), ""]
    out += ["## Conversation", ""]
    rows: list[tuple[float, list[str]]] = []
    for env in doc.envelopes:
        facts = [env.kind, *([f"to {env.to}"] if env.to else []), *_facts(env), clock(env.ts), f"id {env.id}"]
        head = f"**{env.sender}**" + (" (person)" if env.sender in doc.persons else "") + " · " + " · ".join(facts)
        lines = [head, ""]
        if env.re:
            lines += [f"↳ re {env.re}", ""]
        rows.append((env.ts.timestamp(), [*lines, *_fenced(env.body, "text"), ""]))
    for gap, found in doc.gaps:
        rows.append((found, [f"*{_inline(to_text(gap_tree(gap, found)))}*", ""]))
    for _, lines in sorted(rows, key=lambda r: r[0]):
        out += lines
    return "\n".join(out).rstrip() + "\n"


def as_json(doc: Document) -> str:
    """The document as one JSON object: messages as on the wire, specs, gaps, members."""
    obj: dict[str, Any] = {
        "channel": doc.channel,
        "written": stamp(doc.at),
        "members": [asdict(m) for m in doc.members],
        "specs": [
            {
                "subject": s.subject,
                "rev": s.rev,
                "state": s.state,
                "text": s.text,
                "history": [{**asdict(r), "ts": stamp(r.ts)} for r in s.history],
                "diffs": [{"from": a, "to": b, "diff": "\n".join(lines)} for a, b, lines in s.diffs],
            }
            for s in doc.specs
        ],
        "gaps": [
            {
                "sender": g.sender,
                "first": g.first,
                "last": g.last,
                "state": g.state,
                "found": stamp(datetime.fromtimestamp(f, UTC)),
            }
            for g, f in doc.gaps
        ],
        "messages": [env.model_dump(mode="json", by_alias=True, exclude_none=True) for env in doc.envelopes],
    }
    return json.dumps(obj, ensure_ascii=False, indent=1) + "\n"


def to_text(node: Node) -> str:
    if isinstance(node, str):
        return node
    return " ".join(to_text(kid) for kid in node[2:] if to_text(kid))


def _facts(env: Envelope) -> list[str]:
    from ._view import fields_of

    return [_inline(f) for f in fields_of(env)]


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#!|])")


def _inline(text: str | None) -> str:
    """Peer text on a Markdown line: one line, its markup characters escaped, and no bare URL or address
    a renderer would turn into a link (GitHub's autolinks: http://, www., user@host)."""
    line = _MD_SPECIAL.sub(r"\\\1", " ".join((text or "").split()))
    line = _SCHEME.sub(lambda m: m.group(1) + "\\:", line)
    return _WWW.sub(lambda m: m.group(1) + "\\.", line).replace("@", "\\@")


_SCHEME = re.compile(r"(?i)\b(https?|ftp|mailto|xmpp):")
_WWW = re.compile(r"(?i)\b(www)\.")


def _fenced(text: str, lang: str) -> list[str]:
    runs = [len(m) for m in re.findall(r"`+", text)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    return [fence + lang, *text.split("\n"), fence]
