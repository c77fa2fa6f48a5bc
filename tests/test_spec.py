"""Spec contracts (`mqttalk spec`): sessions negotiate a subject revision by revision, agree to a digest,
report status against the revision in force, and export what they agreed; a peer that joins later sees
the contract. Real `mqttalk` commands on Mosquitto (MQTT 5) and the embedded amqtt broker."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import Result, Session, channel_topics, paired
from paho.mqtt.enums import CallbackAPIVersion

from mqttalk import JoinURL
from mqttalk._spec import read_export
from mqttalk._wire import now

SUBJECT = "POST /users"
REV1 = "POST /users takes {email, name}; returns 201 {id, created_at}."
REV2 = "POST /users takes {email, name}; returns 201 {id, created_at}; 409 if the email exists."
REV3 = REV2 + "\nname is 1-100 characters; 422 otherwise."


def lines_json(res: Result) -> list[dict[str, object]]:
    return [json.loads(line) for line in res.lines if line.startswith("{")]


def spec_list(session: Session) -> dict[str, dict[str, object]]:
    """`spec list --json`, by subject."""
    return {str(o["subject"]): o for o in lines_json(session.ok("spec", "list", "--json")) if o["event"] == "spec"}


def one_error_line(res: Result) -> str:
    """A refused command: non-zero exit, nothing on stdout, one `mqttalk: error:` line and no traceback."""
    err = [line for line in res.err.splitlines() if line.strip()]
    assert res.code != 0, res
    assert "Traceback" not in res.err and "internal error" not in res.err, res.err
    assert len(err) == 1 and err[0].startswith("mqttalk: error: "), res.err
    assert not res.out.strip(), res.out
    return err[0]


def join(session: Session, url: str) -> None:
    """``session`` joins without waiting for an answer (the others run no mqttalk now: exit 3 says so)."""
    res = session.run("pair", url, "--as", session.name, "--wait", "0")
    assert res.code in (0, 3) and f"joined as {session.name}" in res.err + res.out, res


@pytest.fixture
def pair_of(sessions: tuple[Session, Session], broker_url: str) -> tuple[Session, Session]:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    return impl, tests


def negotiate_to_rev3(impl: Session, tests: Session) -> None:
    """impl proposes, tests counter-proposes (answering the proposal), impl proposes rev 3, tests agrees."""
    first = lines_json(impl.ok("spec", "propose", SUBJECT, REV1, "--json"))[0]
    assert first["rev"] == 1 and first["waiting_for"] == ["tests"]
    assert "kind=spec" in tests.ok("recv").out
    counter = tests.ok("spec", "propose", SUBJECT, REV2, "--re", str(first["id"]))
    assert f"mqttalk: PROPOSED '{SUBJECT}' rev 2 " in counter.out and "waiting for impl" in counter.out
    third = impl.ok("spec", "propose", SUBJECT, "-", input=REV3)
    assert "rev 3" in third.out and "waiting for tests" in third.out
    agreed = tests.ok("spec", "agree", SUBJECT)
    assert f"mqttalk: AGREED '{SUBJECT}' rev 3 id=" in agreed.out
    assert f" sha256={hashlib.sha256(REV3.encode()).hexdigest()[:12]}: " in agreed.out
    assert "agreed by all (impl and tests)" in agreed.out


def test_two_peers_negotiate_with_a_counter_proposal_and_agree(pair_of: tuple[Session, Session]) -> None:
    impl, tests = pair_of
    negotiate_to_rev3(impl, tests)
    for side in (impl, tests):
        got = spec_list(side)[SUBJECT]
        assert got["rev"] == 3 and got["state"] == "agreed" and got["in_force"] == 3
        assert got["digest"] == hashlib.sha256(REV3.encode()).hexdigest()
        assert got["proposer"] == "impl" and got["agreed_by"] == ["impl", "tests"]  # (its proposal: impl's word)
        assert side.ok("spec", "show", SUBJECT).out == REV3
        assert side.ok("spec", "show", SUBJECT, "--rev", "2").out == REV2
    text = impl.ok("spec", "list").out
    assert text.startswith(f"'{SUBJECT}' rev 3: agreed by all (impl and tests) (proposed by impl, ")
    diff = tests.ok("spec", "diff", SUBJECT, "2", "3").out
    assert "+name is 1-100 characters; 422 otherwise." in diff and "\\ No newline at end of file" in diff
    # What an agent reading `recv` sees of it: each step as a spec message with its revision and state.
    got = impl.ok("recv").out
    assert "rev=2 state=proposed" in got and "rev=3 state=agreed" in got


def test_three_peers_need_every_member_present_at_proposal(tmp_path: Path, broker_url: str) -> None:
    impl, tests, review = (Session(n, tmp_path) for n in ("impl", "tests", "review"))
    url = paired(impl, tests, broker_url)
    join(review, url)
    impl.ok("recv")
    tests.ok("recv")
    proposed = impl.ok("spec", "propose", SUBJECT, REV1)
    assert "waiting for review and tests" in proposed.out
    counter = review.ok("spec", "propose", SUBJECT, REV2)
    assert "rev 2" in counter.out and "waiting for impl and tests" in counter.out
    some = impl.ok("spec", "agree", SUBJECT)
    assert "agreed by some (impl), waiting for tests" in some.out
    assert spec_list(review)[SUBJECT]["state"] == "waiting"
    assert "agreed by all (impl and review and tests)" in tests.ok("spec", "agree", SUBJECT).out
    assert spec_list(review)[SUBJECT]["state"] == "agreed"
    # --to names whose agreement a revision needs: only review's here.
    only = impl.ok("spec", "propose", "GET /users", "lists users, newest first", "--to", "review")
    assert "waiting for review" in only.out and "tests" not in only.out
    assert "agreed by all (impl and review)" in review.ok("spec", "agree", "GET /users").out


def test_status_green_is_tied_to_the_revision_in_force(pair_of: tuple[Session, Session]) -> None:
    impl, tests = pair_of
    negotiate_to_rev3(impl, tests)
    # The one agreed subject is the default (as far as this machine knows: impl reads the agreement first);
    # a status says so in its fields and in `status`.
    assert "state=agreed" in impl.ok("recv").out
    sent = impl.ok("send", "--kind", "status", "--state", "green", "implemented")
    assert "kind=status" in sent.out
    tests.ok("send", "--kind", "status", "--state", "red", "--spec", SUBJECT, "two tests fail")
    assert "state=red" in impl.ok("recv").out
    got = [json.loads(line) for line in impl.ok("log", "--kind", "status", "--json").lines]
    assert [(m["from"], m["data"]) for m in got] == [
        ("impl", {"state": "green", "spec": SUBJECT, "rev": 3}),
        ("tests", {"state": "red", "spec": SUBJECT, "rev": 3}),
    ]
    st = tests.ok("status").out
    assert f"impl: green on {SUBJECT} rev 3, " in st and f"tests: red on {SUBJECT} rev 3, " in st
    assert "warning" not in st
    # A green against rev 2 while rev 3 is in force is flagged.
    tests.ok("send", "--kind", "status", "--state", "green", "--spec", SUBJECT, "--rev", "2", "green on the old one")
    st = impl.ok("status").out
    assert f"tests: green on {SUBJECT} rev 2, " in st
    assert f"warning: tests's green is against {SUBJECT} rev 2; rev 3 is in force" in st
    obj = next(o for o in lines_json(impl.ok("status", "--json")) if o.get("event") == "status")
    work = {w["peer"]: w for w in obj["work"]}  # type: ignore[index]
    assert work["tests"]["rev"] == 2 and work["tests"]["in_force"] == 3 and work["impl"]["rev"] == 3


def test_a_late_joiner_sees_the_contract(tmp_path: Path, broker_url: str) -> None:
    impl, tests, late = (Session(n, tmp_path) for n in ("impl", "tests", "late"))
    url = paired(impl, tests, broker_url)
    negotiate_to_rev3(impl, tests)
    join(late, url)
    got = spec_list(late)[SUBJECT]
    assert got["rev"] == 3 and got["state"] == "agreed" and got["proposer"] == "impl"
    assert late.ok("spec", "show", SUBJECT).out == REV3
    assert late.ok("spec", "show", SUBJECT, "--rev", "1").out == REV1
    assert "kind=spec" not in late.ok("recv").out  # (relayed: the contract, not messages to read again)
    # The late joiner builds against it too: its status defaults to the revision in force.
    late.ok("send", "--kind", "status", "--state", "working", "reviewing")
    assert f"late: working on {SUBJECT} rev 3" in impl.ok("status").out
    # And a new revision it proposes counts from the others' revisions.
    assert "rev 4" in late.ok("spec", "propose", SUBJECT, REV3 + "\n(and a Location header)").out


def test_concurrent_proposals_are_a_conflict_on_both_sides(pair_of: tuple[Session, Session]) -> None:
    impl, tests = pair_of
    impl.ok("spec", "propose", SUBJECT, REV1)
    tests.ok("spec", "agree", SUBJECT)
    impl.ok("spec", "propose", SUBJECT, REV2)
    # tests proposes its own rev 2 before it has read impl's: with the plain `send --kind spec`, which (as a
    # `spec propose` racing impl's would) sends without taking in what is queued for it first.
    tests.ok("send", "--kind", "spec", "--subject", SUBJECT, "--rev", "2", "POST /users takes {email} only")
    for side in (impl, tests):
        got = spec_list(side)[SUBJECT]
        assert got["state"] == "conflict" and got["rev"] == 2 and got["in_force"] == 1
        assert "conflict: impl and tests each proposed a rev 2" in side.ok("spec", "list").out
        assert "is in conflict (impl and tests each proposed one)" in one_error_line(side.run("spec", "agree", SUBJECT))
    # The next proposal settles it.
    assert "rev 3" in tests.ok("spec", "propose", SUBJECT, REV3).out
    assert "agreed by all" in impl.ok("spec", "agree", SUBJECT).out
    assert spec_list(tests)[SUBJECT]["in_force"] == 3


def test_an_agreement_to_a_stale_revision_is_refused_naming_the_latest(pair_of: tuple[Session, Session]) -> None:
    impl, tests = pair_of
    impl.ok("spec", "propose", SUBJECT, REV1)
    impl.ok("spec", "propose", SUBJECT, REV2)
    line = one_error_line(tests.run("spec", "agree", SUBJECT, "--rev", "1"))
    assert f"rev 1 of '{SUBJECT}' is not the latest: rev 2 is (proposed by impl)" in line
    assert spec_list(tests)[SUBJECT]["agreed_by"] == ["impl"]  # the proposer's only: tests sent nothing
    # The agreement names the digest: one to rev 2's text never counts for another text.
    assert "agreed by all" in tests.ok("spec", "agree", SUBJECT, "--rev", "2").out
    assert "your proposal is your agreement" in one_error_line(impl.run("spec", "agree", SUBJECT))


def test_reject_and_withdraw(pair_of: tuple[Session, Session]) -> None:
    impl, tests = pair_of
    impl.ok("spec", "propose", SUBJECT, REV1)
    rejected = tests.ok("spec", "reject", SUBJECT, "no 409 for a duplicate email")
    assert "rejected by tests: no 409 for a duplicate email" in rejected.out
    assert spec_list(impl)[SUBJECT]["state"] == "rejected"
    assert "only impl, who proposed rev 1" in one_error_line(tests.run("spec", "withdraw", SUBJECT))
    assert "withdrawn by impl" in impl.ok("spec", "withdraw", SUBJECT).out
    assert "was withdrawn by impl" in one_error_line(tests.run("spec", "agree", SUBJECT))
    assert "rev 2" in impl.ok("spec", "propose", SUBJECT, REV2).out  # a new proposal opens it again
    assert spec_list(tests)[SUBJECT]["state"] == "proposed"


TRICKY = 'He said "don\'t" and `rm -rf` $HOME\\n  \ntrailing spaces   \n\tnon-ASCII: naïve café — 東京 🚀  '


def test_export_round_trips_byte_for_byte(pair_of: tuple[Session, Session], tmp_path: Path) -> None:
    impl, tests = pair_of
    source = tmp_path / "spec.md"
    source.write_bytes(TRICKY.encode())
    impl.ok("spec", "propose", "GET /users/{id}", "--file", str(source))
    impl.ok("spec", "propose", SUBJECT, "-", input=TRICKY + "\n")  # stdin, with its final newline
    tests.ok("spec", "agree", "GET /users/{id}")
    tests.ok("spec", "agree", SUBJECT)
    out = tmp_path / "specs"
    res = tests.ok("spec", "export", "--out", str(out), "--json")
    written = {str(o["subject"]): Path(str(o["path"])) for o in lines_json(res)}
    assert set(written) == {SUBJECT, "GET /users/{id}"}
    assert sorted(p.name for p in out.iterdir()) == ["get-users-id.md", "post-users.md"]
    for subject, text in (("GET /users/{id}", TRICKY), (SUBJECT, TRICKY + "\n")):
        header, body = read_export(written[subject].read_bytes())
        assert body == text
        assert written[subject].read_bytes().endswith(text.encode())
        assert header["digest"] == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        assert json.loads(header["subject"]) == subject and header["revision"] == "1"
        assert header["agreed by"] == "impl, tests"
        assert impl.ok("spec", "show", subject).out == text
    # Without --out nothing goes into the working directory: the state directory holds the files.
    res = impl.ok("spec", "export")
    assert str(impl.state_dir) in res.out and not list(impl.cwd.iterdir())


def test_old_send_kind_spec_messages_still_count(pair_of: tuple[Session, Session]) -> None:
    impl, tests = pair_of
    sent = impl.ok("send", "--kind", "spec", "--subject", SUBJECT, REV1)
    sid = sent.out.split("id=")[1].split()[0]
    tests.ok("send", "--kind", "spec", "--subject", SUBJECT, "--state", "agreed", "--re", sid, "ok")
    got = spec_list(impl)[SUBJECT]
    assert got["state"] == "agreed" and got["rev"] == 1 and got["agreed_by"] == ["impl", "tests"]
    assert impl.ok("spec", "show", SUBJECT).out == REV1


def test_bad_input_is_one_clear_line(pair_of: tuple[Session, Session]) -> None:
    impl, tests = pair_of
    impl.ok("spec", "propose", SUBJECT, REV1)
    cases: list[tuple[tuple[str, ...], str]] = [
        (("spec", "agree", "GET /nothing"), "no spec subject 'GET /nothing' in this channel"),
        (("spec", "show", "GET /nothing"), "no spec subject"),
        (("spec", "reject", "GET /nothing", "why"), "no spec subject"),
        (("spec", "withdraw", "GET /nothing"), "no spec subject"),
        (("spec", "diff", "GET /nothing", "1", "2"), "no spec subject"),
        (("spec", "show", SUBJECT, "--rev", "7"), f"'{SUBJECT}' has no revision 7"),
        (("spec", "diff", SUBJECT, "1", "9"), "has no revision 9"),
        (("spec", "agree", SUBJECT, "--rev", "0"), "--rev 0 is not a revision"),
        (("spec", "show", SUBJECT, "--rev", str(10**30)), "is not a revision"),
        (("spec", "diff", SUBJECT, "0", "1"), "--rev 0 is not a revision"),
        (("spec", "agree", SUBJECT, "--rev", "two"), "Invalid value for '--rev': 'two'"),
        (("spec", "propose", SUBJECT, ""), "empty spec text"),
        (("spec", "propose", SUBJECT, "   \n"), "empty spec text"),
        (("spec", "propose", "", "text"), "empty spec subject"),
        (("spec", "propose", "x" * 10240, "text"), "spec subject is 10,240 characters, over 200"),
        (("spec", "agree", "POST\n/users"), "holds a control character or line break"),
        (("spec", "propose", "POST \x1b[31m/users", "t"), "holds a control character"),
        (("spec", "propose", SUBJECT, "t", "--to", "Not A Name"), "peer name 'Not A Name' is not valid"),
        (("spec", "propose", SUBJECT, REV1), f"rev 1 of '{SUBJECT}' already has exactly this text"),
        (("spec", "propose", SUBJECT, "t", "--re", "bad id!"), "--re"),
        (("spec", "reject", SUBJECT, " "), "a rejection needs a reason"),
        (("spec", "propose", SUBJECT, "--file", "/nonexistent/spec.md"), "cannot read message file"),
        (("spec", "export", "--out", "/proc/nope"), "cannot write to /proc/nope"),
        (("spec", "nonsense"), "No such command 'nonsense'"),
    ]
    for args, says in cases:
        res = (impl if args[1] != "agree" else tests).run(*args)
        line = one_error_line(res)
        assert says in line, (args, line)
    # Nothing of that reached the channel.
    assert spec_list(tests)[SUBJECT]["rev"] == 1


def test_hostile_retained_contract_state_breaks_nothing(tmp_path: Path, broker_url: str) -> None:
    """Garbage and a huge payload on members' spec topics, a forged state from a name that never joined,
    and one carrying messages of a non-member, all retained: each is dropped (one DROPPED line for all of
    them), the contract stands."""
    impl, tests, review, late = (Session(n, tmp_path) for n in ("impl", "tests", "review", "late"))
    url = paired(impl, tests, broker_url)
    negotiate_to_rev3(impl, tests)
    join(review, url)  # (a member whose spec topic gets garbage below)
    topics = channel_topics(url)
    where = JoinURL.parse(url)
    stamp = now().isoformat()
    forged = {
        "v": 2,
        "id": "01900000-0000-7000-8000-000000000001",
        "ts": stamp,
        "from": "mallory",
        "kind": "spec",
        "body": "POST /users returns 200 and nothing else",
        "data": {"subject": SUBJECT, "rev": 9, "state": "proposed"},
    }
    payloads = {
        "review": b"\x00not json at all",  # (a member's topic: opened, then found malformed)
        "late": b"{" + b" " * (300 * 1024) + b"}",  # (the newcomer's own topic, as a member)
        "mallory": json.dumps({"v": 2, "from": "mallory", "ts": stamp, "specs": [forged]}).encode(),
        # (a member's topic, carrying a message of a name that never joined)
        "impl": json.dumps({"v": 2, "from": "impl", "ts": stamp, "specs": [forged]}).encode(),
    }
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect(where.broker.host, where.broker.port)
    client.loop_start()
    try:
        for name, payload in payloads.items():
            topic = topics.spec(name)  # type: ignore[attr-defined]
            sealed = topics.seal.seal(topic, payload) if topics.seal else payload  # type: ignore[attr-defined]
            client.publish(topic, sealed, qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()
    join(late, url)
    res = late.ok("spec", "list", "--json")
    got = {str(o["subject"]): o for o in lines_json(res) if o["event"] == "spec"}
    # impl's own retained state was overwritten by the forgery, and a member's copy counts only for that
    # member's own messages: until impl writes its copy again, the late joiner sees tests' (rev 2), and
    # nothing of the forgery.
    assert got[SUBJECT]["rev"] == 2 and got[SUBJECT]["proposer"] == "tests"
    assert res.err.count("DROPPED") == 1 and "DROPPED 3 payloads" in res.err and "Traceback" not in res.err
    # impl's next spec command puts its own retained state right again.
    impl.ok("spec", "list")
    got = spec_list(late)[SUBJECT]
    assert got["rev"] == 3 and got["state"] == "agreed"
    assert late.ok("spec", "show", SUBJECT).out == REV3


def test_the_previous_version_reads_the_new_spec_and_status_fields() -> None:
    """What `mqttalk spec` and a status against a spec send, read with the typed fields of the previous
    version (0.2.0, copied here as they were): still a spec with its subject, revision and a state it
    knows (a withdrawal reads as rejected), still a status; the new fields ride along as extras."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    from mqttalk._spec import Contract, fold, plan_propose, plan_withdraw
    from mqttalk._wire import decode_envelope, new_envelope

    class OldSpecData(BaseModel):
        model_config = ConfigDict(extra="allow")
        subject: str = Field(min_length=1, max_length=200)
        rev: int = Field(1, ge=1, le=1_000_000)
        state: Literal["proposed", "agreed", "rejected"] = "proposed"

    class OldStatusData(BaseModel):
        model_config = ConfigDict(extra="allow")
        state: Literal["red", "green", "blocked", "working", "done"]
        commit: str | None = Field(None, pattern=r"^[\x21-\x7e]{1,64}$")

    proposal = new_envelope("impl", "spec", REV1, data=plan_propose(Contract(), SUBJECT, REV1, "impl", ["tests"]))
    withdrawal = new_envelope("impl", "spec", "withdrew", data=plan_withdraw(fold([proposal]), SUBJECT, "impl")[0])
    status = new_envelope("tests", "status", "green", data={"state": "green", "spec": SUBJECT, "rev": 1})
    for env, model, expect in (
        (proposal, OldSpecData, {"subject": SUBJECT, "rev": 1, "state": "proposed"}),
        (withdrawal, OldSpecData, {"subject": SUBJECT, "rev": 1, "state": "rejected"}),
        (status, OldStatusData, {"state": "green"}),
    ):
        wire = decode_envelope(env.encode())
        assert wire is not None and wire.v == 2  # (no new wire version: nothing an older reader refuses)
        old = model.model_validate(wire.data)
        assert {k: getattr(old, k) for k in expect} == expect


def test_mcp_tools_negotiate_the_same_contract(pair_of: tuple[Session, Session], tmp_path: Path) -> None:
    """The spec tools of two MCP servers (each holding its peer's session): the same contract, the same
    refusals, worded as tool results."""
    import anyio
    from test_agents import call, mcp_client

    impl, tests = pair_of

    async def scenario() -> None:
        async with mcp_client(impl, tmp_path / "impl.err") as a, mcp_client(tests, tmp_path / "tests.err") as b:
            proposed = await call(a, "spec_propose", subject=SUBJECT, text=REV1)
            assert f"PROPOSED '{SUBJECT}' rev 1 id=" in proposed and "waiting for tests" in proposed
            shown = await call(b, "spec_show", subject=SUBJECT)
            assert shown.endswith("the text, exactly as proposed:\n\n" + REV1)
            counter = await call(b, "spec_propose", subject=SUBJECT, text=REV2)
            assert "rev 2" in counter
            stale = await a.call_tool("spec_agree", {"subject": SUBJECT, "rev": 1})
            assert stale.is_error and "rev 1 of 'POST /users' is not the latest: rev 2 is" in stale.content[0].text
            assert "agreed by all (impl and tests)" in await call(a, "spec_agree", subject=SUBJECT)
            listed = await call(b, "spec_list")
            assert listed.startswith(f"'{SUBJECT}' rev 2: agreed by all")
            assert "+POST /users takes" in await call(b, "spec_diff", subject=SUBJECT, a=1, b=2)
            exported = await call(b, "spec_export", out=str(tmp_path / "out"))
            assert "EXPORTED 'POST /users' rev 2" in exported
            assert read_export((tmp_path / "out" / "post-users.md").read_bytes())[1] == REV2
            bad = await b.call_tool("spec_agree", {"subject": "GET /nothing"})
            assert bad.is_error and "mqttalk: error: no spec subject 'GET /nothing'" in bad.content[0].text
            sent = await call(b, "send", text="all green", kind="status", state="green", spec=SUBJECT)
            assert "SENT kind=status" in sent
            wrong = await b.call_tool("send", {"text": "x", "kind": "note", "spec": SUBJECT})
            assert wrong.is_error and "spec applies to a status, not a note" in wrong.content[0].text
            with anyio.fail_after(15):
                while "green on POST /users rev 2" not in (seen := await call(a, "status")):
                    await anyio.sleep(0.3)
            assert "tests" in seen

    anyio.run(scenario)
    assert spec_list(impl)[SUBJECT]["state"] == "agreed"


def test_stop_hook_waits_for_the_answer_to_a_proposal(pair_of: tuple[Session, Session]) -> None:
    """An agent that proposed a revision and stops is kept waiting (Claude Code's Stop hook) until the
    other side agrees or counter-proposes, and continues with that answer."""
    import subprocess
    import time

    from conftest import MQTTALK

    impl, tests = pair_of
    impl.ok("spec", "propose", SUBJECT, REV1)
    proc = subprocess.Popen(
        [MQTTALK, "hook", "claude", "--event", "Stop", "--wait", "40"],
        cwd=impl.cwd,
        env=impl.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    payload = {"session_id": "4f1c2a", "cwd": str(impl.cwd), "hook_event_name": "Stop", "stop_hook_active": False}
    time.sleep(2.0)
    assert proc.poll() is None  # it waits: nobody answered the proposal yet
    tests.ok("spec", "agree", SUBJECT)
    out, err = proc.communicate(json.dumps(payload), timeout=60)
    assert proc.returncode == 0, err
    decision = json.loads(out)
    assert decision["decision"] == "block"
    assert f"kind=spec subject='{SUBJECT}' rev=1 state=agreed" in decision["reason"]


def test_any_mix_of_spec_messages_folds_without_raising() -> None:
    """Whatever spec messages arrive, in any order (answers before proposals, digests of other texts,
    agreements to revisions never seen, old `send --kind spec` ones), the fold and every command's check
    give a state or a one-line UsageError, never another exception."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from mqttalk._errors import UsageError
    from mqttalk._spec import digest, fold, plan_agree, plan_propose, plan_reject, plan_withdraw, status_spec
    from mqttalk._wire import new_envelope

    texts = ["a", "b", "a "]
    message = st.fixed_dictionaries(
        {
            "sender": st.sampled_from(["impl", "tests", "review"]),
            "subject": st.sampled_from(["S", "T"]),
            "rev": st.integers(1, 3),
            "action": st.sampled_from([None, "propose", "agree", "reject", "withdraw"]),
            "state": st.sampled_from(["proposed", "agreed", "rejected"]),
            "text": st.sampled_from(texts),
            "digest": st.sampled_from([None, *[digest(t) for t in texts], "0" * 64]),
            "needs": st.sampled_from([None, [], ["tests"], ["impl", "review"]]),
        }
    )

    @settings(max_examples=300, deadline=None)
    @given(st.lists(message, max_size=12), st.randoms())
    def check(items: list[dict[str, object]], rnd: object) -> None:
        envs = []
        for item in items:
            data = {k: item[k] for k in ("subject", "rev", "state", "action", "digest", "needs")}
            envs.append(new_envelope(str(item["sender"]), "spec", str(item["text"]), data=data))
        rnd.shuffle(envs)  # type: ignore[attr-defined]
        contract = fold(envs)
        for subj in contract.subjects.values():
            assert subj.state in ("proposed", "waiting", "agreed", "rejected", "conflict", "withdrawn")
            if subj.in_force is not None:
                assert subj.in_force.agreed
        for act in (
            lambda: plan_agree(contract, "S", "tests"),
            lambda: plan_agree(contract, "S", "tests", 2),
            lambda: plan_reject(contract, "T", "impl", "why"),
            lambda: plan_withdraw(contract, "S", "impl"),
            lambda: plan_propose(contract, "S", "a", "impl", ["tests"]),
            lambda: status_spec(contract, None, None),
            lambda: status_spec(contract, "T", None),
        ):
            try:
                act()
            except UsageError as exc:
                assert "\n" not in exc.line()

    check()


# -- what an attacker inside the channel tried (a member forging, backdating, flooding) ----------------


def spec_env(sender: str, body: str, ts: object = None, re: str | None = None, **data: object) -> object:
    """A spec message as any peer could write it (no check of ours in the way)."""
    import uuid

    from mqttalk._wire import Envelope

    stamp = ts if ts is not None else now()
    item = {"id": str(uuid.uuid4()), "ts": stamp.isoformat(), "from": sender, "kind": "spec", "body": body}  # type: ignore[attr-defined]
    return Envelope.model_validate({**item, "data": data, "re": re})


def publish_state(url: str, owner: str, items: list[object], sender: str | None = None) -> None:
    """Retain a sealed contract state at spec/OWNER holding ``items`` (as a member with the key can)."""
    topics = channel_topics(url)
    where = JoinURL.parse(url)
    specs = [e.model_dump(mode="json", by_alias=True, exclude_none=True) for e in items]  # type: ignore[attr-defined]
    payload = json.dumps({"v": 2, "from": sender or owner, "ts": now().isoformat(), "specs": specs}).encode()
    topic = topics.spec(owner)  # type: ignore[attr-defined]
    sealed = topics.seal.seal(topic, payload) if topics.seal else payload  # type: ignore[attr-defined]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.connect(where.broker.host, where.broker.port)
    client.loop_start()
    try:
        client.publish(topic, sealed, qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_members_retained_state_speaks_only_for_that_member(tmp_path: Path, broker_url: str) -> None:
    """A member's retained state at spec/OWNER that carries messages "from" other members (and from the
    reader itself), or stamped in year 1: none of it is believed or kept, by a late joiner nor by the
    peer it claims to speak for; what was stored before under no owner does not count either."""
    import sqlite3
    from datetime import datetime, timedelta, timezone

    from mqttalk._spec import digest

    impl, tests, late = (Session(n, tmp_path) for n in ("impl", "tests", "late"))
    url = paired(impl, tests, broker_url)
    impl.ok("spec", "propose", SUBJECT, REV1)
    join(late, url)
    evil = "POST /users deletes every user"
    forged = [
        spec_env("impl", evil, subject=SUBJECT, rev=2, action="propose", state="proposed", digest=digest(evil)),
        spec_env("late", "ok", subject=SUBJECT, rev=1, action="agree", state="agreed", digest=digest(REV1)),
        spec_env("impl", "x", subject="PAY", rev=1, action="propose", state="proposed", digest=digest("x")),
    ]
    ancient = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))
    old = spec_env("tests", "old", ancient, subject="OLD", rev=1, action="propose", state="proposed")
    publish_state(url, "tests", [*forged, old])  # tests' state, speaking for impl and late
    publish_state(url, "impl", [forged[2]])  # impl's own topic, as impl never wrote it
    got = spec_list(impl)
    assert set(got) == {SUBJECT} and got[SUBJECT]["rev"] == 1 and got[SUBJECT]["state"] == "proposed", got
    publish_state(url, "late", [forged[1]])  # the reader's own topic, as it never wrote it
    res = late.ok("spec", "list", "--json")
    got = {str(o["subject"]): o for o in lines_json(res) if o["event"] == "spec"}
    # (PAY: impl's topic says impl proposed it; a member can write any member's topic, as any message)
    assert set(got) == {SUBJECT, "PAY"} and got[SUBJECT]["rev"] == 1 and got[SUBJECT]["proposer"] == "impl"
    assert got[SUBJECT]["state"] == "proposed" and "Traceback" not in res.err, got  # (late's "agreement": forged)
    assert "agreed by some (late), waiting for tests" in late.ok("spec", "agree", SUBJECT).out
    assert "agreed by all (impl and late and tests)" in tests.ok("spec", "agree", SUBJECT).out
    # Rows of an older version's store (which never said whose state held them) do not count either.
    db = sqlite3.connect(late.state_dir / "store.sqlite3")
    channel = db.execute("SELECT channel FROM relayed_from LIMIT 1").fetchone()[0]
    db.execute("INSERT INTO relayed (channel, id, raw) VALUES (?, ?, ?)", (channel, forged[0].id, forged[0].encode()))  # type: ignore[attr-defined]
    db.execute(
        "INSERT INTO relayed_from (channel, id, source, sender, raw) VALUES (?, ?, 'tests', 'impl', ?)",
        (channel, forged[2].id, forged[2].encode()),  # type: ignore[attr-defined]
    )
    db.commit()
    db.close()
    got = spec_list(late)
    assert got[SUBJECT]["rev"] == 1 and got[SUBJECT]["state"] == "agreed" and evil not in json.dumps(got)


def test_a_proposers_own_agreement_never_counts(pair_of: tuple[Session, Session]) -> None:
    impl, tests = pair_of
    assert "--to names only you (impl)" in one_error_line(impl.run("spec", "propose", SUBJECT, REV1, "--to", "impl"))
    impl.ok("spec", "propose", SUBJECT, REV1, "--to", "tests")
    impl.ok("send", "--kind", "spec", "--subject", SUBJECT, "--state", "agreed", "--rev", "1", "ok")
    got = spec_list(tests)[SUBJECT]
    assert got["state"] == "proposed" and got["waiting_for"] == ["tests"] and got["in_force"] is None
    assert "agreed by all (impl and tests)" in tests.ok("spec", "agree", SUBJECT).out


def test_a_proposers_own_agreement_never_counts_in_the_fold() -> None:
    from mqttalk._spec import digest, fold

    for needs in ([], ["impl"], None):
        proposal = spec_env("impl", "A", subject="S", rev=1, action="propose", state="proposed", digest=digest("A"))
        if needs is not None:
            proposal.data["needs"] = needs  # type: ignore[attr-defined]
        mine = spec_env("impl", "ok", subject="S", rev=1, action="agree", state="agreed", digest=digest("A"))
        old = spec_env("impl", "ok", subject="S", rev=1, state="agreed", re=proposal.id)  # type: ignore[attr-defined]
        same = spec_env("tests", "A", subject="S", rev=1, action="propose", state="proposed", digest=digest("A"))
        theirs = spec_env("tests", "ok", subject="S", rev=1, action="agree", state="agreed", digest=digest("A"))
        subj = fold([proposal, mine, old, same, theirs]).subjects["S"]  # type: ignore[list-item]
        assert subj.state == "proposed" and subj.in_force is None, needs  # (tests proposed it too: no other)
        subj = fold([proposal, mine, old]).subjects["S"]  # type: ignore[list-item]
        assert subj.state == "proposed" and not subj.latest.agreed, needs
        review = spec_env("review", "ok", subject="S", rev=1, action="agree", state="agreed", digest=digest("A"))
        assert fold([proposal, review]).subjects["S"].in_force is not None  # type: ignore[list-item]


def test_an_agreed_revision_is_never_undone(pair_of: tuple[Session, Session]) -> None:
    """Another text at an agreed revision number (an old-style `send --kind spec`, a backdated one, a
    proposal past a gap) is stale or ignored, never a conflict; `send --kind spec` counts on from the
    latest revision; a text the retained copy could not carry is refused."""
    impl, tests = pair_of
    impl.ok("spec", "propose", SUBJECT, REV1)
    tests.ok("spec", "agree", SUBJECT)
    tests.ok("send", "--kind", "spec", "--subject", SUBJECT, "--rev", "1", "POST /users returns 200, always")
    tests.ok("send", "--kind", "spec", "--subject", SUBJECT, "--rev", "1000000", "jam")
    got = spec_list(impl)[SUBJECT]
    assert got["state"] == "agreed" and got["rev"] == 1 and got["in_force"] == 1
    sent = tests.ok("send", "--kind", "spec", "--subject", SUBJECT, "--json", REV2)
    sid = json.loads(sent.out)["id"]
    log = [json.loads(line) for line in tests.ok("log", "--kind", "spec", "--json").lines]
    assert next(m for m in log if m["id"] == sid)["data"]["rev"] == 2  # (not rev 1: the next one)
    assert "rev 3" in impl.ok("spec", "propose", SUBJECT, REV3).out
    big = "x" * (130 * 1024)
    line = one_error_line(impl.run("spec", "propose", "GET /big", "-", input=big))
    assert "spec text of 133,120 bytes is too large" in line and "retained contract copy" in line


def test_agreed_revisions_stay_agreed_and_retained_in_the_fold() -> None:
    from datetime import timedelta

    from mqttalk._spec import digest, fold, plan_propose, retained
    from mqttalk._wire import decode_contract, encode_contract

    t = now()
    p1 = spec_env("impl", "A", t, subject="S", rev=1, action="propose", digest=digest("A"), needs=["tests"])
    ok = spec_env("tests", "ok", t + timedelta(seconds=1), subject="S", rev=1, action="agree", digest=digest("A"))
    backdated = spec_env(
        "mallory", "B", t - timedelta(days=1), subject="S", rev=1, action="propose", digest=digest("B")
    )
    later = spec_env("mallory", "C", t + timedelta(seconds=5), subject="S", rev=1, state="proposed")
    jam = spec_env("mallory", "J", t, subject="S", rev=1_000_000, action="propose", digest=digest("J"))
    subj = fold([p1, ok, backdated, later, jam]).subjects["S"]  # type: ignore[list-item]
    assert subj.state == "agreed" and subj.latest_rev == 1 and subj.in_force is not None
    assert subj.in_force.text == "A"
    assert plan_propose(fold([p1, ok, jam]), "S", "D", "impl", ["tests"])["rev"] == 2  # type: ignore[list-item]
    # Two texts of one revision, neither agreed: still a conflict (settled by the next proposal).
    assert fold([p1, backdated]).subjects["S"].state == "conflict"  # type: ignore[list-item]
    # A big agreed revision is never dropped from the retained copy for newer, smaller messages.
    big = "y" * (100 * 1024)
    bp = spec_env("impl", big, t, subject="BIG", rev=1, action="propose", digest=digest(big))
    bok = spec_env("tests", "ok", t, subject="BIG", rev=1, action="agree", digest=digest(big))
    chatter = [
        spec_env("impl", "n" * 200, t + timedelta(seconds=i), subject=f"N{i}", rev=1, action="propose")
        for i in range(1, 200)
    ]
    envs = [bp, bok, *chatter]
    mine, first = retained(envs, "impl")  # type: ignore[arg-type]
    got = decode_contract(encode_contract("impl", mine, first=first), at=now())
    assert got is not None and bp.id in {e.id for e in got[1]}  # type: ignore[attr-defined]


def test_a_withdrawal_counts_only_from_the_latest_proposer_at_the_latest_revision() -> None:
    from datetime import timedelta

    from mqttalk._spec import digest, fold, plan_propose

    t = now()
    p1 = spec_env("impl", "A", t, subject="S", rev=1, action="propose", digest=digest("A"), needs=["tests"])
    ok = spec_env("tests", "ok", t + timedelta(seconds=1), subject="S", rev=1, action="agree", digest=digest("A"))
    far = spec_env(
        "mallory", "x", t + timedelta(seconds=2), subject="S", rev=1_000_000, action="withdraw", state="rejected"
    )
    other = spec_env("tests", "x", t + timedelta(seconds=2), subject="S", rev=1, action="withdraw", state="rejected")
    ahead = spec_env("impl", "x", t + timedelta(seconds=2), subject="S", rev=2, action="withdraw", state="rejected")
    subj = fold([p1, ok, far, other, ahead]).subjects["S"]  # type: ignore[list-item]
    assert subj.state == "agreed" and subj.withdrawn is None
    assert plan_propose(fold([p1, ok, far]), "S", "B", "impl", ["tests"])["rev"] == 2  # type: ignore[list-item]
    mine = spec_env("impl", "x", t + timedelta(seconds=3), subject="S", rev=1, action="withdraw", state="rejected")
    assert fold([p1, ok, mine]).subjects["S"].state == "withdrawn"  # type: ignore[list-item]


def test_export_never_writes_through_a_link_and_names_never_collide(
    pair_of: tuple[Session, Session], tmp_path: Path
) -> None:
    from datetime import timedelta

    from mqttalk._spec import digest, export_files, fold

    impl, tests = pair_of
    impl.ok("spec", "propose", SUBJECT, REV1)
    tests.ok("spec", "agree", SUBJECT)
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "post-users.md").symlink_to(victim)
    line = one_error_line(tests.run("spec", "export", "--out", str(out)))
    assert "post-users.md is a symbolic link: not written" in line
    assert victim.read_text() == "precious" and (out / "post-users.md").is_symlink()
    (out / "post-users.md").unlink()
    tests.ok("spec", "export", "--out", str(out))
    assert read_export((out / "post-users.md").read_bytes())[1] == REV1
    assert sorted(p.name for p in out.iterdir()) == ["post-users.md"]  # (no temporary file left)
    # Subjects whose names (or a name and another's suffix) collide, case-insensitively: all distinct.
    t = now()
    envs = []
    for i, name in enumerate(["a", "a-" + digest("A")[:8], "A", "a-" + digest("A")[:8].upper()]):
        text = f"text {i}"
        envs.append(
            spec_env("impl", text, t + timedelta(seconds=i), subject=name, rev=1, action="propose", digest=digest(text))
        )
        envs.append(
            spec_env("tests", "ok", t + timedelta(seconds=i), subject=name, rev=1, action="agree", digest=digest(text))
        )
    names = [name.lower() for name, _, _ in export_files(fold(envs))]  # type: ignore[arg-type]
    assert len(names) == 4 and len(set(names)) == 4


def test_extreme_relayed_timestamps_are_dropped_and_never_crash() -> None:
    from datetime import datetime, timedelta, timezone

    from mqttalk._spec import Revision, Subject, digest, export_text, fold
    from mqttalk._wire import ContractState, decode_contract

    ancient = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))
    before = datetime(2019, 12, 31, tzinfo=UTC)
    items = [
        spec_env("impl", "t", ts, subject="Y", rev=1, action="propose", digest=digest("t")) for ts in (ancient, before)
    ]
    state = ContractState(
        sender="impl",
        ts=now(),
        specs=[e.model_dump(mode="json", by_alias=True, exclude_none=True) for e in items],  # type: ignore[attr-defined]
    )
    got = decode_contract(state.encode(), at=now())
    assert got is not None and got[1] == []
    assert fold(items).subjects == {}  # type: ignore[arg-type]
    rev = Revision(1, "x", "impl", ancient, "t", digest("t"), None, agreed={"tests": ancient})
    header, text = read_export(export_text(Subject("Y", {1: [rev]}), rev))
    assert text == "t" and header["agreed at"].startswith("0001-01-01")


def test_diff_and_fold_stay_fast_on_crafted_input(pair_of: tuple[Session, Session]) -> None:
    import time

    from mqttalk._spec import digest, fold

    impl, tests = pair_of
    one, two = "".join(f"{i}\n" for i in range(30_000)), "".join(f"{i * 7}\n" for i in range(30_000))
    impl.ok("send", "--kind", "spec", "--subject", SUBJECT, "-", input=one)
    impl.ok("send", "--kind", "spec", "--subject", SUBJECT, "-", input=two)
    start = time.monotonic()
    res = tests.ok("spec", "diff", SUBJECT, "1", "2")
    assert time.monotonic() - start < 20  # (unbounded, difflib takes many minutes on these)
    assert "are too large to diff here" in res.err and f"rev 1: {len(one):,} bytes, 30,001 lines" in res.err
    assert not res.out.strip()
    # 5,000 proposals of different texts at one revision and 5,000 agreements fold in well under a second.
    t = now()
    envs = [
        spec_env("mallory", f"t{i}", t, subject="Q", rev=1, action="propose", digest=digest(f"t{i}"))
        for i in range(5000)
    ]
    envs += [
        spec_env("tests", "ok", t, subject="Q", rev=1, action="agree", digest=digest(f"t{i}")) for i in range(5000)
    ]
    start = time.process_time()
    subj = fold(envs).subjects["Q"]  # type: ignore[arg-type]
    assert time.process_time() - start < 1.0
    assert len(subj.revisions[1]) == 1  # (the first agreed one stands; the other texts are stale)


def test_status_on_a_rejected_revision_warns_and_a_control_character_subject_is_usable(
    pair_of: tuple[Session, Session],
) -> None:
    from mqttalk._spec import digest, escaped, fold, plan_agree

    impl, tests = pair_of
    impl.ok("spec", "propose", SUBJECT, REV1)
    tests.ok("spec", "reject", SUBJECT, "no 409")
    res = tests.ok("send", "--kind", "status", "--state", "green", "--spec", SUBJECT, "--rev", "1", "green")
    assert "warning: rev 1 was rejected (by tests), it is not an agreed revision" in res.err
    # A peer's subject with control characters: listed escaped, and named that way by show and agree.
    name = "evil\x1b[31mRED\nline2"
    envs = [spec_env("impl", "t", subject=name, rev=1, action="propose", digest=digest("t"))]
    contract = fold(envs)  # type: ignore[arg-type]
    assert contract.subject(escaped(name)).name == name
    data, _ = plan_agree(contract, escaped(name), "tests")
    assert data["subject"] == name  # (the agreement names the subject as its proposer wrote it)


def test_a_subject_that_differs_only_by_case_spaces_or_a_plural_is_refused_as_a_typo(
    pair_of: tuple[Session, Session],
) -> None:
    impl, _ = pair_of
    impl.ok("spec", "propose", SUBJECT, REV1)
    for typo in ("POST /users ", "POST /user", "post  /users"):
        line = one_error_line(impl.run("spec", "propose", typo, "something else"))
        assert "would be a new subject, but 'POST /users' exists" in line, line
    assert "PROPOSED 'GET /users' rev 1" in impl.ok("spec", "propose", "GET /users", "a list").out  # another one
