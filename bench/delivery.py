"""Delivery benchmarks (issue #3), each next to raw paho on the same broker in the same run.

    .venv/bin/python bench/delivery.py [--backlog 10000] [--stream 5000]

1. Backlog drain: a reader with a persistent session is offline while BACKLOG messages are sent;
   time for it to come back and take them all in: `mqttalk recv` (stores every one in SQLite before
   acknowledging it, then prints them) vs a raw paho client with a persistent session that only
   counts them: once for a backlog raw paho published, once for the very same mqttalk messages
   (sealed, and on MQTT 5 with mqttalk's properties, which paho decodes slowly).
2. Sustained send: messages/s through the library's live connection (outbox in SQLite, QoS 1,
   pipelined) vs raw paho publishing the same payloads at QoS 1 and waiting for every PUBACK. Both
   publish to a topic that an absent peer's persistent session subscribes to, so the broker queues
   every message either way (it did not for the reference before: its topic had no subscriber).
   On MQTT 3.1.1 (amqtt) a second raw paho reference also subscribes to the channel's messages, as
   a member must: the broker then sends it its own messages back, as it does to mqttalk.

Raw paho speaks the protocol mqttalk negotiates with that broker (MQTT 5 with Mosquitto, 3.1.1 with
amqtt): paho's MQTT 5 path costs more per packet (properties), and both sides should pay it.

Brokers: a private Mosquitto (no queue limit) and the embedded amqtt, both started here on free
loopback ports. Prints markdown; writes bench/out/delivery.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import MQTTALK, OUT, Env, free_port, wait_port

BODY = "status: 14 failing in test/users.test.ts (POST /users 409 on duplicate email); working on it"


def start_brokers(root: Path) -> tuple[dict[str, str], list[subprocess.Popen[bytes]]]:
    mport, aport = free_port(), free_port()
    conf = root / "mosquitto.conf"
    conf.write_text(
        f"listener {mport} 127.0.0.1\nallow_anonymous true\nuser root\n"
        "max_queued_messages 0\nmax_inflight_messages 20\n"
    )
    procs = [
        subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen(
            [MQTTALK, "broker", "--port", str(aport)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "MQTTALK_STATE_DIR": str(root / "amqtt")},
        ),
    ]
    wait_port(mport)
    wait_port(aport)
    return {
        "Mosquitto (MQTT 5)": f"mqtt://127.0.0.1:{mport}",
        "embedded amqtt (MQTT 3.1.1)": f"mqtt://127.0.0.1:{aport}",
    }, procs


def channel_of(env: Env, cwd: Path) -> Any:
    import mqttalk

    return mqttalk.open_channel(mqttalk.Settings(state_dir=Path(env.env["XDG_STATE_HOME"]) / "mqttalk"), cwd=cwd)


def library_send(channel: Any, count: int) -> float:
    """Seconds to send ``count`` messages over one live connection, all acknowledged."""
    with channel.live(online=False) as live:
        t = time.perf_counter()
        for i in range(count):
            live.send(f"{BODY} #{i}", wait=False)
            if i % 200 == 199:
                live.poll(0)
        live.drain(timeout=120)
        took = time.perf_counter() - t
    pending = channel.store.pending(channel.url.channel, channel.me)
    if pending:
        raise SystemExit(f"bench: {len(pending)} messages still pending")
    return took


PROTOCOL = {"mosquitto": mqtt.MQTTv5, "amqtt": mqtt.MQTTv311}  # what mqttalk negotiates with each


def paho_client(host: str, port: int, protocol: int, client_id: str = "", clean: bool = True) -> mqtt.Client:
    v5 = protocol == mqtt.MQTTv5
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion(protocol),
        clean_session=None if v5 else clean,
    )
    if v5:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0 if clean else 3600
        c.connect(host, port, clean_start=clean, properties=props)
    else:
        c.connect(host, port)
    return c


def paho_send(host: str, port: int, topic: str, count: int, protocol: int, *, member: bool = False) -> float:
    """Seconds for raw paho to publish ``count`` messages at QoS 1 and have every PUBACK. ``member``:
    as a channel member must, it also subscribes to the channel's messages (``topic``'s siblings), so
    on MQTT 3.1.1 (no No Local) the broker sends each message back to it too."""
    c = paho_client(host, port, protocol)
    if member:
        c.subscribe(topic.rsplit("/", 1)[0] + "/+", qos=1)
    c.loop_start()
    t = time.perf_counter()
    infos = [c.publish(topic, f"{BODY} #{i}", qos=1) for i in range(count)]
    for info in infos:
        info.wait_for_publish(60)
    took = time.perf_counter() - t
    c.loop_stop()
    c.disconnect()
    return took


def absent_reader(host: str, port: int, topic: str, protocol: int) -> None:
    """A persistent session subscribed to ``topic`` at QoS 1 that then goes away: the broker queues for it."""
    c = paho_client(host, port, protocol, f"bench-absent-{time.time_ns() % 10**9}", clean=False)
    c.subscribe(topic, qos=1)
    for _ in range(20):
        c.loop(0.05)
    c.disconnect()


def paho_away_reader(host: str, port: int, topic: str, protocol: int) -> str:
    """A raw persistent-session reader that subscribes to ``topic`` and goes away; returns its client id."""
    cid = f"bench-drain-{time.time_ns() % 10**9}"
    c = paho_client(host, port, protocol, cid, clean=False)
    c.subscribe(topic, qos=1)
    for _ in range(20):
        c.loop(0.05)
    c.disconnect()
    return cid


def paho_come_back(host: str, port: int, cid: str, count: int, protocol: int) -> float:
    """Seconds for the raw reader ``cid`` to reconnect and take in ``count`` queued messages (it only
    counts them)."""
    got = [0]
    t = time.perf_counter()
    c = paho_client(host, port, protocol, cid, clean=False)
    c.on_message = lambda _c, _u, _m: got.__setitem__(0, got[0] + 1)
    while got[0] < count and time.perf_counter() - t < 300:
        c.loop(0.05)
    took = time.perf_counter() - t
    c.disconnect()
    if got[0] < count:
        raise SystemExit(f"bench: raw paho drained only {got[0]} of {count}")
    return took


def paho_drain(host: str, port: int, count: int, protocol: int) -> float:
    """A raw persistent-session reader: subscribe, go away, let ``count`` raw paho messages pile up, come back."""
    topic = f"bench/drain/{os.getpid()}/{time.time_ns()}"
    cid = paho_away_reader(host, port, topic, protocol)
    paho_send(host, port, topic, count, protocol)
    return paho_come_back(host, port, cid, count, protocol)


def bench(url: str, backlog: int, stream: int, rounds: int, protocol: int) -> list[str]:
    host, port = url.split("//")[1].split(":")
    rows = []
    # 1. backlog drain
    # A second reference: a raw paho reader of the same channel takes in the very same backlog
    # (mqttalk's sealed payloads, with their MQTT 5 properties, which paho decodes slowly).
    env = Env()
    try:
        env.paired(url)
        sender = channel_of(env, env.a)
        same = paho_away_reader(host, int(port), sender.topics.all_msg, protocol)
        library_send(sender, backlog)
        t = time.perf_counter()
        out = subprocess.run(
            [MQTTALK, "recv", "--json"], cwd=env.b, env=env.env, capture_output=True, text=True, timeout=600
        )
        ours = time.perf_counter() - t
        n = out.stdout.count('"event": "message"')
        if n != backlog:
            raise SystemExit(f"bench: mqttalk recv got {n} of {backlog}: {out.stderr[-300:]}")
        ref_same = paho_come_back(host, int(port), same, backlog, protocol)
    finally:
        env.close()
    ref = paho_drain(host, int(port), backlog, protocol)
    rows.append(
        f"| backlog drain, {backlog} msgs | `mqttalk recv` {ours:.2f} s ({backlog / ours:,.0f}/s) | "
        f"raw paho {ref:.2f} s ({backlog / ref:,.0f}/s) | {ref / ours:.2f}x |"
    )
    rows.append(
        f"| backlog drain, raw paho reading the same {backlog} mqttalk messages | `mqttalk recv` "
        f"{ours:.2f} s | raw paho {ref_same:.2f} s ({backlog / ref_same:,.0f}/s) | {ref_same / ours:.2f}x |"
    )
    # 2. sustained send: rounds alternate mqttalk and raw paho, and the medians are compared. Both
    # publish to a topic an absent peer's persistent session subscribes to (mqttalk: the channel's other
    # peer), so the broker queues every message in both cases.
    # On MQTT 3.1.1 a member's own messages come back to it (no No Local): a second reference, raw
    # paho subscribed to the channel as a member must be, pays that too; the first one does not.
    ours_s, ref_s, member_s = [], [], []
    env = Env()
    sink = f"bench/stream/{os.getpid()}/{time.time_ns()}/me"
    absent_reader(host, int(port), sink, protocol)
    try:
        env.paired(url)
        channel = channel_of(env, env.a)
        for _ in range(rounds):
            ours_s.append(library_send(channel, stream))
            ref_s.append(paho_send(host, int(port), sink, stream, protocol))
            if protocol == mqtt.MQTTv311:
                member_s.append(paho_send(host, int(port), sink, stream, protocol, member=True))
    finally:
        env.close()
    ours = statistics.median(ours_s)
    rows.append(
        f"| sustained send, {stream} msgs (median of {rounds}) | library {stream / ours:,.0f} msgs/s | "
        f"raw paho {stream / statistics.median(ref_s):,.0f} msgs/s | {paired_ratio(ours_s, ref_s)} |"
    )
    if member_s:
        rows.append(
            f"| sustained send, raw paho also subscribed to the channel (3.1.1 echoes) | library "
            f"{stream / ours:,.0f} msgs/s | raw paho member {stream / statistics.median(member_s):,.0f} "
            f"msgs/s | {paired_ratio(ours_s, member_s)} |"
        )
    return rows


def paired_ratio(ours: list[float], ref: list[float]) -> str:
    """The median of each round's ratio (a round's two runs are seconds apart, so the load of this
    shared machine weighs on both alike), with the lowest and highest round."""
    ratios = sorted(r / o for o, r in zip(ours, ref, strict=True))
    return f"{statistics.median(ratios):.2f}x (rounds {ratios[0]:.2f}-{ratios[-1]:.2f})"


def bench_sealing(url: str, stream: int, rounds: int) -> list[str]:
    """The cost of sealing: the same stream through a sealed and a --plain channel, rounds alternating;
    plus one message's round trip (send, then the peer's live connection has it) in each."""
    chans: dict[str, Any] = {}
    envs = []
    for label, flags in (("sealed", ()), ("plain", ("--plain",))):
        env = Env()
        envs.append(env)
        env.paired(url, *flags)
        chans[label] = (channel_of(env, env.a), channel_of(env, env.b))
    took: dict[str, list[float]] = {"sealed": [], "plain": []}
    rtt: dict[str, list[float]] = {"sealed": [], "plain": []}
    try:
        for r in range(rounds):  # which goes first alternates, so an order effect cannot pass for a cost
            for label in ("sealed", "plain") if r % 2 == 0 else ("plain", "sealed"):
                took[label].append(library_send(chans[label][0], stream))
        for label, (sender, reader) in chans.items():
            reader.fetch()  # take in the backlog first
            with sender.live(online=False) as out, reader.live(online=False) as inbox:
                for i in range(200):
                    t = time.perf_counter()
                    out.send(f"ping {i}")
                    while not inbox.poll(1.0):
                        pass
                    rtt[label].append(time.perf_counter() - t)
    finally:
        for env in envs:
            env.close()
    sealed, plain = statistics.median(took["sealed"]), statistics.median(took["plain"])
    rs, rp = statistics.median(rtt["sealed"]) * 1000, statistics.median(rtt["plain"]) * 1000
    return [
        f"| sealing, sustained send {stream} msgs (median of {rounds}) | sealed {stream / sealed:,.0f} msgs/s | "
        f"plain {stream / plain:,.0f} msgs/s | {paired_ratio(took['sealed'], took['plain'])} |",
        f"| sealing, one message send -> peer has it (median of 200) | sealed {rs:.2f} ms | plain {rp:.2f} ms | "
        f"{rp / rs:.2f}x ({(rs / rp - 1) * 100:+.0f}% time) |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backlog", type=int, default=10_000)
    ap.add_argument("--stream", type=int, default=5_000)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mqttalk-bench-delivery-"))
    brokers, procs = start_brokers(root)
    report = [
        f"# mqttalk delivery bench — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| what | mqttalk | reference | ratio (mqttalk speed / reference speed) |",
        "|---|---|---|---|",
    ]
    try:
        for label, url in brokers.items():
            report.append(f"| **{label}** | | | |")
            protocol = PROTOCOL["mosquitto" if label.startswith("Mosquitto") else "amqtt"]
            report += bench(url, args.backlog, args.stream, args.rounds, protocol)
            report += bench_sealing(url, args.stream, args.rounds)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    text = "\n".join(report) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "delivery.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
