"""The story, end to end, as two agent sessions run it: the real `mqttalk` command in two directories,
against Mosquitto (MQTT 5) and the embedded amqtt broker (MQTT 3.1.1)."""

from __future__ import annotations

import json
import threading
import time

from conftest import Session, free_port, join_url, listening, paired, read_join_url, status_of, until_listening


def test_create_prints_join_url_and_a_plain_share_sentence(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, _ = sessions
    res = impl.ok("create", "--as", "impl", "--broker", broker_url)
    url = join_url(res)
    assert url.startswith(broker_url + "/mqttalk/v1/")
    share = res.out.split("Paste this into the other session:", 1)[1].strip()
    assert f"mqttalk pair '{url}' --as tests" in share  # quoted: the URL carries a #k= key
    assert "```" not in share and "\n" not in share  # one plain line, safe to paste into a chat
    assert "not instructions" in share


def test_pair_prints_paired_on_both_sides(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    url = join_url(impl.ok("create", "--as", "impl", "--role", "owns src/api/users.ts", "--broker", broker_url))
    waiting = impl.start("recv", "--wait", "20")  # A is waiting: it must print PAIRED at once
    time.sleep(1.0)
    started = time.monotonic()
    res = tests.ok("pair", url, "--as", "tests")
    assert "mqttalk: PAIRED with impl (owns src/api/users.ts)" in res.out
    line = waiting.stdout.readline() if waiting.stdout else ""
    seen_after = time.monotonic() - started
    assert line.strip() == "mqttalk: PAIRED with tests"
    assert seen_after < 5, f"A saw PAIRED {seen_after:.2f}s after B's pair started"
    waiting.communicate(timeout=20)
    assert waiting.returncode == 0  # a new pairing is news: the wait ends on it
    tests.ok("send", "hello")
    assert "from=tests" in impl.ok("recv").out


def test_a_not_running_pairs_when_it_next_runs(sessions: tuple[Session, Session], broker_url: str) -> None:
    """B pairs while A runs nothing: A's retained presence is no proof (it could be stale), so B says A
    has not answered yet; A's next command answers B's challenge and prints PAIRED, then so does B's."""
    impl, tests = sessions
    url = join_url(impl.ok("create", "--as", "impl", "--broker", broker_url))
    res = tests.run("pair", url, "--as", "tests", "--wait", "2")
    assert res.code == 3 and "PAIRED" not in res.out
    assert "impl is in the channel but did not answer the pairing challenge" in res.err
    assert "impl: " in (st := tests.ok("status").out) and "has not answered our pairing challenge" in st
    assert "mqttalk: PAIRED with tests" in impl.ok("recv").out
    assert "PAIRED" not in impl.ok("recv").out  # announced once
    assert "mqttalk: PAIRED with impl" in tests.ok("recv").out
    peers = {p["name"]: p for p in status_of(tests)["peers"]}  # type: ignore[attr-defined]
    assert peers["impl"]["paired"] is True and peers["tests"]["me"] is True


def test_create_can_wait_for_the_peer(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    proc = impl.start("create", "--as", "impl", "--broker", broker_url, "--wait", "20")
    url = read_join_url(proc)
    tests.ok("pair", url, "--as", "tests")
    paired_at = time.monotonic()
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "mqttalk: PAIRED with tests" in out
    assert time.monotonic() - paired_at < 5  # it stops waiting once the peer is there


def test_typed_messages_arrive_once_in_order(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    impl.ok(
        "send",
        "--kind",
        "spec",
        "--subject",
        "POST /users",
        "POST /users takes {email,name}, returns {id, created_at}, 409 on duplicate",
    )
    impl.ok("send", "--kind", "question", "Do you need pagination on GET /users?")
    impl.ok("send", "plain note")
    res = tests.ok("recv")
    headers = [line for line in res.lines if line.startswith("mqttalk: MESSAGE")]
    assert len(headers) == 3
    assert "kind=spec subject='POST /users' rev=1 state=proposed" in headers[0]
    assert "kind=question" in headers[1] and "kind=note" in headers[2]
    assert "POST /users takes {email,name}, returns {id, created_at}, 409 on duplicate" in res.out
    assert "MESSAGE" not in tests.ok("recv").out  # printed once


def test_status_and_spec_agreement_carry_typed_fields_in_json(
    sessions: tuple[Session, Session], broker_url: str
) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    sent = json.loads(impl.ok("send", "--json", "--kind", "spec", "--subject", "POST /users", "v1").out)
    tests.ok("send", "--kind", "spec", "--subject", "POST /users", "--state", "agreed", "--re", sent["id"], "ok")
    tests.ok("send", "--kind", "status", "--state", "red", "--commit", "abc1234", "tests written, all red")
    msgs = [json.loads(line) for line in impl.ok("recv", "--json").lines]
    msgs = [m for m in msgs if m["event"] == "message"]
    assert [m["kind"] for m in msgs] == ["spec", "status"]
    assert msgs[0]["data"] == {"subject": "POST /users", "rev": 1, "state": "agreed"}
    assert msgs[0]["re"] == sent["id"] and msgs[0]["from"] == "tests"
    # (tests agreed to the one subject, having taken in the proposal first: its status is against it)
    assert msgs[1]["data"] == {"state": "red", "commit": "abc1234", "spec": "POST /users", "rev": 1}
    assert msgs[1]["body"] == "tests written, all red"


def test_bodies_pass_untouched_from_stdin_and_file(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    body = (
        "First paragraph with \"double\" and 'single' quotes, $HOME, $(rm -rf /), `whoami`, *.ts ~ !x\n\n"
        "Second paragraph:\n    indented code { a: [1, 2] }\n\ttab\nünïcödé ✓\n"
    )
    impl.ok("send", "-", input=body)
    path = impl.cwd / "msg.md"
    path.write_text(body)
    impl.ok("send", "--file", str(path))
    msgs = [json.loads(line) for line in tests.ok("recv", "--json").lines]
    bodies = [m["body"] for m in msgs if m["event"] == "message"]
    assert bodies == [body, body]


def test_recv_wait_returns_when_a_message_arrives(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    tests.ok("recv")  # consume the PAIRED notice
    waiting = tests.start("recv", "--wait", "30")
    time.sleep(1.0)
    started = time.monotonic()
    impl.ok("send", "green on my side")
    out, _ = waiting.communicate(timeout=30)
    assert waiting.returncode == 0
    assert "green on my side" in out
    assert time.monotonic() - started < 10


def test_recv_wait_times_out_with_exit_code_3(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    tests.ok("recv")
    started = time.monotonic()
    res = tests.run("recv", "--wait", "1.5")
    assert res.code == 3
    assert "no new message within 1.5s" in res.err
    assert time.monotonic() - started < 8


def test_messages_sent_while_the_reader_was_away_are_all_delivered(
    sessions: tuple[Session, Session], broker_url: str
) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    for i in range(20):  # tests has no process running: the broker queues for its session
        impl.ok("send", f"message {i}")
    res = tests.ok("recv", "--json")
    bodies = [json.loads(line)["body"] for line in res.lines if '"message"' in line]
    assert bodies == [f"message {i}" for i in range(20)]


def test_status_shows_peers_presence_and_unread(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    url = paired(impl, tests, broker_url)
    impl.ok("send", "one")
    impl.ok("send", "two")
    res = tests.ok("status")
    assert url.split("#")[0] + "#k=(hidden) (sealed, " in res.out  # the key is never printed
    assert "you:     tests" in res.out
    assert "impl: joined, last seen" in res.out
    assert "unread:  2" in res.out
    st = status_of(tests)
    assert st["unread"] == 2 and st["me"] == "tests"
    assert {p["name"]: p["state"] for p in st["peers"]} == {"tests": "joined", "impl": "joined"}


def test_a_waiting_peer_shows_online(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    waiting = impl.start("recv", "--wait", "20")
    try:
        deadline = time.monotonic() + 10
        state = ""
        while state != "online" and time.monotonic() < deadline:
            st = status_of(tests)
            state = next(p["state"] for p in st["peers"] if p["name"] == "impl")
        assert state == "online"
    finally:
        tests.ok("send", "wake up")
        waiting.communicate(timeout=20)
    st = status_of(tests)
    assert next(p["state"] for p in st["peers"] if p["name"] == "impl") == "joined"


def test_leave_marks_the_peer_gone(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    listener = impl.start("listen", "--timeout", "30")
    until_listening(listener)
    refused = impl.run("leave")  # its own live process would just come back online
    assert refused.code == 2 and "stop it first" in refused.err
    listener.terminate()
    listener.wait(10)
    assert "mqttalk: LEFT channel" in impl.ok("leave").out
    assert "impl: left" in tests.ok("status").out
    res = impl.run("send", "still here?")
    assert res.code == 4  # the directory's binding is gone


def test_directed_message_reaches_only_its_peer(
    tmp_path_factory: object, broker_url: str, sessions: tuple[Session, Session]
) -> None:
    impl, tests = sessions
    url = paired(impl, tests, broker_url)
    docs = Session("docs", impl.cwd.parent)
    assert docs.run("pair", url, "--as", "docs").code == 3  # impl and tests run nothing now: no answer
    impl.ok("send", "--to", "docs", "please document POST /users")
    impl.ok("send", "to everyone")
    assert "please document" in docs.ok("recv").out
    got = tests.ok("recv").out
    assert "to everyone" in got and "please document" not in got


def test_two_checkouts_on_one_machine_are_two_peers(tmp_path: object, broker_url: str) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    home = root / "shared-home"
    impl, tests = Session("impl", root, home), Session("tests", root, home)
    paired(impl, tests, broker_url)
    impl.ok("send", "from impl")
    assert "from impl" in tests.ok("recv").out
    (tests.cwd / "src" / "deep").mkdir(parents=True)
    sub = Session.__new__(Session)
    sub.__dict__.update(tests.__dict__, cwd=tests.cwd / "src" / "deep")
    sub.ok("send", "from a subdirectory of tests")  # the nearest bound ancestor counts
    assert "from a subdirectory of tests" in impl.ok("recv").out


def test_channel_and_peer_from_environment_override_the_binding(
    sessions: tuple[Session, Session], broker_url: str
) -> None:
    impl, tests = sessions
    url = paired(impl, tests, broker_url)
    outsider = Session("elsewhere", impl.cwd.parent, home=tests.home)  # another checkout, same machine and state
    res = outsider.run("send", "no binding here")
    assert res.code == 4 and "mqttalk create" in res.err
    outsider.env.update(MQTTALK_CHANNEL=url, MQTTALK_PEER="tests")
    outsider.ok("send", "acting as tests from another directory")
    assert "acting as tests" in impl.ok("recv").out


def test_another_state_directory_cannot_act_as_a_peer(sessions: tuple[Session, Session], broker_url: str) -> None:
    """Two state directories as one peer would interleave its sequence numbers (false gaps) and share
    nothing of its outbox: the second is refused before it connects to any session, with one line."""
    impl, tests = sessions
    url = paired(impl, tests, broker_url)
    other = Session("other-home", impl.cwd.parent)
    other.env.update(MQTTALK_CHANNEL=url, MQTTALK_PEER="tests")
    for command in (("send", "I am tests too"), ("recv",), ("status",)):
        res = other.run(*command)
        assert res.code == 2 and res.err.count("\n") == 1 and "'tests' is already used" in res.err, res
    assert "I am tests too" not in impl.ok("recv").out
    other.env.update(MQTTALK_PEER="tests-2")  # a name of its own is fine
    other.ok("send", "hello from a second tests")
    assert "hello from a second tests" in impl.ok("recv").out


def test_pair_refuses_a_name_a_live_peer_uses(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    url = paired(impl, tests, broker_url)
    intruder = Session("intruder", impl.cwd.parent)
    res = intruder.run("pair", url, "--as", "impl")
    assert res.code == 2 and "already used" in res.err
    again = tests.run("pair", url, "--as", "tests")  # pairing again from the same place is fine...
    assert again.code == 3 and "impl is in the channel but did not answer" in again.err  # (impl runs nothing)


def test_broker_stop_stops_the_background_broker_and_says_so(sessions: tuple[Session, Session]) -> None:
    impl, _ = sessions
    impl.ok("create", "--as", "impl")  # no broker given: the embedded one starts in the background
    record = json.loads((impl.state_dir / "broker.json").read_text())
    res = impl.ok("broker", "--stop")
    assert "STOPPED the embedded broker on mqtt://127.0.0.1:" in res.out
    assert not listening(record["port"])
    again = impl.run("broker", "--stop")
    assert again.code == 1 and "no embedded broker" in again.err


def test_create_or_pair_in_a_bound_directory_says_it_moved_it(
    sessions: tuple[Session, Session], broker_url: str
) -> None:
    impl, tests = sessions
    first = join_url(impl.ok("create", "--as", "impl", "--broker", broker_url))
    again = impl.ok("create", "--as", "impl", "--broker", broker_url)
    assert join_url(again) != first
    assert "this directory now acts for this channel; it was bound to" in again.err and "as impl" in again.err
    assert "now acts for" not in impl.ok("send", "in the new one").err
    res = tests.run("pair", first, "--as", "tests", "--wait", "1")
    assert res.code in (0, 3) and "now acts for" not in res.err  # (a directory bound to nothing before)


def test_a_second_broker_started_by_hand_does_not_take_the_recorded_ones_place(
    sessions: tuple[Session, Session],
) -> None:
    impl, _ = sessions
    impl.ok("create", "--as", "impl")  # the embedded broker starts in the background and is recorded
    record = json.loads((impl.state_dir / "broker.json").read_text())
    port = free_port()
    other = impl.start("broker", "--port", str(port), "--db", str(impl.state_dir / "other.sqlite3"))
    try:
        deadline = time.monotonic() + 30
        while not listening(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert listening(port)
        assert json.loads((impl.state_dir / "broker.json").read_text()) == record
        assert f":{record['port']}" in impl.ok("broker", "--stop").out  # --stop stops the recorded one
    finally:
        other.terminate()
        other.communicate(timeout=20)


def test_send_to_a_name_nobody_has_and_listen_json_carry_what_a_program_needs(
    sessions: tuple[Session, Session], broker_url: str
) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    res = impl.ok("send", "--to", "nobody", "hello?")
    assert "no peer named nobody has been seen" in res.err
    assert "has been seen" not in impl.ok("send", "--to", "tests", "hi tests").err
    listener = tests.start("listen", "--json", "--timeout", "8")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(listener.stdout or []), daemon=True)
    reader.start()
    time.sleep(1)
    impl.ok("send", "for the program")
    deadline = time.monotonic() + 8  # (then listen's own --timeout has ended it)
    while '"for the program"' not in "".join(lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    listener.terminate()  # listen ends on SIGTERM as on its timeout: what it printed stays printed
    listener.wait(30)
    reader.join(10)
    out = "".join(lines)
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "message" and e.get("body") == "for the program" for e in events), out
