"""Spec contracts: a channel's spec messages folded into the state of each subject (pure logic, no I/O).

A subject (``POST /users``) has revisions 1, 2, 3 ...; each revision is a text and the sha256 of that
exact text (its *digest*). A revision is *agreed* when every member it needs (those in the channel
when it was proposed, or those it names) agreed to that digest; a newer revision starts over. Two
proposals of one revision number with different texts are a *conflict*, settled by the next proposal.
The revision *in force* is the newest agreed one: a status names it (``green on POST /users rev 3``).

:func:`fold` reads messages in any order (a late joiner gets them from the members' retained copies,
see :class:`~._wire.ContractState`) and never raises on what a peer sent; the ``plan_*`` functions
check a command against the state and build the fields of the message to send, or raise a
:class:`UsageError` whose one line says what stands instead.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from ._errors import UsageError
from ._wire import MAX_NEEDS, Envelope, SpecData

SubjectState = Literal["proposed", "waiting", "agreed", "rejected", "conflict", "withdrawn"]
MAX_SUBJECT = 200  # characters (as the wire's SpecData.subject)


def digest(text: str) -> str:
    """The sha256 (hex) of a revision's exact text, as UTF-8."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class Revision:
    """One proposal of a subject: its number, exact text and digest, and who said what about it."""

    rev: int
    id: str
    proposer: str
    ts: datetime
    text: str
    digest: str
    needs: frozenset[str] | None  # the members whose agreement it needs; None: not said (an older message)
    agreed: dict[str, datetime] = field(default_factory=dict)  # peer -> when it agreed to this digest
    rejected: dict[str, str] = field(default_factory=dict)  # peer -> why
    others: list[str] = field(default_factory=list)  # peers who proposed the very same text at this revision

    def waiting_for(self, seen: set[str]) -> list[str]:
        """Members whose agreement this revision still needs (``seen``: who took part in the subject,
        for a revision that does not say whom it needs)."""
        needs = self.needs if self.needs is not None else frozenset(seen)
        return sorted(needs - {self.proposer, *self.others} - set(self.agreed))

    def agreed_by_all(self, seen: set[str]) -> bool:
        return bool(self.agreed) and not self.waiting_for(seen) and not self.rejected


@dataclass
class Subject:
    """Every revision of one subject, and where it stands."""

    name: str
    revisions: dict[int, list[Revision]] = field(default_factory=dict)  # more than one: a conflict
    withdrawn: tuple[str, int, datetime] | None = None  # who withdrew which revision, when
    seen: set[str] = field(default_factory=set)  # peers who took part

    @property
    def latest_rev(self) -> int:
        return max(self.revisions, default=0)

    @property
    def latest(self) -> Revision:
        return self.revisions[self.latest_rev][0]

    @property
    def conflict(self) -> list[Revision]:
        """The proposals of the latest revision number when there are several (else empty)."""
        got = self.revisions.get(self.latest_rev, [])
        return got if len(got) > 1 else []

    @property
    def state(self) -> SubjectState:
        if not self.revisions:
            return "proposed"
        if self.withdrawn is not None and self.withdrawn[1] >= self.latest_rev:
            return "withdrawn"
        if self.conflict:
            return "conflict"
        rev = self.latest
        if rev.rejected:
            return "rejected"
        if rev.agreed_by_all(self.seen):
            return "agreed"
        return "waiting" if rev.agreed else "proposed"

    @property
    def in_force(self) -> Revision | None:
        """The newest revision everyone it needed agreed to (not withdrawn, not in conflict)."""
        if self.state == "withdrawn":
            return None
        for n in sorted(self.revisions, reverse=True):
            props = self.revisions[n]
            if len(props) == 1 and props[0].agreed_by_all(self.seen):
                return props[0]
        return None

    def revision(self, rev: int) -> Revision:
        """Revision ``rev`` (the first proposal of it, in a conflict), or a UsageError naming the latest."""
        if rev not in self.revisions:
            raise UsageError(
                f"{quoted(self.name)} has no revision {rev}",
                f"its revisions are 1 to {self.latest_rev}" if self.latest_rev > 1 else "its only revision is 1",
            )
        return self.revisions[rev][0]


@dataclass
class Contract:
    """The channel's subjects, by name, in the order they were first proposed."""

    subjects: dict[str, Subject] = field(default_factory=dict)

    def subject(self, name: str) -> Subject:
        """The subject called ``name``, or a UsageError that lists the known ones."""
        check_subject(name)
        if name in self.subjects and self.subjects[name].revisions:
            return self.subjects[name]
        known = [quoted(s) for s, subj in self.subjects.items() if subj.revisions][:10]
        raise UsageError(
            f"no spec subject {quoted(name)} in this channel",
            f"known: {', '.join(known)}" if known else "none proposed yet: `mqttalk spec propose SUBJECT TEXT`",
        )

    def agreed(self) -> list[tuple[Subject, Revision]]:
        """Each subject with a revision in force, and that revision."""
        return [(s, r) for s in self.subjects.values() if (r := s.in_force) is not None]


def fold(envelopes: list[Envelope]) -> Contract:
    """The contract that ``envelopes`` (spec messages, any order, duplicates allowed) make. Messages
    without valid spec fields are skipped; nothing a peer sent makes this raise."""
    contract = Contract()
    seen_ids: set[str] = set()
    specs: list[tuple[Envelope, SpecData]] = []
    for env in sorted(envelopes, key=lambda e: (e.ts, e.id)):
        typed = env.typed() if env.kind == "spec" and env.id not in seen_ids else None
        if isinstance(typed, SpecData):
            seen_ids.add(env.id)
            specs.append((env, typed))
    by_id: dict[str, Revision] = {}
    for env, data in specs:  # proposals first: an agreement may arrive (or be stamped) before its proposal
        if _action(data) != "propose":
            continue
        subj = contract.subjects.setdefault(data.subject, Subject(data.subject))
        subj.seen.add(env.sender)
        text_digest = digest(env.body)
        props = subj.revisions.setdefault(data.rev, [])
        same = next((p for p in props if p.digest == text_digest), None)
        if same is not None:  # the same text proposed twice (by another peer, or sent again): one revision
            if env.sender != same.proposer and env.sender not in same.others:
                same.others.append(env.sender)
            by_id[env.id] = same
            continue
        needs = frozenset(data.needs) if data.needs is not None else None
        rev = Revision(data.rev, env.id, env.sender, env.ts, env.body, text_digest, needs)
        props.append(rev)
        by_id[env.id] = rev
    for env, data in specs:
        action = _action(data)
        if action == "propose" or data.subject not in contract.subjects:
            continue  # (an answer to a proposal nobody here has seen counts for nothing)
        subj = contract.subjects[data.subject]
        subj.seen.add(env.sender)
        if action == "withdraw":
            if subj.withdrawn is None or data.rev >= subj.withdrawn[1]:
                subj.withdrawn = (env.sender, data.rev, env.ts)
            continue
        target = _target(subj, data, env.re, by_id)
        if target is None:
            continue  # names a text nobody proposed (or a revision never seen): it counts for nothing
        if action == "agree":
            target.agreed[env.sender] = env.ts
            target.rejected.pop(env.sender, None)
        else:
            target.rejected[env.sender] = env.body
            target.agreed.pop(env.sender, None)
    for subj in contract.subjects.values():
        for props in subj.revisions.values():
            props.sort(key=lambda p: (p.ts, p.id))
    return contract


def _action(data: SpecData) -> str:
    if data.action is not None:
        return data.action
    return {"proposed": "propose", "agreed": "agree", "rejected": "reject"}[data.state]


def _target(subj: Subject, data: SpecData, re: str | None, by_id: dict[str, Revision]) -> Revision | None:
    """The revision an agreement or rejection is about: by its digest when it names one (never another
    text), else (a `send --kind spec` message) the proposal its ``re`` answers, else its revision number."""
    props = subj.revisions.get(data.rev, [])
    if data.digest is not None:
        return next((p for p in props if p.digest == data.digest), None)
    if re is not None and re in by_id and by_id[re] in [p for ps in subj.revisions.values() for p in ps]:
        return by_id[re]
    return props[0] if len(props) == 1 else None


# -- checks and plans: what a command sends ----------------------------------------------------------


def quoted(subject: str) -> str:
    """A subject inside a line of ours: quoted, control characters escaped, at most 80 characters."""
    text = repr(subject) if len(subject) <= 80 else repr(subject[:79] + "…")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def check_subject(subject: str) -> str:
    """A subject is 1-200 printable characters on one line (it heads every line about it)."""
    if not subject.strip():
        raise UsageError("empty spec subject", 'name what the spec is about, e.g. "POST /users"')
    if len(subject) > MAX_SUBJECT:
        raise UsageError(
            f"spec subject is {len(subject):,} characters, over {MAX_SUBJECT}", "keep it a short name, e.g. POST /users"
        )
    if not subject.isprintable():
        raise UsageError(
            f"spec subject {quoted(subject)} holds a control character or line break", "keep it on one plain line"
        )
    return subject


def check_rev(rev: int | None) -> int | None:
    if rev is not None and not 1 <= rev <= 1_000_000:
        raise UsageError(
            f"--rev {rev if abs(rev) < 10**12 else 'too large'} is not a revision", "revisions count from 1"
        )
    return rev


def check_text(text: str) -> str:
    if not text.strip():
        raise UsageError("empty spec text", "give the text as an argument, '-' for stdin, or --file PATH")
    return text


def check_reason(why: str, subject: str) -> str:
    if not why.strip():
        raise UsageError("a rejection needs a reason", f'`mqttalk spec reject "{subject}" "why"`')
    return why


def plan_propose(contract: Contract, subject: str, text: str, me: str, needs: list[str]) -> dict[str, Any]:
    """The fields of a new revision of ``subject``: the next number after the latest anyone proposed."""
    check_subject(subject)
    check_text(text)
    if len(needs) > MAX_NEEDS:
        raise UsageError(f"--to names {len(needs)} peers, more than {MAX_NEEDS}")
    subj = contract.subjects.get(subject)
    rev = (subj.latest_rev if subj else 0) + 1
    if subj is not None and subj.revisions and subj.state not in ("conflict", "withdrawn"):
        latest = subj.latest
        if latest.digest == digest(text):
            raise UsageError(
                f"rev {latest.rev} of {quoted(subject)} already has exactly this text",
                f'agree to it: `mqttalk spec agree "{subject}"`' if latest.proposer != me else "change the text first",
            )
    return {
        "subject": subject,
        "rev": rev,
        "state": "proposed",
        "action": "propose",
        "digest": digest(text),
        "needs": sorted(set(needs) - {me}),
    }


def plan_agree(contract: Contract, subject: str, me: str, rev: int | None = None) -> tuple[dict[str, Any], Revision]:
    """The fields of an agreement to revision ``rev`` (default: the latest) and that revision; refused
    for any revision but the latest, in a conflict, or once withdrawn."""
    subj = _open_subject(contract, subject, "agree to")
    latest = subj.latest
    if rev is not None and rev != latest.rev:
        subj.revision(rev)  # (a revision that never existed is told as such)
        raise UsageError(
            f"rev {rev} of {quoted(subject)} is not the latest: rev {latest.rev} is (proposed by {latest.proposer})",
            f'read it with `mqttalk spec show "{subject}"`, then `mqttalk spec agree "{subject}"`',
        )
    if me == latest.proposer or me in latest.others:
        raise UsageError(
            f"you proposed rev {latest.rev} of {quoted(subject)}: your proposal is your agreement",
            "wait for the others' (`mqttalk spec list`)",
        )
    return _fields(subject, latest, "agreed", "agree"), latest


def plan_reject(contract: Contract, subject: str, me: str, why: str) -> tuple[dict[str, Any], Revision]:
    subj = _open_subject(contract, subject, "reject")
    check_reason(why, subject)
    return _fields(subject, subj.latest, "rejected", "reject"), subj.latest


def plan_withdraw(contract: Contract, subject: str, me: str) -> tuple[dict[str, Any], Revision]:
    subj = contract.subject(subject)
    if subj.state == "withdrawn":
        raise UsageError(f"{quoted(subject)} is withdrawn already", "a new `mqttalk spec propose` opens it again")
    latest = subj.latest
    if me != latest.proposer and me not in latest.others:
        raise UsageError(
            f"only {latest.proposer}, who proposed rev {latest.rev} of {quoted(subject)}, can withdraw it",
            f'say why it is wrong: `mqttalk spec reject "{subject}" "why"`',
        )
    # (state "rejected": a reader older than `mqttalk spec` sees a withdrawal as a rejection)
    return _fields(subject, latest, "rejected", "withdraw"), latest


def _open_subject(contract: Contract, subject: str, verb: str) -> Subject:
    subj = contract.subject(subject)
    if subj.state == "withdrawn":
        who = subj.withdrawn[0] if subj.withdrawn else "its proposer"
        raise UsageError(
            f"{quoted(subject)} was withdrawn by {who}: nothing to {verb}",
            f'propose a new revision: `mqttalk spec propose "{subject}" TEXT`',
        )
    if subj.conflict:
        names = " and ".join(sorted({p.proposer for p in subj.conflict}))
        raise UsageError(
            f"rev {subj.latest_rev} of {quoted(subject)} is in conflict ({names} each proposed one)",
            f'settle it with a new revision: `mqttalk spec propose "{subject}" TEXT`',
        )
    return subj


def _fields(subject: str, rev: Revision, state: str, action: str) -> dict[str, Any]:
    return {"subject": subject, "rev": rev.rev, "state": state, "action": action, "digest": rev.digest}


def status_spec(contract: Contract, subject: str | None, rev: int | None) -> dict[str, Any]:
    """The spec fields of a status: ``subject`` at ``rev`` (default: the revision in force), or with no
    subject the one subject that has a revision in force (none if there is not exactly one)."""
    if subject is None:
        if rev is not None:
            raise UsageError("--rev on a status needs --spec SUBJECT")
        agreed = contract.agreed()
        return {"spec": agreed[0][0].name, "rev": agreed[0][1].rev} if len(agreed) == 1 else {}
    subj = contract.subject(subject)
    if rev is not None:
        return {"spec": subject, "rev": subj.revision(rev).rev}
    force = subj.in_force
    if force is None:
        raise UsageError(
            f"no revision of {quoted(subject)} is agreed yet", f"name one with --rev (the latest is {subj.latest_rev})"
        )
    return {"spec": subject, "rev": force.rev}


# -- export: the agreed text, byte for byte, under a small header ------------------------------------

EXPORT_END = "-->\n"  # the header is an HTML comment: Markdown shows only the text after it


def export_text(subj: Subject, rev: Revision) -> bytes:
    """One agreed subject as a Markdown file: a header (subject, revision, digest, who agreed, when) in
    an HTML comment, then the agreed text exactly (it may end without a newline)."""
    when = max(rev.agreed.values(), default=rev.ts)
    agreed = sorted({rev.proposer, *rev.others, *rev.agreed})
    name = json.dumps(subj.name, ensure_ascii=False).replace("-->", "--\\u003e")  # (cannot end the comment)
    header = (
        "<!-- mqttalk spec\n"
        f"subject: {name}\n"
        f"revision: {rev.rev}\n"
        f"digest: sha256:{rev.digest}\n"
        f"proposed by: {rev.proposer}\n"
        f"agreed by: {', '.join(agreed)}\n"
        f"agreed at: {when.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
        f"the text below this header is the agreed text, byte for byte\n"
        f"{EXPORT_END}"
    )
    return header.encode() + rev.text.encode()


def read_export(data: bytes) -> tuple[dict[str, str], str]:
    """The header fields and the text of a file :func:`export_text` wrote."""
    head, _, text = data.decode().partition(EXPORT_END)
    fields = dict(line.split(": ", 1) for line in head.splitlines()[1:] if ": " in line)
    return fields, text


def export_files(contract: Contract) -> list[tuple[str, bytes, tuple[Subject, Revision]]]:
    """(file name, contents, what) for each subject with a revision in force; names from the subject
    (``POST /users`` -> ``post-users.md``), made unique by a digest of the subject when two collide."""
    files: list[tuple[str, bytes, tuple[Subject, Revision]]] = []
    taken: set[str] = set()
    for subj, rev in contract.agreed():
        slug = re.sub(r"[^a-z0-9]+", "-", subj.name.lower()).strip("-")[:60] or "spec"
        if slug in taken:
            slug = f"{slug}-{digest(subj.name)[:8]}"
        taken.add(slug)
        files.append((f"{slug}.md", export_text(subj, rev), (subj, rev)))
    return files
