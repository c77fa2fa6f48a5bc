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
from _clusters import NatsCluster
from conftest import Session, join_url, paired, read_join_url, status_of


class _Clusters:
    """The module's NATS cluster, made again after a test that killed a node: a node started again may
    take minutes to count as current, and until then NATS cannot place a new session's replicated
    consumers, so the next test would measure that instead of what it is about (a test of its own
    shows it: test_nats_makes_no_new_session_...)."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.cluster: NatsCluster | None = None

    def fresh(self) -> NatsCluster:
        if self.cluster is not None and not any(node.killed for node in self.cluster.nodes):
            return self.cluster
        self.close()
        self.cluster = NatsCluster(self.factory.mktemp("nats-cluster"))
        self.cluster.start()
        return self.cluster

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


@pytest.fixture(scope="module")
def nats_clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Clusters]:
    """Three clustered nats-server nodes from config/nats-cluster.conf, shared by this module's NATS tests
    (all on one xdist worker: see conftest's scheduler) until one kills a node."""
    clusters = _Clusters(tmp_path_factory)
    try:
        yield clusters
    finally:
        clusters.close()


@pytest.fixture
def nats(nats_clusters: _Clusters) -> NatsCluster:
    return nats_clusters.fresh()


def reorder(url: str, cluster_url: str, first: str) -> str:
    """The join URL with the cluster's nodes listed in another order (same channel, same key)."""
    assert url.startswith(cluster_url + "/"), url
    return first + url[len(cluster_url) :]


def paired_across(impl: Session, tests: Session, cluster_url: str, reader_first: str) -> tuple[str, str]:
    """impl creates on the cluster URL's first node and waits; tests pairs through the URL with its nodes
    in another order (so its session, and on RabbitMQ its queue, lives on that node). Returns both URLs."""
    proc = impl.start("create", "--as", "impl", "--broker", cluster_url, "--wait", "60")
    try:
        url = read_join_url(proc)
        theirs = reorder(url, cluster_url, reader_first)
        res = tests.run("pair", theirs, "--as", "tests")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert res.code == 0 and "mqttalk: PAIRED with impl" in res.out, res.err
    assert proc.returncode == 0 and "mqttalk: PAIRED with tests" in out, err
    return url, theirs


def messages_and_gaps(session: Session, *args: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    res = session.run("recv", "--json", *args)
    assert res.code == 0, f"recv exited {res.code}: {res.err}"
    events = [json.loads(line) for line in res.lines]
    return [e for e in events if e["event"] == "message"], [e for e in events if e["event"] == "gap"]


def send_notes(session: Session, count: int, label: str, url: str | None = None) -> None:
    """``count`` notes over one connection of the sender's, which is closed after: it runs nothing later
    (so it answers no repair request: whatever the reader gets, the broker kept). ``url``: the channel's
    URL with the nodes in another order (as `--channel URL --as NAME`)."""
    import mqttalk

    if url is None:
        channel: Any = session.channel()
    else:
        settings = mqttalk.Settings(state_dir=session.state_dir, channel=url, peer=session.name)
        channel = mqttalk.open_channel(settings, cwd=session.cwd)
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
    # down names the dead node; up names a survivor (the next in the URL's order, or the one after it
    # if the next could not take the session yet while the cluster elected new leaders)
    assert nats.nodes[1].address in down and nats.nodes[1].address not in up, (down, up)
    assert nats.nodes[2].address in up or nats.nodes[0].address in up, (down, up)
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
    got, gaps = messages_and_gaps(tests, "--wait", "30")  # (a session moved to a new node: delivered there soon)
    assert [m["body"] for m in got] == ["n1 is dead"] and not gaps


def test_a_new_nats_session_after_the_meta_leader_is_killed_fails_in_one_line_until_the_cluster_settles(
    tmp_path: Path, nats: NatsCluster
) -> None:
    """A finding, measured: a new session (a peer joining, a new channel) makes replicated consumers (R3),
    and after a node is lost NATS may not place them while it is down (seen: at once, after 27 s, and
    not at all until the node came back). Sessions that exist carry on (tests above). mqttalk says so in
    one line and never hangs while the node is down; with the node back, the same command works."""
    impl = Session("impl", tmp_path)
    meta = (nats.nodes[0].jsz().get("meta_cluster") or {}).get("leader")
    victim = nats.node(meta) if meta else nats.nodes[2]
    victim.kill()
    nats.wait_leaders()
    settled = time.monotonic()
    failures: list[str] = []
    early = Session("early", tmp_path)  # (its own directory: a create that works binds it)
    while time.monotonic() - settled < 20:  # (a try costs up to the connect timeout: a few tries)
        res = early.run("create", "--as", "early", "--broker", nats.url(0, 1, 2))
        if res.code == 0:
            break
        assert res.code in (3, 5) and res.err.count("\n") == 1, res.err  # one line: TimedOut or unreachable
        failures.append(res.err.strip())
        time.sleep(1)
    print(
        f"NATS: {victim.name} (meta leader: {meta == victim.name}) killed; {len(failures)} creates failed in "
        f"{time.monotonic() - settled:.1f} s after the survivors had leaders ({failures[0] if failures else '-'})"
    )
    nats.revive()
    config = tmp_path / "config.toml"  # (and the cluster from the config file, as a team would set it)
    config.write_text(f'broker = "{nats.url(2, 0, 1)}"\n')
    back = time.monotonic()
    while (made := impl.run("create", "--as", "impl", env={"MQTTALK_CONFIG": str(config)})).code != 0:
        assert made.code in (3, 5) and time.monotonic() - back < 120, made.err
        time.sleep(1)
    print(f"NATS: with the node back, a new session was made after {time.monotonic() - back:.1f} s")
    assert join_url(made).startswith(nats.url(2, 0, 1) + "/")


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


# -- RabbitMQ: two nodes; an absent peer's queue is a classic queue on one node -----------------------


def test_rabbitmq_cluster_peers_on_two_nodes_talk_and_a_queue_survives_losing_the_other_node(
    sessions: tuple[Session, Session], request: pytest.FixtureRequest
) -> None:
    from _clusters import RabbitCluster

    rabbit: RabbitCluster = request.getfixturevalue("rabbitmq_cluster")
    impl, tests = sessions
    proc = impl.start("create", "--as", "impl", "--broker", rabbit.url(0, 1), "--wait", "60")  # impl on c1
    try:
        url = read_join_url(proc)
        on_c2 = reorder(url, rabbit.url(0, 1), rabbit.url(1, 0))
        # A finding: RabbitMQ keeps retained messages per node (not replicated), so through c2 the channel
        # looks empty: no presence, no roster. mqttalk says so and joins nothing (exit 7).
        elsewhere = tests.run("pair", on_c2, "--as", "tests", "--wait", "5")
        assert elsewhere.code == 7 and "nobody is in this channel" in elsewhere.err, elsewhere.err
        # Through the URL as printed (the creator's node first) it pairs, and tests' queue lives on c1.
        res = tests.run("pair", url, "--as", "tests")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert res.code == 0 and "PAIRED with impl" in res.out, res.err
    assert proc.returncode == 0 and "PAIRED with tests" in out, err
    impl.ok("send", "from c2", "--channel", on_c2, "--as", "impl")  # impl on c2, tests reads on c1
    got, gaps = messages_and_gaps(tests)
    assert [m["body"] for m in got] == ["from c2"] and not gaps
    send_notes(impl, 30, "queued", on_c2)  # tests is absent; impl runs nothing after this
    queues = rabbit.queues()
    held = max(queues, key=lambda q: int(q["messages"]))
    print(f"RabbitMQ {rabbit.version} queues: {queues}")
    # 3.10's MQTT plugin keeps an absent session's messages in a durable *classic* queue, on one node
    assert all(q["type"] == "classic" and q["durable"] for q in queues if q["name"].startswith("mqtt-subscription-"))
    assert int(held["messages"]) >= 30 and held["node"] == rabbit.nodes[0].node, held
    rabbit.kill(1)  # kill -9 c2: the node impl sent through, NOT the one holding tests' queue
    got, gaps, failed = collect(tests, 30, 60)
    print(f"RabbitMQ: killed c2; tests' queue on c1: {len(got)} of 30 arrived, {failed} failed runs")
    assert [m["body"] for m in got] == [f"queued {i}" for i in range(30)]  # each once, in order
    assert not gaps  # the queue kept them: impl ran nothing, so nothing was repaired
    sent = impl.run("send", "after c2 died", "--channel", on_c2, "--as", "impl")
    assert sent.code == 0, sent.err  # impl's URL lists dead c2 first: it moves on to c1
    got, gaps, _ = collect(tests, 1, 30)
    assert [m["body"] for m in got] == ["after c2 died"], got


# -- Mosquitto: an edge bridged to a core --------------------------------------------------------------


@pytest.fixture
def bridged(tmp_path: Path) -> Iterator[Any]:
    from _clusters import BridgedMosquitto

    brokers = BridgedMosquitto(tmp_path / "bridge")
    try:
        brokers.start()
        yield brokers
    finally:
        brokers.stop()


def test_bridge_peers_on_edge_and_core_talk_and_a_10s_cut_of_the_link_loses_nothing(
    sessions: tuple[Session, Session], bridged: Any
) -> None:
    impl, tests = sessions
    # impl on the edge; tests pairs through the core (the same channel: only the address differs)
    paired_across(impl, tests, bridged.edge_url, bridged.core_url)
    impl.ok("send", "edge to core")
    assert [m["body"] for m in messages_and_gaps(tests)[0]] == ["edge to core"]
    tests.ok("send", "core to edge")
    assert [m["body"] for m in messages_and_gaps(impl)[0]] == ["core to edge"]
    listener = tests.start("listen", "--timeout", "90")
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(listener.stdout or []), daemon=True).start()
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(listener.stderr or []), daemon=True).start()
    try:
        _until(lambda: any("listening as tests" in line for line in err), 20, err)
        bridged.relay.cut()
        cut_at = time.monotonic()
        for i in range(20):  # impl keeps sending on the edge, which acknowledges each: the link is not its business
            impl.ok("send", f"during the cut {i}")
        seen_during = sum("MESSAGE" in line for line in lines)
        time.sleep(max(0.0, 10 - (time.monotonic() - cut_at)))
        bridged.relay.mend()
        bridged.wait_bridged(30)
        _until(lambda: sum("MESSAGE" in line for line in lines) >= 20, 30, lines)
        time.sleep(1)  # (anything sent twice would come now)
    finally:
        listener.terminate()
        listener.wait(10)
    print("bridge listen stderr:", "".join(err))
    assert seen_during == 0, "a message crossed a link that was cut"
    got = [line for line in lines if "MESSAGE" in line]
    assert len(got) == 20, lines  # exactly once: none lost, none twice
    history = [m for m in map(json.loads, tests.ok("log", "--json").lines) if m.get("event") == "message"]
    during = [m["body"] for m in history if m["body"].startswith("during the cut")]
    assert during == [f"during the cut {i}" for i in range(20)]
    assert not any("GAP" in line for line in lines)  # kept by the brokers, no repair needed
    # retained presence crossed the bridge: on the core, impl's newest presence (it sent 20 since) is there
    peers = {p["name"]: p for p in status_of(tests)["peers"]}  # type: ignore[attr-defined]
    assert set(peers) == {"impl", "tests"}, peers


def test_a_node_that_accepts_but_never_answers_costs_one_connect_timeout_then_the_next_is_used(
    tmp_path: Path, private_mosquitto: Any
) -> None:
    import socket

    silent = socket.socket()  # the kernel completes the TCP handshake (backlog); nothing ever answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        impl = Session("impl", tmp_path)
        nodes = f"mqtt://127.0.0.1:{silent.getsockname()[1]},127.0.0.1:{private_mosquitto.port}"
        started = time.monotonic()
        res = impl.run("create", "--as", "impl", "--broker", nodes, "--connect-timeout", "1")
        took = time.monotonic() - started
    finally:
        silent.close()
    assert res.code == 0, res.err
    assert join_url(res).startswith(nodes + "/")
    assert took < 8, f"the silent node cost {took:.1f} s"  # its MQTT 5 probe and 3.1.1 try, 1 s each, then on


def test_a_node_that_refuses_us_is_passed_over_and_every_node_refusing_is_the_error(tmp_path: Path) -> None:
    """A node set up differently (its own password file, or not of this cluster) must not keep a peer
    from the nodes after it; when every node refuses, the refusal is what is said (exit 5)."""
    from conftest import PrivateMosquitto

    closed = PrivateMosquitto(tmp_path / "closed")
    closed.conf.write_text(closed.conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    closed2 = PrivateMosquitto(tmp_path / "closed2")
    closed2.conf.write_text(closed2.conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    open_ = PrivateMosquitto(tmp_path / "open")
    for broker in (closed, closed2, open_):
        broker.start()
    try:
        impl = Session("impl", tmp_path)
        made = impl.ok("create", "--as", "impl", "--broker", f"mqtt://127.0.0.1:{closed.port},127.0.0.1:{open_.port}")
        assert "CREATED" in made.out  # (on the second node: the first refused)
        other = Session("other", tmp_path)
        res = other.run(
            "create", "--as", "other", "--broker", f"mqtt://127.0.0.1:{closed.port},127.0.0.1:{closed2.port}"
        )
        assert res.code == 5 and res.err.count("\n") == 1 and "every node of" in res.err and "refused us" in res.err, (
            res.err
        )
    finally:
        for broker in (closed, closed2, open_):
            broker.stop()
