"""Scale-out on real clustered brokers: peers on different nodes of a NATS cluster and of a RabbitMQ
cluster, a node lost with messages queued, an edge Mosquitto bridged to a core one, and the client's
failover from a node that dies to the next. Every broker is a real process on loopback ports of its own,
started from the files in config/, and nodes are lost with kill -9.

What each test shows is whether the *broker* kept the messages: the sender runs nothing when the reader
comes back, so the sender-side repair (the net under every broker) cannot have filled a hole.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _brokers import NatsCluster
from conftest import Session, paired, status_of


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three clustered nats-server nodes from config/nats-cluster.conf, shared by this module's NATS tests
    (all on one xdist worker: see conftest's scheduler); a test that kills nodes has them revived for the next."""
    cluster = NatsCluster(tmp_path_factory.mktemp("nats-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def nats(nats_cluster: NatsCluster) -> NatsCluster:
    nats_cluster.revive()
    return nats_cluster


def reorder(url: str, cluster_url: str, first: str) -> str:
    """The join URL with the cluster's nodes listed in another order (same channel, same key)."""
    assert url.startswith(cluster_url + "/"), url
    return first + url[len(cluster_url) :]


def messages_and_gaps(session: Session, *args: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    res = session.run("recv", "--json", *args)
    assert res.code == 0, f"recv exited {res.code}: {res.err}"
    events = [json.loads(line) for line in res.lines]
    return [e for e in events if e["event"] == "message"], [e for e in events if e["event"] == "gap"]


def send_notes(session: Session, count: int, label: str) -> None:
    """``count`` notes over one connection of the sender's, which is closed after: it runs nothing later
    (so it answers no repair request: whatever the reader gets, the broker kept)."""
    channel: Any = session.channel()
    with channel.live(online=False) as live:
        for i in range(count):
            live.send(f"{label} {i}", wait=False)
        live.drain(timeout=60)


def collect(session: Session, want: int, within: float, *args: str) -> tuple[list[dict[str, Any]], list[Any], int]:
    """Run `recv` until ``want`` messages came in (or the time is up); returns the messages, the gaps
    shown, and how many `recv` runs failed (a node lost: the cluster may take seconds to elect leaders)."""
    got: list[dict[str, Any]] = []
    gaps: list[Any] = []
    failed = 0
    deadline = time.monotonic() + within
    while len(got) < want and time.monotonic() < deadline:
        res = session.run("recv", "--json", *args)
        if res.code != 0:
            failed += 1
            time.sleep(0.5)
            continue
        events = [json.loads(line) for line in res.lines]
        got += [e for e in events if e["event"] == "message"]
        gaps += [e for e in events if e["event"] == "gap"]
        if len(got) < want:
            time.sleep(0.3)
    return got, gaps, failed


# -- NATS: three nodes, every MQTT stream and consumer replicated three times ---------------------------


def test_nats_cluster_peers_on_two_nodes_pair_and_an_absent_peer_returns_on_a_third(
    sessions: tuple[Session, Session], nats: NatsCluster
) -> None:
    impl, tests = sessions
    streams_before = nats.streams()
    url = paired(impl, tests, nats.url(0, 1, 2), pair_flags=())  # both on n1: the URL's first node
    # tests moves to n2 (its URL lists n2 first), and they talk across nodes
    on_n2 = reorder(url, nats.url(0, 1, 2), nats.url(1, 2, 0))
    impl.ok("send", "across the cluster")
    got, gaps = messages_and_gaps(tests, "--channel", on_n2, "--as", "tests")
    assert [m["body"] for m in got] == ["across the cluster"] and not gaps
    # tests is away; impl sends 30 and runs nothing more; tests comes back on n3
    send_notes(impl, 30, "while away")
    on_n3 = reorder(url, nats.url(0, 1, 2), nats.url(2, 0, 1))
    got, gaps = messages_and_gaps(tests, "--channel", on_n3, "--as", "tests")
    assert [m["body"] for m in got] == [f"while away {i}" for i in range(30)], [m["body"] for m in got]
    assert not gaps
    assert messages_and_gaps(tests, "--channel", on_n3, "--as", "tests")[0] == []  # once
    assert sorted(p["name"] for p in status_of(tests)["peers"]) == ["impl", "tests"]  # type: ignore[attr-defined]
    streams = nats.streams()
    for name in ("$MQTT_msgs", "$MQTT_sess", "$MQTT_rmsgs"):  # replicated to all three nodes, as configured
        cluster = streams[name]["cluster"]
        assert 1 + len(cluster.get("replicas", [])) == 3, (name, cluster, streams_before.keys())


def _leaders(nats: NatsCluster) -> tuple[str, str, int]:
    """The leader of the stream holding MQTT messages, and of the consumer with the most messages
    pending (the absent reader's: the sender's own consumer took in what it sent while connected)."""
    msgs = nats.streams()["$MQTT_msgs"]
    consumers = msgs.get("consumer_detail", [])
    reader = max(consumers, key=lambda c: c.get("num_pending", 0) + c.get("num_ack_pending", 0))
    pending = reader.get("num_pending", 0) + reader.get("num_ack_pending", 0)
    return msgs["cluster"]["leader"], reader["cluster"]["leader"], pending


def test_nats_cluster_keeps_an_absent_peers_queue_when_the_streams_leader_is_killed(
    sessions: tuple[Session, Session], nats: NatsCluster
) -> None:
    impl, tests = sessions
    url = paired(impl, tests, nats.url(0, 1, 2))
    send_notes(impl, 50, "queued")  # tests is absent: its session's consumer holds them
    stream_leader, consumer_leader, pending = _leaders(nats)
    assert pending >= 50, f"the absent reader's consumer holds {pending} messages, expected 50"
    victim = nats.node(stream_leader)
    # tests comes back through the node that is about to die, then the others in order
    first = nats.nodes.index(victim)
    back = reorder(url, nats.url(0, 1, 2), nats.url(first, (first + 1) % 3, (first + 2) % 3))
    victim.kill()
    got, gaps, failed = collect(tests, 50, 60, "--channel", back, "--as", "tests")
    print(
        f"NATS: killed {stream_leader} (leader of $MQTT_msgs; the reader's consumer was led by "
        f"{consumer_leader}); the reader got {len(got)} of 50 with {failed} failed attempts while the "
        f"cluster elected new leaders, gaps shown: {len(gaps)}"
    )
    assert sorted(m["seq"] for m in got) == list(range(1, 51)), f"{len(got)} of 50 arrived ({failed} failed runs)"
    assert [m["body"] for m in got] == [f"queued {i}" for i in range(50)]  # in order, each once
    assert not gaps  # nothing was missing: no repair asked for, none possible (impl runs nothing)
    survivors = {node.name for node in nats.nodes if node.up}
    assert nats.streams()["$MQTT_msgs"]["cluster"]["leader"] in survivors


def test_listen_moves_to_the_next_nats_node_when_its_node_dies_and_keeps_session_and_presence(
    sessions: tuple[Session, Session], nats: NatsCluster
) -> None:
    impl, tests = sessions
    url = paired(impl, tests, nats.url(0, 1, 2))
    on_n2 = reorder(url, nats.url(0, 1, 2), nats.url(1, 2, 0))
    listener = tests.start("listen", "--timeout", "60", "--channel", on_n2, "--as", "tests")
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(listener.stdout or []), daemon=True).start()
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(listener.stderr or []), daemon=True).start()
    try:
        _until(lambda: any("listening as tests" in line for line in err), 20, err)
        assert f"(node mqtt://{nats.nodes[1].address})" in "".join(err)
        _until(lambda: _state(impl, "tests") == "online", 20, err)
        nats.nodes[1].kill()
        _until(lambda: any("BROKER_UP" in line for line in lines), 30, lines)
        impl.ok("send", "after the node died")
        _until(lambda: any("MESSAGE" in line for line in lines), 20, lines)
        assert _state(impl, "tests") == "online"  # presence kept: the will did not mark it away for good
    finally:
        listener.terminate()
        listener.wait(10)
    words = [line.split()[1] for line in lines if line.startswith("mqttalk: ")]
    down = next(line for line in lines if "BROKER_DOWN" in line)
    up = next(line for line in lines if "BROKER_UP" in line)
    assert nats.nodes[1].address in down and nats.nodes[2].address in up, (down, up)
    assert words.index("BROKER_DOWN") < words.index("BROKER_UP") < words.index("MESSAGE")
    assert "after the node died" in tests.ok("log", "--channel", on_n2, "--as", "tests").out


def _state(session: Session, peer: str) -> str | None:
    return next((str(p["state"]) for p in status_of(session)["peers"] if p["name"] == peer), None)  # type: ignore[attr-defined]


def _until(done: Any, within: float, context: list[str]) -> None:
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline, "".join(context)
        time.sleep(0.1)


def test_with_its_first_nats_node_dead_a_cluster_url_reaches_the_next_and_the_session_is_there(
    sessions: tuple[Session, Session], nats: NatsCluster
) -> None:
    impl, tests = sessions
    paired(impl, tests, nats.url(0, 1, 2))
    nats.nodes[0].kill()
    nats.wait_leaders()  # the survivors elect new leaders (seconds): the test above shows that window
    impl.ok("send", "n1 is dead")  # its first node refuses at once; n2 answers, with impl's session
    got, gaps = messages_and_gaps(tests)
    assert [m["body"] for m in got] == ["n1 is dead"] and not gaps


def test_nats_makes_no_new_session_while_a_node_of_three_is_down_and_mqttalk_says_so_in_one_line(
    tmp_path: Path, nats: NatsCluster
) -> None:
    """A finding, not a wish: with consumer_replicas 3 on three nodes, NATS must place every new
    consumer on all three, so while one is down a *new* session (a peer joining, a new channel)
    cannot subscribe; sessions that exist keep working (tests above). mqttalk says so in one line,
    and the same command succeeds once the node is back."""
    impl = Session("impl", tmp_path)
    nats.nodes[2].kill()
    nats.wait_leaders()
    res = impl.run("create", "--as", "impl", "--broker", nats.url(0, 1, 2))
    assert res.code == 3, res.err
    assert res.err.count("\n") == 1 and "did not confirm the subscribe" in res.err, res.err
    nats.revive()
    impl.ok("create", "--as", "impl", "--broker", nats.url(0, 1, 2))


def test_a_cluster_whose_nodes_all_refuse_is_one_error_line(tmp_path: Path) -> None:
    from conftest import free_port

    impl = Session("impl", tmp_path)
    nodes = f"mqtt://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    res = impl.run("create", "--as", "impl", "--broker", nodes)
    assert res.code == 5, res.err
    assert res.err.count("\n") == 1 and "Traceback" not in res.err
    assert re.match(
        r"mqttalk: error: no node of mqtt://127\.0\.0\.1:\d+,127\.0\.0\.1:\d+ answered: nothing is listening", res.err
    )
