"""Spec contracts: a channel's spec messages folded into the state of each subject (pure logic, no I/O).

A subject (``POST /users``) has revisions 1, 2, 3 ...; each revision is a text and the sha256 of that
exact text (its *digest*). A revision is *agreed* when every member it needs (those in the channel
when it was proposed, or those it names) agreed to that digest; a newer revision starts over. Two
proposals of one revision number with different texts are a *conflict*, settled by the next proposal.
The revision *in force* is the newest agreed one: a status names it (``green on POST /users rev 3``).

:func:`fold` reads messages in any order (a late joiner gets them from the members' retained copies,
see :class:`~._wire.ContractState`) and never raises on what a peer sent; the ``plan_*`` functions
check a command against the state and build the fields of the message to send, or raise a
:class:`UsageError` whose one line says what stands instead. The only I/O here: :func:`write_exports`.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ._errors import UsageError
from ._wire import CONTRACT_BUDGET, MAX_NEEDS, Envelope, SpecData, contract_item_size, new_envelope, plausible_past

SubjectState = Literal["proposed", "waiting", "agreed", "rejected", "conflict", "withdrawn"]
MAX_SUBJECT = 200  # characters (as the wire's SpecData.subject)
MAX_PROPOSALS = 16  # different texts of one revision number kept at most (more: ignored)


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
        for subj in self.subjects.values():  # a peer's subject with a control character: named as listed
            if subj.revisions and escaped(subj.name) == name:
                return subj
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
    without valid spec fields are skipped; nothing a peer sent makes this raise, and the work stays
    near-linear in the number of messages (proposals are indexed by subject, revision and digest).

    The rules against a peer rewriting what was agreed: agreements (and rejections) from a revision's
    own proposers count for nothing; revision numbers run on without gaps from the lowest one seen (a
    proposal past a gap is ignored); once a revision is agreed, a different proposal of the same number
    is stale and ignored (not a conflict); of more than MAX_PROPOSALS different texts of one revision
    only the first are kept; a withdrawal counts only from the latest revision's proposer, for that
    revision."""
    contract = Contract()
    seen_ids: set[str] = set()
    specs: list[tuple[Envelope, SpecData]] = []
    for env in sorted(envelopes, key=lambda e: (e.ts, e.id)):
        if env.kind != "spec" or env.id in seen_ids or not plausible_past(env.ts):
            continue
        typed = env.typed()
        if isinstance(typed, SpecData):
            seen_ids.add(env.id)
            specs.append((env, typed))
    # every distinct proposal, by subject, revision and digest (the first of a text is its proposer)
    found: dict[str, dict[int, dict[str, Revision]]] = {}
    by_id: dict[str, Revision] = {}
    for env, data in specs:  # proposals first: an agreement may arrive (or be stamped) before its proposal
        if _action(data) != "propose":
            continue
        subj = contract.subjects.setdefault(data.subject, Subject(data.subject))
        subj.seen.add(env.sender)
        text_digest = digest(env.body)
        props = found.setdefault(data.subject, {}).setdefault(data.rev, {})
        same = props.get(text_digest)
        if same is not None:  # the same text proposed twice (by another peer, or sent again): one revision
            if env.sender != same.proposer and env.sender not in same.others:
                same.others.append(env.sender)
            by_id[env.id] = same
            continue
        needs = frozenset(data.needs) if data.needs is not None else None
        rev = Revision(data.rev, env.id, env.sender, env.ts, env.body, text_digest, needs)
        props[text_digest] = rev
        by_id[env.id] = rev
    withdrawals: list[tuple[Envelope, SpecData]] = []
    for env, data in specs:
        action = _action(data)
        if action == "propose" or data.subject not in contract.subjects:
            continue  # (an answer to a proposal nobody here has seen counts for nothing)
        subj = contract.subjects[data.subject]
        subj.seen.add(env.sender)
        if action == "withdraw":
            withdrawals.append((env, data))
            continue
        target = _target(found.get(data.subject, {}), data, env.re, env.ts, by_id)
        if target is None or env.sender == target.proposer or env.sender in target.others:
            continue  # names a text nobody proposed, or a proposer answering itself: it counts for nothing
        if action == "agree":
            target.agreed[env.sender] = env.ts
            target.rejected.pop(env.sender, None)
        else:
            target.rejected[env.sender] = env.body
            target.agreed.pop(env.sender, None)
    for name, revs in found.items():
        subj = contract.subjects[name]
        numbers = sorted(revs)
        for n in numbers:
            if subj.revisions and n > subj.latest_rev + 1:
                break  # a gap: what lies past it (a proposal at rev 1,000,000) is ignored
            texts = sorted(revs[n].values(), key=lambda p: (p.ts, p.id))
            agreed = [p for p in texts if p.agreed_by_all(subj.seen)]
            if agreed:  # agreed once, agreed for good: another text of that number is stale
                texts = [min(agreed, key=lambda p: (max(p.agreed.values()), p.ts, p.id))]
            subj.revisions[n] = texts[:MAX_PROPOSALS]
    for env, data in withdrawals:
        subj = contract.subjects[data.subject]
        if subj.revisions and data.rev == subj.latest_rev and env.sender == subj.latest.proposer:
            subj.withdrawn = (env.sender, data.rev, env.ts)
    return contract


def _action(data: SpecData) -> str:
    if data.action is not None:
        return data.action
    return {"proposed": "propose", "agreed": "agree", "rejected": "reject"}[data.state]


def _target(
    revs: dict[int, dict[str, Revision]], data: SpecData, re: str | None, at: datetime, by_id: dict[str, Revision]
) -> Revision | None:
    """The revision an agreement or rejection is about: by its digest when it names one (never another
    text), else (a `send --kind spec` message) the proposal its ``re`` answers, else its revision number."""
    props = revs.get(data.rev, {})
    if data.digest is not None:
        return props.get(data.digest)
    if re is not None and re in by_id and revs.get(by_id[re].rev, {}).get(by_id[re].digest) is by_id[re]:
        return by_id[re]
    if len(props) != 1:
        return None
    only = next(iter(props.values()))
    return only if at >= only.ts else None  # (by number alone: never an agreement sent before the proposal)


# -- checks and plans: what a command sends ----------------------------------------------------------


def quoted(subject: str) -> str:
    """A subject inside a line of ours: quoted, control characters escaped, at most 80 characters."""
    text = repr(subject) if len(subject) <= 80 else repr(subject[:79] + "…")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def escaped(subject: str) -> str:
    """A subject with each control character or line break written as its escape (``\\x1b``, ``\\n``):
    how a command names a peer's subject that holds one (the plain name cannot be typed on one line)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in subject)


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


def plan_propose(
    contract: Contract, subject: str, text: str, me: str, needs: list[str], envs: list[Envelope] | None = None
) -> dict[str, Any]:
    """The fields of a new revision of ``subject``: the next number after the latest anyone proposed
    (with ``envs``, the spec messages known, refused if it would not fit ``me``'s retained copy)."""
    check_subject(subject)
    check_text(text)
    if len(needs) > MAX_NEEDS:
        raise UsageError(f"--to names {len(needs)} peers, more than {MAX_NEEDS}")
    subj = contract.subjects.get(subject)
    if subj is None:  # a new subject that differs from a known one only by case, spaces or a plural: a typo
        known = [name for name, s in contract.subjects.items() if s.revisions]
        close = [n for n in known if _folded(n) == _folded(subject)]
        if close:
            raise UsageError(
                f"{quoted(subject)} would be a new subject, but {quoted(close[0])} exists",
                f'to revise it: `mqttalk spec propose "{close[0]}" ...`; for a new one, name it more differently',
            )
    if subj is None and subject != subject.strip():
        raise UsageError(f"{quoted(subject)} starts or ends with a space", "a new subject is named without them")
    if subj is not None and subj.latest_rev >= 1_000_000:
        raise UsageError(f"{quoted(subject)} is at the last revision number", "propose under a new subject name")
    rev = (subj.latest_rev if subj else 0) + 1
    if subj is not None and subj.revisions and subj.state not in ("conflict", "withdrawn"):
        latest = subj.latest
        if latest.digest == digest(text):
            raise UsageError(
                f"rev {latest.rev} of {quoted(subject)} already has exactly this text",
                f'agree to it: `mqttalk spec agree "{subject}"`' if latest.proposer != me else "change the text first",
            )
    fields = {
        "subject": subject,
        "rev": rev,
        "state": "proposed",
        "action": "propose",
        "digest": digest(text),
        "needs": sorted(set(needs) - {me}),
    }
    if envs is not None:
        check_fits(envs, me, new_envelope(me, "spec", text, data=fields), contract)
    return fields


def retained(envs: list[Envelope], me: str, contract: Contract | None = None) -> tuple[list[Envelope], frozenset[str]]:
    """What ``me`` retains as its contract state (its own spec messages to the whole channel: a reader
    takes from ``spec/PEER`` only PEER's), and the ids of those never to be dropped for lack of room:
    its messages about each subject's revision in force (the rest: the newest that fit)."""
    contract = contract if contract is not None else fold(envs)
    keep = {(s.name, r.rev) for s, r in contract.agreed()}
    mine = [e for e in envs if e.sender == me and e.kind == "spec" and e.to is None]
    first = set()
    for env in mine:
        typed = env.typed()
        if isinstance(typed, SpecData) and (typed.subject, typed.rev) in keep:
            first.add(env.id)
    return mine, frozenset(first)


def check_fits(envs: list[Envelope], me: str, proposal: Envelope, contract: Contract) -> None:
    """Refuse a proposal that ``me``'s retained contract state could not carry along with the revisions
    it must keep (a late joiner would never see it, and could propose another text of its number)."""
    subject = proposal.data.get("subject")
    subj = contract.subjects.get(str(subject))
    force = subj.in_force.rev if subj is not None and subj.in_force is not None else 0
    mine, first = retained(envs, me, contract)
    kept = 0
    for env in mine:
        typed = env.typed()
        if env.id in first and isinstance(typed, SpecData) and (typed.subject != subject or typed.rev == force):
            kept += contract_item_size(env)
    size = contract_item_size(proposal)
    if kept + size > CONTRACT_BUDGET:
        room = max(CONTRACT_BUDGET - kept, 0)
        raise UsageError(
            f"spec text of {len(proposal.body.encode('utf-8', 'surrogatepass')):,} bytes is too large: a peer's "
            f"retained contract copy carries {CONTRACT_BUDGET // 1024} KiB, {room:,} bytes of it free for this",
            "shorten it or split it into several subjects (a peer that joins later could not see it)",
        )


def default_rev(contract: Contract, subject: str, state: str | None) -> int:
    """The revision of a `send --kind spec` that names none: for a proposal the next after the latest
    anyone proposed (as `spec propose`), for an answer the latest (1 for a subject not seen)."""
    subj = contract.subjects.get(subject)
    latest = subj.latest_rev if subj is not None else 0
    if state in (None, "proposed"):
        return min(latest + 1, 1_000_000)
    return max(latest, 1)


def _folded(subject: str) -> str:
    return " ".join(subject.lower().split()).removesuffix("s")


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
            "wait for the others' (`mqttalk spec list`): a proposer's own agreement does not count",
        )
    return _fields(subj.name, latest, "agreed", "agree"), latest


def plan_reject(contract: Contract, subject: str, me: str, why: str) -> tuple[dict[str, Any], Revision]:
    subj = _open_subject(contract, subject, "reject")
    check_reason(why, subject)
    return _fields(subj.name, subj.latest, "rejected", "reject"), subj.latest


def plan_withdraw(contract: Contract, subject: str, me: str) -> tuple[dict[str, Any], Revision]:
    subj = contract.subject(subject)
    if subj.state == "withdrawn":
        raise UsageError(f"{quoted(subject)} is withdrawn already", "a new `mqttalk spec propose` opens it again")
    latest = subj.latest
    if me != latest.proposer:
        raise UsageError(
            f"only {latest.proposer}, who proposed rev {latest.rev} of {quoted(subject)}, can withdraw it",
            f'say why it is wrong: `mqttalk spec reject "{subject}" "why"`',
        )
    # (state "rejected": a reader older than `mqttalk spec` sees a withdrawal as a rejection)
    return _fields(subj.name, latest, "rejected", "withdraw"), latest


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


def status_request(kind: str, spec: str | None, rev: int | None, flag: str = "--") -> tuple[int | None, int | None]:
    """A send's ``spec``/``rev`` options checked: with ``spec``, ``rev`` is that spec's revision (returned
    first) and no longer the message's own (returned second, None); refused on anything but a status,
    and a status's ``rev`` without ``spec`` (``flag``: how options are named, ``--`` or none for MCP)."""
    if spec is None and not (kind == "status" and rev is not None):
        return None, rev
    if kind != "status":
        raise UsageError(f"{flag}spec applies to a status, not a {kind}", "a spec is sent with `mqttalk spec propose`")
    if spec is None:
        raise UsageError(f"{flag}rev on a status needs {flag}spec SUBJECT", "the revision of which spec?")
    check_subject(spec)
    return check_rev(rev), None


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
        return {"spec": subj.name, "rev": subj.revision(rev).rev}
    force = subj.in_force
    if force is None:
        raise UsageError(
            f"no revision of {quoted(subject)} is agreed yet", f"name one with --rev (the latest is {subj.latest_rev})"
        )
    return {"spec": subj.name, "rev": force.rev}


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
        f"agreed at: {_utc(when)}\n"
        f"the text below this header is the agreed text, byte for byte\n"
        f"{EXPORT_END}"
    )
    return header.encode() + rev.text.encode()


def _utc(when: datetime) -> str:
    """``when`` in UTC, to the second (a date too extreme to convert: as it was written)."""
    try:
        return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError):
        return when.isoformat()


def read_export(data: bytes) -> tuple[dict[str, str], str]:
    """The header fields and the text of a file :func:`export_text` wrote."""
    head, _, text = data.decode().partition(EXPORT_END)
    fields = dict(line.split(": ", 1) for line in head.splitlines()[1:] if ": " in line)
    return fields, text


def export_files(contract: Contract) -> list[tuple[str, bytes, tuple[Subject, Revision]]]:
    """(file name, contents, what) for each subject with a revision in force; names from the subject
    (``POST /users`` -> ``post-users.md``), made unique by a digest of the subject when two collide."""
    files: list[tuple[str, bytes, tuple[Subject, Revision]]] = []
    taken: set[str] = set()  # (lower case: a case-insensitive file system holds one of A.md and a.md)
    for subj, rev in contract.agreed():
        base = re.sub(r"[^a-z0-9]+", "-", subj.name.lower()).strip("-")[:60] or "spec"
        slug, n = base, 0
        while slug.lower() in taken:  # (a suffix can collide too: each candidate is checked again)
            n += 1
            slug = f"{base}-{digest(subj.name)[:8]}" + (f"-{n}" if n > 1 else "")
        taken.add(slug.lower())
        files.append((f"{slug}.md", export_text(subj, rev), (subj, rev)))
    return files


def write_exports(where: Path, files: list[tuple[str, bytes, tuple[Subject, Revision]]]) -> list[Path]:
    """Write :func:`export_files`' files into ``where`` (made if missing): each through a new file in
    ``where`` renamed over the name, so an existing symbolic link (or anything but a plain file) there is
    refused, never written through. Raises OSError or a UsageError naming the path."""
    where.mkdir(parents=True, exist_ok=True)
    for name, _, _ in files:
        try:
            st = os.lstat(where / name)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a plain file"
            raise UsageError(
                f"{where / name} is {kind}: not written (an export never writes through it)",
                "remove it, or export to another directory with --out DIR",
            )
    written = []
    for name, data, _ in files:
        tmp = where / f".{name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, where / name)  # (replaces the name itself: a link put there meanwhile is not followed)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        written.append(where / name)
    return written


# -- diff: bounded (difflib is super-linear on crafted texts) ----------------------------------------

DIFF_MAX_LINES = 2000  # lines of either text a diff is computed for at most
DIFF_MAX_BYTES = 100_000  # bytes (UTF-8) of either text a diff is computed for at most


def diff_text(old: Revision, new: Revision, old_label: str, new_label: str) -> str | None:
    """A unified diff from ``old`` to ``new`` (empty: the same text), or None when either text is over
    DIFF_MAX_LINES lines or DIFF_MAX_BYTES bytes (see :func:`too_large_to_diff`)."""

    for rev in (old, new):
        if rev.text.count("\n") >= DIFF_MAX_LINES or len(rev.text.encode("utf-8", "surrogatepass")) > DIFF_MAX_BYTES:
            return None
    lines = difflib.unified_diff(
        old.text.splitlines(keepends=True), new.text.splitlines(keepends=True), old_label, new_label
    )
    # (as diff(1) marks a last line without a newline, so the diff still applies byte for byte)
    return "".join(ln if ln.endswith("\n") else ln + "\n\\ No newline at end of file\n" for ln in lines)


def too_large_to_diff(subject: str, old: Revision, new: Revision) -> str:
    """The line said instead of a diff too large to compute: each revision's size and digest."""
    sizes = [
        f"rev {r.rev}: {len(r.text.encode('utf-8', 'surrogatepass')):,} bytes, "
        f"{r.text.count(chr(10)) + 1:,} lines, sha256 {r.digest[:12]}"
        for r in (old, new)
    ]
    return (
        f"revisions {old.rev} and {new.rev} of {quoted(subject)} are too large to diff here (over "
        f"{DIFF_MAX_LINES:,} lines or {DIFF_MAX_BYTES // 1000} KB): {sizes[0]}; {sizes[1]}"
    )
