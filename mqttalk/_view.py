"""What a person sees of a channel (`mqttalk watch`, `mqttalk log --format md|html|json`): the members, the
specs and the conversation, as values, and as element trees.

An element tree is ``[tag, {attribute: value}, child, ...]`` where a child is another tree or a ``str``
(text, never markup). :func:`to_html` writes one as escaped HTML (the transcript, and the page as first
served); the page's script builds new ones with ``createElement`` and ``createTextNode`` (``watch.js``).
One tree, two writers that only know the same few tags and attributes: the live page and the transcript
render a message the same way, and nothing a peer wrote can become markup in either.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING, Any

from ._wire import Envelope, Presence, SpecData, StatusData

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ._store import Gap

Node = Any  # an element tree: [tag, attrs, *children] or a str (see the module's docstring)

PERSON_ROLE = "person"  # the presence role of a person's peer (`mqttalk watch`): never an agent's
BODY_SHOWN = 4000  # characters of a body the live page shows at first (the rest: a link to the whole text)
MEMBERS_SHOWN = 40  # members listed at most; the rest are counted
PAGE_ROWS = 300  # messages the page shows at first (older ones: a button loads them)
TAGS = frozenset(
    [
        "a",
        "article",
        "aside",
        "button",
        "del",
        "details",
        "div",
        "footer",
        "h2",
        "h3",
        "header",
        "ins",
        "li",
        "p",
        "pre",
        "section",
        "span",
        "summary",
        "time",
        "ul",
    ]
)
ATTRS = frozenset(("class", "id", "href", "datetime", "title", "data-id", "data-key", "data-kind", "data-from"))


def is_person(role: str | None) -> bool:
    return role == PERSON_ROLE


def stamp(ts: datetime) -> str:
    """A sort key and machine time: UTC, microseconds, fixed width (strings compare as times)."""
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def clock(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def first_line(text: str, limit: int = 80) -> str:
    line = text.strip().split("\n", 1)[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- values -------------------------------------------------------------------------------------------


@dataclass
class Member:
    name: str
    role: str | None
    state: str  # online / joined / away / left, judged now (a stale online is away)
    seen: str  # "online", "left 3 min ago", "joined, last seen 2 h ago"
    person: bool
    me: bool
    paired_with: list[str] = field(default_factory=list)  # whose current pairing challenge it answers


def members_of(presences: Iterable[Presence], me: str | None) -> list[Member]:
    """Members as their presence shows them now, people and agents alike (the watcher first)."""
    from ._peer import judge

    known = list(presences)
    out = []
    for p in known:
        info = judge(p, me=p.peer == me)
        pairs = sorted(q.peer for q in known if q.peer != p.peer and q.nonce and p.answers_for(q.peer, q.nonce))
        out.append(Member(p.peer, p.role, info.state, info.liveness(), is_person(p.role), p.peer == me, pairs))
    out.sort(key=lambda m: (not m.me, m.person, m.name))
    return out


@dataclass
class Revision:
    rev: int
    state: str
    sender: str
    ts: datetime
    id: str
    body: str


@dataclass
class Spec:
    subject: str
    rev: int  # the latest revision
    state: str  # where the latest revision stands (its newest message's state)
    text: str  # the latest revision's text (as first proposed)
    history: list[Revision]  # every spec message of the subject, oldest first
    diffs: list[tuple[int, int, list[str]]]  # (from rev, to rev, unified diff lines) between revisions


def spec_view(envelopes: Iterable[Envelope]) -> list[Spec]:
    """Each spec subject with its latest revision and where it stands by the agreement rules (see
    :func:`mqttalk._spec.fold`: proposed, waiting for NAMES, agreed, rejected, conflict, withdrawn), its
    text, its messages, and diffs between revisions."""
    from ._spec import fold

    envs = [env for env in envelopes if env.kind == "spec"]
    contract = fold(envs)
    by_subject: dict[str, list[Revision]] = {}
    for env in sorted(envs, key=lambda e: (e.ts, e.id)):
        typed = env.typed()
        if isinstance(typed, SpecData):
            said = "withdrawn" if typed.action == "withdraw" else typed.state
            by_subject.setdefault(typed.subject, []).append(
                Revision(typed.rev, said, env.sender, env.ts, env.id, env.body)
            )
    specs = []
    for name, subj in contract.subjects.items():
        if not subj.revisions or name not in by_subject:
            continue
        texts = {n: props[0].text for n, props in subj.revisions.items()}
        latest = subj.latest
        state = str(subj.state)
        if state in {"waiting", "proposed"}:
            waiting = latest.waiting_for(subj.seen)
            state = f"{state}, waiting for {', '.join(waiting)}" if waiting else state
        numbers = sorted(texts)
        diffs = [
            (a, b, _diff(name, subj.revisions[a][0], subj.revisions[b][0])) for a, b in itertools.pairwise(numbers)
        ]
        specs.append(Spec(name, subj.latest_rev, state, texts[subj.latest_rev], by_subject[name], diffs))
    specs.sort(key=lambda s: s.history[-1].ts, reverse=True)
    return specs


def _diff(subject: str, old: Any, new: Any) -> list[str]:
    """The diff lines between two revisions, bounded as `mqttalk spec diff` is (a crafted pair of texts
    must not cost the page minutes of CPU)."""
    from ._spec import diff_text, too_large_to_diff

    text = diff_text(old, new, f"rev {old.rev}", f"rev {new.rev}")
    return [too_large_to_diff(subject, old, new)] if text is None else text.splitlines()


def last_statuses(envelopes: Iterable[Envelope]) -> dict[str, Envelope]:
    """Each sender's newest status message."""
    out: dict[str, Envelope] = {}
    for env in envelopes:
        if env.kind == "status" and (env.sender not in out or out[env.sender].ts <= env.ts):
            out[env.sender] = env
    return out


# -- trees --------------------------------------------------------------------------------------------


def fields_of(env: Envelope) -> list[str]:
    typed = env.typed()
    if isinstance(typed, SpecData):
        state = "withdrawn" if typed.action == "withdraw" else typed.state
        return [f"subject: {typed.subject}", f"rev {typed.rev}", state]
    if isinstance(typed, StatusData):
        against = [f"on {typed.spec} rev {typed.rev}"] if typed.spec and typed.rev else []
        return [typed.state, *against] + ([f"commit {typed.commit}"] if typed.commit else [])
    return [first_line(f"{k}: {v}", 120) for k, v in sorted(env.data.items())[:8]]  # (a newer peer's kind)


def message_tree(
    env: Envelope,
    persons: set[str],
    lookup: Callable[[str], Envelope | None],
    *,
    shown: int | None = None,
    body_href: str | None = None,
) -> Node:
    """One message: a badge for its kind, sender, time, typed fields, what it answers, the body as text.
    ``shown``: characters of the body shown (the rest behind ``body_href``); None: all of it."""
    kind = env.kind
    head: list[Node] = [
        ["span", {"class": f"badge k-{kind}" if env.known_kind else "badge k-other"}, kind],
        ["span", {"class": "from"}, env.sender],
    ]
    if env.sender in persons:
        head.append(["span", {"class": "person", "title": "a person, not an agent"}, "person"])
    if env.to:
        head.append(["span", {"class": "to"}, f"to {env.to}"])
    head += [["span", {"class": "field"}, f] for f in fields_of(env)]
    head.append(["time", {"datetime": stamp(env.ts)}, clock(env.ts)])
    kids: list[Node] = [["header", {}, *head]]
    if env.re:
        target = lookup(env.re)
        what = f"{target.sender} ({target.kind}): {first_line(target.body, 60)}" if target else env.re
        kids.append(["p", {"class": "re"}, "↳ re ", ["a", {"href": f"#m-{env.re}"}, what]])
    body = env.body
    if shown is not None and len(body) > shown:
        kids.append(["pre", {"class": "body"}, body[:shown] + "…"])
        more = f"{len(body):,} characters in all"
        kids.append(["p", {"class": "more"}, ["a", {"href": body_href}, more] if body_href else more])
    else:
        kids.append(["pre", {"class": "body"}, body])
    kids.append(["footer", {}, ["span", {"class": "id"}, f"id {env.id}"]])
    classes = f"msg k-{kind if env.known_kind else 'other'}" + (" reply" if env.re else "")
    attrs = {
        "class": classes,
        "id": f"m-{env.id}",
        "data-id": env.id,
        "data-from": env.sender,
        "data-key": stamp(env.ts) + env.id,
    }
    return ["article", attrs, *kids]


def gap_tree(gap: Gap, found: float) -> Node:
    """A hole in a sender's messages: being repaired (``open``), or shown as lost."""
    at = datetime.fromtimestamp(found, UTC)
    seqs = f"{gap.first}" if gap.first == gap.last else f"{gap.first}-{gap.last}"
    if gap.state == "open":
        text = f"repairing: {gap.sender}'s messages {seqs} did not arrive; {gap.sender} was asked to send them again"
    elif gap.state == "gone":
        text = f"gap: {gap.sender}'s messages {seqs} never arrived, and {gap.sender} no longer has them"
    else:
        text = f"gap: {gap.sender}'s messages {seqs} never arrived; {gap.sender} did not answer (still asked)"
    return [
        "article",
        {"class": f"gap g-{gap.state}", "id": f"g-{gap.n}", "data-key": stamp(at) + f"~gap{gap.n}"},
        ["header", {}, ["span", {"class": "badge k-gap"}, "gap"], ["time", {"datetime": stamp(at)}, clock(at)]],
        ["p", {}, text],
    ]


def members_tree(members: list[Member], statuses: dict[str, Envelope]) -> Node:
    items: list[Node] = []
    for m in members[:MEMBERS_SHOWN]:
        head: list[Node] = [
            ["span", {"class": f"dot s-{m.state}", "title": m.state}, "●"],
            ["span", {"class": "from"}, m.name],
        ]
        if m.person:
            head.append(["span", {"class": "person"}, "person"])
        if m.me:
            head.append(["span", {"class": "me"}, "you"])
        kids: list[Node] = [["div", {}, *head], ["div", {"class": "seen"}, m.seen]]
        if m.role and not m.person:
            kids.append(["div", {"class": "role"}, m.role])
        kids.append(
            ["div", {"class": "paired"}, f"paired with {', '.join(m.paired_with)}" if m.paired_with else "not paired"]
        )
        st = statuses.get(m.name)
        if st is not None:
            kids.append(_status_line(st))
        items.append(["li", {"class": f"member s-{m.state}", "data-from": m.name}, *kids])
    if len(members) > MEMBERS_SHOWN:  # (a channel flooded with made-up peers stays readable)
        items.append(["li", {"class": "member more"}, f"and {len(members) - MEMBERS_SHOWN:,} more"])
    for name, st in sorted(statuses.items()):  # senders whose presence is not known here (a transcript)
        if name not in {m.name for m in members}:
            items.append(
                [
                    "li",
                    {"class": "member", "data-from": name},
                    ["div", {}, ["span", {"class": "from"}, name]],
                    _status_line(st),
                ]
            )
    return ["ul", {"id": "member-list"}, *items] if items else ["ul", {"id": "member-list"}, ["li", {}, "nobody yet"]]


def _status_line(st: Envelope) -> Node:
    typed = st.typed()
    state = typed.state if isinstance(typed, StatusData) else "?"
    return [
        "div",
        {"class": "status"},
        ["span", {"class": f"badge st-{state}"}, state],
        " ",
        ["a", {"href": f"#m-{st.id}"}, first_line(st.body, 60) or clock(st.ts)],
    ]


def specs_tree(specs: list[Spec]) -> Node:
    if not specs:
        return ["div", {"id": "spec-list"}, ["p", {"class": "none"}, "no spec yet"]]
    blocks: list[Node] = []
    for s in specs:
        who = ", ".join(f"rev {r.rev} {r.state} by {r.sender}" for r in s.history[-4:])
        kids: list[Node] = [
            ["h3", {}, s.subject, " ", ["span", {"class": f"badge sp-{s.state}"}, f"rev {s.rev} · {s.state}"]],
            ["p", {"class": "seen"}, who],
            ["pre", {"class": "body"}, s.text],
        ]
        for a, b, lines in s.diffs[::-1]:
            rows: list[Node] = []
            for line in lines[2:]:  # (the ---/+++ header is the summary)
                cls = "add" if line.startswith("+") else "del" if line.startswith("-") else "ctx"
                rows.append(["span", {"class": cls}, line + "\n"])
            kids.append(["details", {}, ["summary", {}, f"diff rev {a} → rev {b}"], ["pre", {"class": "diff"}, *rows]])
        blocks.append(["div", {"class": "spec", "data-kind": s.state}, *kids])
    return ["div", {"id": "spec-list"}, *blocks]


def to_html(node: Node) -> str:
    """An element tree as HTML: every text and attribute value escaped; only known tags and attributes."""
    if isinstance(node, str):
        return escape(node, quote=False)
    tag, attrs, *kids = node
    if tag not in TAGS:
        raise ValueError(f"tag {tag!r} is not one a tree may hold")
    parts = [f"<{tag}"]
    for key, value in attrs.items():
        if key in ATTRS and not (key == "href" and not str(value).startswith(("#", "/body/"))):
            parts.append(f' {key}="{escape(str(value), quote=True)}"')
    parts.append(">")
    parts += [to_html(kid) for kid in kids]
    parts.append(f"</{tag}>")
    return "".join(parts)
