"""Nothing lost: busy readers, killed processes, broker outages and restarts, overflowing queues,
and several processes of one peer at once. Real brokers of each test's own, restarted for real."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import (
    ConfiguredEmbedded,
    EmbeddedBroker,
    PrivateMosquitto,
    Session,
    channel_topics,
    paired,
    status_of,
    until_listening,
)
from paho.mqtt.enums import CallbackAPIVersion

from mqttalk import JoinURL


def received(session: Session) -> list[dict[str, Any]]:
    """Everything `mqttalk recv --json` prints as messages."""
    res = session.ok("recv", "--json")
    return [m for m in map(json.loads, res.lines) if m["event"] == "message"]


def send_many(session: Session, count: int, start: int = 0, pause_every: int = 0) -> None:
    """Send ``count`` notes through the library over one live connection (fast, pipelined)."""
    channel: Any = session.channel()
    with channel.live(online=False) as live:
        for i in range(start, start + count):
            live.send(f"message {i}", wait=False)
            if pause_every and i % pause_every == 0:
                live.drain()
                time.sleep(0.05)
        live.drain(timeout=30)
    assert not channel.store.pending(channel.url.channel, channel.me), "outbox not empty after drain"


@contextmanager
def sniffer(url: str) -> Iterator[list[bytes]]:
    """A raw MQTT client that records every payload published on the channel's msg topics
    (opened with the channel key: the test knows it)."""
    join = JoinURL.parse(url)
    topics: Any = channel_topics(url)
    seen: list[bytes] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_message = lambda _c, _u, m: seen.append(topics.seal.open(m.topic, m.payload))
    client.connect(join.broker.host, join.broker.port)
    client.subscribe(f"{topics.root}/msg/+", qos=1)
    client.loop_start()
    time.sleep(0.3)
    try:
        yield seen
    finally:
        time.sleep(0.5)
        client.disconnect()  # (first: it wakes the network loop, which loop_stop would wait up to 1 s for)
        client.loop_stop()


def test_500_messages_sent_while_the_reader_is_not_running_arrive_once_in_order(
    sessions: tuple[Session, Session], durable_broker: Any
) -> None:
    impl, tests = sessions
    paired(impl, tests, durable_broker.url)
    send_many(impl, 500)
    msgs = received(tests)
    assert [m["body"] for m in msgs] == [f"message {i}" for i in range(500)]
    assert [m["seq"] for m in msgs] == list(range(1, 501))
    assert received(tests) == []  # shown once


def test_reader_killed_mid_stream_gets_every_message_exactly_once(
    sessions: tuple[Session, Session], durable_broker: Any
) -> None:
    impl, tests = sessions
    paired(impl, tests, durable_broker.url)
    listener = tests.start("listen")
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(listener.stdout or []), daemon=True).start()
    sender = threading.Thread(target=send_many, args=(impl, 1000), kwargs={"pause_every": 50})
    sender.start()
    deadline = time.monotonic() + 60
    try:
        while sum("MESSAGE" in line for line in lines) < 150 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        listener.send_signal(signal.SIGKILL)  # mid-stream, no chance to clean up
        listener.wait()
    assert sum("MESSAGE" in line for line in lines) >= 150, "the listener never got going"
    sender.join(120)
    again = tests.start("listen", "--timeout", "60")
    threading.Thread(target=again.communicate, daemon=True).start()  # keep its output pipe drained
    deadline = time.monotonic() + 60
    while status_of(tests)["unread"] < 1000 and time.monotonic() < deadline:
        time.sleep(0.3)
    again.terminate()
    again.wait(10)
    msgs = received(tests)
    missing = sorted(set(range(1, 1001)) - {m["seq"] for m in msgs})
    assert not missing, f"{len(missing)} never arrived: seq {missing[:5]}...{missing[-5:]}"
    assert [m["seq"] for m in msgs] == list(range(1, 1001))
    assert len({m["id"] for m in msgs}) == 1000


def test_send_while_the_broker_is_down_is_queued_then_delivered_once(
    sessions: tuple[Session, Session], durable_broker: Any
) -> None:
    impl, tests = sessions
    paired(impl, tests, durable_broker.url)
    durable_broker.stop()
    res = impl.run("send", "sent while the broker was down")
    assert res.code == 6
    assert res.err.startswith("mqttalk: QUEUED: id=") and "goes out with the next mqttalk command" in res.err
    assert impl.run("status").code == 5  # status needs the broker, and says so
    durable_broker.start()
    impl.ok("send", "sent after it came back")  # flushes the queued one first
    msgs = received(tests)
    assert [m["body"] for m in msgs] == ["sent while the broker was down", "sent after it came back"]
    assert received(tests) == []


def test_broker_restart_between_send_and_receive_loses_nothing(
    sessions: tuple[Session, Session], durable_broker: Any
) -> None:
    impl, tests = sessions
    paired(impl, tests, durable_broker.url)
    for i in range(5):
        impl.ok("send", f"before restart {i}")
    durable_broker.stop()
    durable_broker.start()
    msgs = received(tests)
    assert [m["body"] for m in msgs] == [f"before restart {i}" for i in range(5)]
    st = status_of(tests)
    assert {p["name"] for p in st["peers"]} == {"impl", "tests"}  # retained presence survived too


def events_of(result: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.lines]


def test_an_overflowing_offline_queue_is_repaired_from_the_sender(
    sessions: tuple[Session, Session], tmp_path: Any
) -> None:
    """Mosquitto keeps 5 messages for an absent reader and drops the rest: the reader asks for what it
    misses, the sender's next commands send it again, and the reader ends with all 15, each once, and
    never a GAP line (the queue keeps dropping: it takes a few rounds)."""
    broker = PrivateMosquitto(tmp_path / "small-queue", max_queued_messages=5)
    broker.start()
    try:
        impl, tests = sessions
        paired(impl, tests, broker.url)
        send_many(impl, 15)  # tests is not running: Mosquitto keeps 5 and drops the rest
        bodies: list[str] = []
        deadline = time.monotonic() + 30  # impl answers a peer's request at most every REPAIR_EVERY (2 s):
        while time.monotonic() < deadline:  # rounds, not a count of commands (they may take 0.1 s each)
            events = events_of(tests.ok("recv", "--json"))
            assert not [e for e in events if e["event"] == "gap"], events
            bodies += [e["body"] for e in events if e["event"] == "message"]
            if len(bodies) >= 15:
                break
            impl.ok("recv")  # impl's next command answers the request
            time.sleep(0.3)
        assert sorted(bodies, key=lambda b: int(b.split()[1])) == [f"message {i}" for i in range(15)]
        assert len(bodies) == 15  # each once
        assert "GAP" not in tests.ok("recv").err + tests.ok("recv").out
    finally:
        broker.stop()


def _unread_count(session: Session) -> int:
    ch: Any = session.channel()
    return int(ch.store.unread_count(ch.url.channel, ch.me))


def _wait_for(session: Session, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _unread_count(session) < count:
        assert time.monotonic() < deadline, f"{session.name} has {_unread_count(session)} of {count}"
        time.sleep(0.2)


def _stop(proc: Any) -> str:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    return str(out) + str(err)


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_a_bounded_queue_that_overflowed_is_repaired_exactly_once(
    sessions: tuple[Session, Session], tmp_path: Any, kind: str
) -> None:
    """Each broker keeps 100 messages for an absent session; 500 are sent. The reader's next command
    takes the 100 and asks for the rest; it then listens, and the sender's next command sends the 400
    again: all 500 are shown, each once, and no GAP line ever."""
    broker: Any = (
        PrivateMosquitto(tmp_path / "q", max_queued_messages=100)
        if kind == "mosquitto"
        else ConfiguredEmbedded(tmp_path / "q", max_queued_messages=100)
    )
    broker.start()
    try:
        impl, tests = sessions
        paired(impl, tests, broker.url)
        tests.ok("recv")  # (takes what its queue already holds: impl's last presence, when create ended late)
        send_many(impl, 500)
        first = events_of(tests.ok("recv", "--json"))
        shown = [e["body"] for e in first if e["event"] == "message"]
        assert len(shown) == 100 and not [e for e in first if e["event"] == "gap"]
        listener = tests.start("listen", "--timeout", "120")
        before = until_listening(listener)
        for _ in range(8):  # impl's next commands answer the note; a 100-message queue may drop some
            impl.ok("recv")  # of the 400 sent again even to a reader online, who then asks again
            deadline = time.monotonic() + 8
            while _unread_count(tests) < 400 and time.monotonic() < deadline:
                time.sleep(0.2)
            if _unread_count(tests) >= 400:
                break
        _wait_for(tests, 400, timeout=5)
        lines = before + _stop(listener)
        rest = events_of(tests.ok("recv", "--json"))
        shown += [e["body"] for e in rest if e["event"] == "message"]
        assert sorted(shown, key=lambda b: int(b.split()[1])) == [f"message {i}" for i in range(500)]
        assert len(shown) == 500 and "GAP" not in lines and not [e for e in rest if e["event"] == "gap"]
    finally:
        broker.stop()


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_a_broker_restarted_without_persistence_mid_stream_loses_nothing(
    sessions: tuple[Session, Session], tmp_path: Any, kind: str
) -> None:
    """The reader listens while the sender streams 300 messages; the broker restarts, keeping nothing,
    in the middle. What it had acknowledged and not yet delivered is asked for and sent again: the
    reader ends with all 300, each once, no GAP."""
    broker: Any = (
        PrivateMosquitto(tmp_path / "v", persistence="false")
        if kind == "mosquitto"
        else EmbeddedBroker(tmp_path / "v", memory=True)
    )
    broker.start()
    try:
        impl, tests = sessions
        paired(impl, tests, broker.url)
        listener = tests.start("listen", "--timeout", "120")
        before = until_listening(listener)
        channel: Any = impl.channel()
        with channel.live(online=False, reconnect=True) as live:
            for i in range(300):
                live.send(f"message {i}", wait=False)
                if i == 150:
                    live.drain()
                    broker.stop()  # acknowledged ones still on their way to tests are lost with it
                    broker.start()
                if i % 20 == 0:
                    live.poll(0.05)
            deadline = time.monotonic() + 30
            while channel.store.pending(channel.url.channel, "impl") and time.monotonic() < deadline:
                live.poll(0.2)
        # impl's next command reads tests' note and sends again what tests misses. The listener writes
        # that note once it is back on the restarted broker: a command of impl's before then has nothing
        # to answer yet, so impl runs its next command again until everything is there.
        deadline = time.monotonic() + 90
        while _unread_count(tests) < 300 and time.monotonic() < deadline:
            impl.ok("recv")
            until = time.monotonic() + 5
            while _unread_count(tests) < 300 and time.monotonic() < until:
                time.sleep(0.2)
        _wait_for(tests, 300, timeout=1)
        lines = before + _stop(listener)
        got = [e["body"] for e in events_of(tests.ok("recv", "--json")) if e["event"] == "message"]
        assert sorted(got, key=lambda b: int(b.split()[1])) == [f"message {i}" for i in range(300)]
        assert len(got) == 300 and "GAP" not in lines
    finally:
        broker.stop()


def test_a_gap_the_sender_can_no_longer_fill_is_shown_and_says_so(
    sessions: tuple[Session, Session], tmp_path: Any
) -> None:
    """The sender's store was deleted: nobody has the lost messages, so the GAP line stays, once, and
    says why (the sender no longer has them), not that "the broker dropped them"."""
    broker = PrivateMosquitto(tmp_path / "small-queue", max_queued_messages=5)
    broker.start()
    try:
        impl, tests = sessions
        paired(impl, tests, broker.url)
        send_many(impl, 15)
        got = [e for e in events_of(tests.ok("recv", "--json")) if e["event"] == "message"]
        # The queue of 5 may hold impl's last presence too (create --wait announcing "joined" as it ends,
        # after tests' pair left): then 4 of the messages fit. Either way the rest is the gap.
        kept = len(got)
        assert kept in (4, 5) and [e["body"] for e in got] == [f"message {i}" for i in range(kept)]
        (impl.state_dir / "store.sqlite3").unlink()
        for extra in ("-wal", "-shm"):
            (impl.state_dir / f"store.sqlite3{extra}").unlink(missing_ok=True)
        impl.ok("recv")  # impl's next command finds it has none of them, and says so
        res = tests.ok("recv")
        gaps = [line for line in (res.out + res.err).splitlines() if "GAP" in line]
        assert len(gaps) == 1 and f"from=impl seq={kept + 1}-15" in gaps[0] and "no longer has" in gaps[0], res
        assert "dropped them" not in res.out + res.err
        again = tests.ok("recv")
        assert "GAP" not in again.out + again.err  # shown once
    finally:
        broker.stop()


def test_a_sender_that_never_answers_is_shown_as_a_gap_after_the_repair_timeout(
    sessions: tuple[Session, Session], tmp_path: Any
) -> None:
    broker = PrivateMosquitto(tmp_path / "small-queue", max_queued_messages=5)
    broker.start()
    try:
        impl, tests = sessions
        paired(impl, tests, broker.url)
        send_many(impl, 12)
        quick = {"MQTTALK_REPAIR_TIMEOUT": "1"}
        first = tests.ok("recv", "--json", env=quick)
        assert "GAP" not in first.out + first.err  # asked, not yet shown
        kept = len([e for e in events_of(first) if e["event"] == "message"])  # 5, or 4 beside a presence
        assert kept in (4, 5)
        time.sleep(1.5)  # impl runs nothing: no answer comes
        res = tests.ok("recv", env=quick)
        gaps = [line for line in (res.out + res.err).splitlines() if "GAP" in line]
        assert len(gaps) == 1 and f"seq={kept + 1}-12" in gaps[0] and "did not answer" in gaps[0], res
        late: list[str] = []
        # a late answer still fills it: the messages come after all (5 per round: the queue); impl answers
        # a peer's request at most every REPAIR_EVERY (2 s), so rounds until a deadline, not a count
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            impl.ok("recv")
            late += [e["body"] for e in events_of(tests.ok("recv", "--json", env=quick)) if e["event"] == "message"]
            if len(late) >= 12 - kept:
                break
            time.sleep(0.3)
        assert late == [f"message {i}" for i in range(kept, 12)]
    finally:
        broker.stop()


def test_two_processes_of_one_peer_at_once_neither_corrupt_nor_double_send(
    sessions: tuple[Session, Session], durable_broker: Any
) -> None:
    impl, tests = sessions
    url = paired(impl, tests, durable_broker.url)
    errors: list[str] = []

    def sender(tag: str, count: int) -> None:
        for i in range(count):
            res = impl.run("send", f"{tag} {i}")
            if res.code != 0:
                errors.append(res.err)

    with sniffer(url) as wire:
        workers = [threading.Thread(target=sender, args=(tag, 15)) for tag in ("a", "b")]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        # and again while a live process of the same peer holds its session and outbox
        listener = impl.start("listen", "--timeout", "60")
        until_listening(listener)
        workers = [threading.Thread(target=sender, args=(tag, 10)) for tag in ("c", "d")]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        listener.terminate()
        listener.wait(10)
    assert errors == []
    sent = [json.loads(p) for p in wire]
    assert len(sent) == 50, "each message published exactly once"
    assert sorted(m["seq"] for m in sent) == list(range(1, 51))
    msgs = received(tests)
    assert len(msgs) == 50 and len({m["id"] for m in msgs}) == 50
    for tag, count in (("a", 15), ("b", 15), ("c", 10), ("d", 10)):  # in order per sending process
        assert [m["body"] for m in msgs if m["body"].startswith(tag)] == [f"{tag} {i}" for i in range(count)]


def test_listen_prints_one_line_per_event(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    res = impl.ok("create", "--as", "impl", "--broker", broker_url)
    url = next(line.split(": ", 1)[1] for line in res.lines if line.startswith("join URL: "))
    listener = impl.start("listen", "--timeout", "30")
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(listener.stdout or []), daemon=True).start()
    time.sleep(1.0)
    tests.ok("pair", url, "--as", "tests")
    tests.ok("send", "--kind", "status", "--state", "red", "tests written, all red")
    tests.ok("leave")
    deadline = time.monotonic() + 20
    while not any("OFFLINE" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    listener.send_signal(signal.SIGINT)
    listener.wait(10)
    # (amqtt sometimes fires a cleanly disconnected client's will: an "OFFLINE tests (away)" may come
    # between them; the events that must be there come in this order)
    events = [line.strip() for line in lines if "(away)" not in line]
    assert events[0] == "mqttalk: PAIRED with tests"
    assert events[1].startswith("mqttalk: MESSAGE from=tests kind=status state=red id=")
    assert events[2] == "mqttalk: OFFLINE tests (left)"
    assert "tests written, all red" in impl.ok("recv").out  # the body is read with recv


def test_a_killed_listener_is_shown_away(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    listener = tests.start("listen")
    try:
        _wait_state(impl, "tests", "online")
    finally:
        listener.send_signal(signal.SIGKILL)
        listener.wait()
    _wait_state(impl, "tests", "away")  # its Last Will, or (amqtt) its heartbeat going stale


def test_a_stalled_listener_is_shown_away_once_its_heartbeat_is_stale(
    sessions: tuple[Session, Session], broker_url: str
) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    listener = tests.start("listen", env={"MQTTALK_HEARTBEAT": "0.5"})
    try:
        _wait_state(impl, "tests", "online")
        os.kill(listener.pid, signal.SIGSTOP)  # socket open, no will: only the heartbeat tells
        _wait_state(impl, "tests", "away", within=10)
    finally:
        os.kill(listener.pid, signal.SIGCONT)
        listener.terminate()
        listener.wait(10)


def test_listen_started_while_the_broker_is_down_waits_for_it(
    sessions: tuple[Session, Session], durable_broker: Any
) -> None:
    """`listen &` started before the broker is up (a machine booting, a broker restarting) waits for it, as
    it rides out a broker that goes away later: BROKER_DOWN, then BROKER_UP, then the messages."""
    impl, tests = sessions
    paired(impl, tests, durable_broker.url)
    durable_broker.stop()
    listener = tests.start("listen", "--timeout", "60")
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(listener.stdout or []), daemon=True).start()
    try:
        deadline = time.monotonic() + 10
        while not any("BROKER_DOWN" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.poll() is None, "listen gave up on a broker that was down when it started"
        durable_broker.start()
        until_listening(listener)
        impl.ok("send", "once the broker was up")
        deadline = time.monotonic() + 15
        while not any("MESSAGE" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        listener.terminate()
        listener.wait(10)
    words = [line.split()[1] for line in lines]
    assert words.index("BROKER_DOWN") < words.index("BROKER_UP") < words.index("MESSAGE"), lines


def test_listen_rides_out_a_broker_restart(sessions: tuple[Session, Session], durable_broker: Any) -> None:
    impl, tests = sessions
    paired(impl, tests, durable_broker.url)
    listener = tests.start("listen", "--timeout", "60")
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(listener.stdout or []), daemon=True).start()
    _wait_state(impl, "tests", "online")
    durable_broker.stop()
    deadline = time.monotonic() + 10
    while not any("BROKER_DOWN" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    durable_broker.start()
    deadline = time.monotonic() + 30
    while not any("BROKER_UP" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    impl.ok("send", "after the restart")
    deadline = time.monotonic() + 10
    while not any("MESSAGE" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    listener.terminate()
    listener.wait(10)
    words = [line.split()[1] for line in lines]
    assert "BROKER_DOWN" in words and "BROKER_UP" in words and "MESSAGE" in words
    assert words.index("BROKER_DOWN") < words.index("BROKER_UP") < words.index("MESSAGE")
    assert "after the restart" in tests.ok("recv").out


def test_log_shows_history_with_filters(sessions: tuple[Session, Session], broker_url: str) -> None:
    impl, tests = sessions
    paired(impl, tests, broker_url)
    impl.ok("send", "--kind", "spec", "--subject", "POST /users", "v1")
    tests.ok("send", "--kind", "status", "--state", "red", "all red")
    first = json.loads(impl.ok("send", "--json", "plain note").out)["id"]
    impl.ok("send", "last note")
    tests.ok("recv")  # history includes what was read
    everything = [json.loads(line) for line in tests.ok("log", "--json").lines]
    assert [m["body"] for m in everything] == ["v1", "all red", "plain note", "last note"]
    assert [json.loads(line)["body"] for line in tests.ok("log", "--json", "--kind", "spec").lines] == ["v1"]
    assert [json.loads(line)["body"] for line in tests.ok("log", "--json", "--peer", "tests").lines] == ["all red"]
    assert [json.loads(line)["body"] for line in tests.ok("log", "--json", "--since", first).lines] == ["last note"]
    assert [json.loads(line)["body"] for line in tests.ok("log", "--json", "-n", "1").lines] == ["last note"]
    assert "mqttalk: MESSAGE from=impl kind=spec" in tests.ok("log").out


def _wait_state(session: Session, peer: str, state: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    seen = ""
    while time.monotonic() < deadline:
        st = status_of(session)
        seen = next((p["state"] for p in st["peers"] if p["name"] == peer), "")
        if seen == state:
            return
        time.sleep(0.2)
    raise AssertionError(f"{peer} stayed {seen!r}, expected {state!r} within {within}s")


def test_large_and_small_messages_interleaved_arrive_intact(sessions: tuple[Session, Session], broker_url: str) -> None:
    """Packets of every size through the read-ahead socket: a 200 KB message (near the limit, split
    across reads) between small ones, whose 4-byte acknowledgements arrive by the hundred per read."""
    impl, tests = sessions
    paired(impl, tests, broker_url)
    big = "".join(chr(0x20 + i % 0x2000) for i in range(60_000))  # multi-byte UTF-8: ~170 KB encoded
    bodies = [f"small {i}" for i in range(150)] + [big] + [f"small {i}" for i in range(150, 300)]
    channel: Any = impl.channel()
    with channel.live(online=False) as live:
        for body in bodies:
            live.send(body, wait=False)
        live.drain(timeout=30)
    assert not channel.store.pending(channel.url.channel, channel.me)
    reader: Any = tests.channel()
    got = [env.body for _n, env in reader.fetch(wait=5).messages]
    assert got == bodies


def _vm_steps(store: Any, action: Any) -> int:
    """How much work SQLite did for ``action``: its virtual machine steps, in hundreds (not time)."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    store.db.set_progress_handler(tick, 100)
    try:
        action()
    finally:
        store.db.set_progress_handler(None, 0)
    return count[0]


def test_sending_costs_the_same_with_a_long_history(tmp_path: Any) -> None:
    """The outbox bookkeeping of a send (record, find pending, mark sent, check, announce the highest
    sequence) reaches rows by index: with 20,000 messages already sent it does no more work than with
    none. A query that scanned the history (as one did, unnoticed, until measured) fails this."""
    from mqttalk._store import Store
    from mqttalk._wire import new_envelope

    store = Store(tmp_path / "store.sqlite3")
    topic = "mqttalk/v1/chan/msg/impl"

    def one_round() -> None:
        envs = [new_envelope("impl", "note", f"message {i}") for i in range(100)]
        store.enqueue("chan", "impl", topic, envs)
        rows = store.pending("chan", "impl")
        assert [r.id for r in rows] == [e.id for e in envs]
        store.mark_sent(*(r.n for r in rows))
        assert store.is_sent("chan", "impl", envs[-1].seq)
        assert store.last_sent_seq("chan", "impl") == envs[-1].seq
        assert store.pending("chan", "impl") == []

    fresh = _vm_steps(store, one_round)
    for _ in range(200):
        one_round()
    assert store.last_sent_seq("chan", "impl") == 20_100
    long = _vm_steps(store, one_round)
    assert long <= fresh * 2 + 20, f"{long} steps with a long history vs {fresh} fresh"


def test_a_store_from_before_the_unsent_table_keeps_its_queued_messages(tmp_path: Any) -> None:
    """Stores written by earlier versions marked acknowledged messages in outbox.sent: on opening one,
    the messages it had not sent yet are still sent, and those it had are not sent again."""
    import sqlite3

    from mqttalk._store import Store

    path = tmp_path / "store.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE outbox (n INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL,"
        " sender TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL, topic TEXT NOT NULL,"
        " payload BLOB NOT NULL, kind TEXT NOT NULL, ts TEXT NOT NULL, created REAL NOT NULL, sent REAL,"
        " UNIQUE (channel, sender, seq))"
    )
    db.executemany(
        "INSERT INTO outbox (channel, sender, seq, id, topic, payload, kind, ts, created, sent)"
        " VALUES ('chan', 'impl', ?, ?, 't', x'7b7d', 'note', '2026-11-25T00:00:00+00:00', 0, ?)",
        [(seq, f"id-{seq}", 1.0 if seq <= 3 else None) for seq in range(1, 6)],
    )
    db.commit()
    db.close()
    store = Store(path)
    assert [row.id for row in store.pending("chan", "impl")] == ["id-4", "id-5"]
    assert store.last_sent_seq("chan", "impl") == 3
    assert store.is_sent("chan", "impl", 3) and not store.is_sent("chan", "impl", 4)
    store.close()
    assert [row.id for row in Store(path).pending("chan", "impl")] == ["id-4", "id-5"]  # migrated once only


def test_the_wal_is_checkpointed_by_a_background_thread_not_the_sender(tmp_path: Any) -> None:
    """Past 4 MiB of WAL the pages are copied into the database by a thread of the store's own; the
    committing connection would only do it itself past 64 MiB. The database file grows only through a
    checkpoint (until then every new page lives in the WAL), so its size shows the thread's work."""
    from mqttalk._store import BACKSTOP_PAGES, CHECKPOINT_AT, Store
    from mqttalk._wire import new_envelope

    store = Store(tmp_path / "store.sqlite3")
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == BACKSTOP_PAGES
    body = "x" * 1000
    for _ in range(60):  # ~6.5 MB of outbox rows, in 60 transactions
        store.enqueue("chan", "impl", "t", [new_envelope("impl", "note", body) for _ in range(100)])
    assert (tmp_path / "store.sqlite3-wal").stat().st_size > CHECKPOINT_AT
    deadline = time.monotonic() + 20
    while (tmp_path / "store.sqlite3").stat().st_size < 4 * 1024 * 1024 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "store.sqlite3").stat().st_size >= 4 * 1024 * 1024
    assert any(t.name == "mqttalk-checkpoint" for t in threading.enumerate())
    assert len(store.pending("chan", "impl")) == 6000


def test_a_connection_that_takes_over_its_session_gets_messages_at_once(broker_url: str) -> None:
    """A client reconnecting under its client id before the broker has finished with its old connection
    (a take-over: mqttalk's one-shot reads reconnect at once) gets what is published to it. amqtt left such a
    session marked disconnected and queued everything for a connect that never came (broker/_fixes.py, 3)."""
    port = int(broker_url.rsplit(":", 1)[1])
    client_id = "mqk-take-over-" + os.urandom(4).hex()
    topic = f"mqttalk-test/{client_id}"
    got: dict[str, list[bytes]] = {"old": [], "new": []}

    def connect(name: str, *, clean: bool = False) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        client.on_message = lambda _c, _u, m: got[name].append(bytes(m.payload))
        client.connect("127.0.0.1", port)
        client.loop_start()
        return client

    old = connect("old")
    old.subscribe(topic, qos=1)
    time.sleep(0.3)
    new = connect("new")  # same client id while the old connection is still up: the broker takes it over
    try:
        time.sleep(0.3)
        infos = [new.publish(topic, f"after take-over {i}".encode(), qos=1) for i in range(20)]
        for info in infos:
            info.wait_for_publish(5)
        deadline = time.monotonic() + 5
        while len(got["new"]) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(got["new"]) == sorted(f"after take-over {i}".encode() for i in range(20)), got
    finally:
        new.disconnect()  # (before loop_stop: it wakes the network loop, which loop_stop would wait up to 1 s for)
        for client in (old, new):
            client.loop_stop()
        gone = connect("new", clean=True)  # a clean start drops the session this test left on the broker
        gone.disconnect()  # (first: it wakes the network loop, which loop_stop would wait up to 1 s for)
        gone.loop_stop()


def test_a_closed_connection_hands_back_a_publish_its_successor_received() -> None:
    """amqtt keeps a session's incoming PUBLISHes in one queue that each connection's loop waits on. A closed
    connection's loop, still waiting, took the next PUBLISH the new connection received (already acknowledged
    to its publisher) and dropped it: a reader reconnecting at once missed its own sync marker ~1 run in 16 of
    a reconnect under load. With broker/_fixes.py (3) it hands the message back to the live connection."""
    import asyncio

    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.session import IncomingApplicationMessage
    from amqtt.session import Session as BrokerSession
    from mqttalk_broker import _fixes

    _fixes.install()

    async def scenario() -> object:
        session = BrokerSession()
        session.client_id = "reader"
        old = BrokerProtocolHandler(None, session)  # type: ignore[arg-type]  # (no plugins involved)
        new = BrokerProtocolHandler(None, session)  # type: ignore[arg-type]
        old_loop = asyncio.ensure_future(old.mqtt_deliver_next_message())  # the old connection's loop waits
        await asyncio.sleep(0)
        await old.stop()  # the client connected again: amqtt stops the old connection ...
        new_loop = asyncio.ensure_future(new.mqtt_deliver_next_message())  # ... and the new one's loop waits too
        await asyncio.sleep(0)
        marker = IncomingApplicationMessage(1, "sync/reader", 1, b"marker", False)
        session.delivered_message_queue.put_nowait(marker)  # the new connection receives a PUBLISH
        try:
            return await asyncio.wait_for(new_loop, 2)
        except TimeoutError:
            return None
        finally:
            old_loop.cancel()  # the old loop ends
            await asyncio.gather(old_loop, return_exceptions=True)

    got = asyncio.run(scenario())
    assert isinstance(got, IncomingApplicationMessage) and got.data == b"marker", "the old connection took it"
