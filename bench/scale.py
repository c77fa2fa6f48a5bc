"""Scale on one broker (issue #6): CHANNELS channels x 2 peers on one Mosquitto, all paired and
exchanging messages at once, next to raw paho doing the same exchange in the same run.

    .venv/bin/python bench/scale.py [--channels 500] [--rounds 5]

1. Pairing: each channel is created (sealed) by impl, which then waits while tests pairs, as two
   sessions do; the time per channel is reported.
2. Holding: every peer of every channel opens a live connection (`Live`, presence online, heartbeat
   on, persistent session, QoS 1 subscriptions): 2 x CHANNELS connections from this one process.
   Mosquitto's resident memory is read from /proc before and after, and this process's own.
3. Exchange: in each round every impl sends one message at once; the round is over when every
   tests peer has it stored. Latency = send call -> the reader's live connection has stored it,
   for every message. The reference is raw paho: 2 x CHANNELS clean clients (one publisher, one
   subscriber per channel, QoS 1, same payload) driven the same way by the same kind of loop, so
   the sweep over all connections costs both the same.

Prints markdown; writes bench/out/scale.md. A private Mosquitto is started on a free port.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import OUT, free_port, wait_port

PROBES = 200
BODY = "status: 14 failing in test/users.test.ts (POST /users 409 on duplicate email); working on it"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pair_all(url: str, root: Path, count: int) -> tuple[list[tuple[Any, Any]], list[float]]:
    import mqttalk

    sides = {side: mqttalk.Settings(broker=url, state_dir=root / f"{side}-state") for side in ("a", "b")}
    pairs, took = [], []
    for i in range(count):
        a_dir, b_dir = root / "a" / str(i), root / "b" / str(i)
        a_dir.mkdir(parents=True)
        b_dir.mkdir(parents=True)
        t = time.perf_counter()
        impl = mqttalk.create("impl", settings=sides["a"], cwd=a_dir)
        waited: list[list[str]] = []
        waiter = threading.Thread(target=lambda ch=impl, out=waited: out.append(ch.join(20, new_challenge=False)))
        waiter.start()
        time.sleep(0.05)  # impl is connecting; tests' pair waits for its answer anyway
        tests, others = mqttalk.pair(impl.url.render(), "tests", settings=sides["b"], cwd=b_dir, wait=20)
        waiter.join(30)
        took.append(time.perf_counter() - t)
        if others != ["impl"] or waited != [["tests"]]:
            raise SystemExit(f"bench: channel {i} did not pair on both sides ({others}, {waited})")
        pairs.append((impl, tests))
    return pairs, took


def exchange_mqttalk(pairs: list[tuple[Any, Any]], rounds: int) -> tuple[list[float], list[float], float]:
    """Open every peer's live connection, run the rounds, then the one-at-a-time probes; returns both
    latencies and this process's RSS."""
    arrived: dict[int, float] = {}
    for i, (_impl, tests) in enumerate(pairs):

        def seen(event: Any, i: int = i) -> None:
            if event.kind == "message":
                arrived[i] = time.perf_counter()

        tests.on_event = seen
    before = rss_mib(os.getpid())
    senders = [impl.live(online=True).open() for impl, _ in pairs]
    readers = [tests.live(online=True).open() for _, tests in pairs]
    own_rss = rss_mib(os.getpid()) - before
    latencies = []
    try:
        for r in range(rounds):
            arrived.clear()
            sent = {}
            for i, live in enumerate(senders):
                sent[i] = time.perf_counter()
                live.send(f"{BODY} round {r}", wait=False)
                live.drain(timeout=0)  # recorded and handed to the network now, acknowledged later
            deadline = time.monotonic() + 120
            while len(arrived) < len(pairs):
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: only {len(arrived)} of {len(pairs)} messages arrived")
                for live in readers:
                    live.poll(0)
                for live in senders:
                    live.poll(0)
            latencies += [arrived[i] - sent[i] for i in sent]
        for live in senders:
            live.drain(timeout=10)
        singles = []
        for k in range(PROBES):  # one message at a time on a channel, while all the others stay connected
            i = (k * 7919) % len(pairs)
            arrived.clear()
            t = time.perf_counter()
            senders[i].send(f"{BODY} probe {k}", wait=False)
            senders[i].drain(timeout=0)
            while i not in arrived:
                readers[i].poll(0.01)
            singles.append(arrived[i] - t)
            senders[i].drain(timeout=10)
    finally:
        for live in senders + readers:
            live.close()
    return latencies, singles, own_rss


def exchange_paho(host: str, port: int, count: int, rounds: int) -> tuple[list[float], list[float], int]:
    """The same exchange with raw paho clients (MQTT 5, QoS 1), driven by the same kind of sweep.

    Each client is run by the poll()-based loop mqttalk's links use (paho's external-loop API):
    paho's own ``loop()`` uses select(), which cannot watch the descriptors past 1024 that a
    thousand clients in one process get."""
    from mqttalk._transport import _loop

    def loop(c: mqtt.Client, timeout: float = 0.0) -> None:
        _loop(c, timeout)

    arrived: dict[int, float] = {}
    pubs, subs = [], []
    for i in range(count):
        sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        sub.on_message = lambda _c, _u, _m, i=i: arrived.__setitem__(i, time.perf_counter())
        sub.connect(host, port)
        sub.subscribe(f"bench/scale/{os.getpid()}/{i}", qos=1)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect(host, port)
        for c in (sub, pub):
            loop(c, 0.01)
        pubs.append(pub)
        subs.append(sub)
    for _ in range(20):
        for c in subs + pubs:
            loop(c)
    latencies = []
    try:
        for r in range(rounds):
            arrived.clear()
            sent = {}
            for i, pub in enumerate(pubs):
                sent[i] = time.perf_counter()
                pub.publish(f"bench/scale/{os.getpid()}/{i}", f"{BODY} round {r}", qos=1)
            deadline = time.monotonic() + 120
            while len(arrived) < count:
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: raw paho got only {len(arrived)} of {count}")
                for c in subs + pubs:
                    loop(c)
            latencies += [arrived[i] - sent[i] for i in sent]
        singles = []
        for k in range(PROBES):
            i = (k * 7919) % count
            arrived.clear()
            t = time.perf_counter()
            pubs[i].publish(f"bench/scale/{os.getpid()}/{i}", f"{BODY} probe {k}", qos=1)
            while i not in arrived:
                loop(subs[i], 0.01)
            singles.append(arrived[i] - t)
            loop(pubs[i], 0.01)
    finally:
        for c in subs + pubs:
            c.disconnect()
    return latencies, singles, len(subs) + len(pubs)


def ms(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (seconds), in milliseconds."""
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mqttalk-bench-scale-"))
    port = free_port()
    conf = root / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\nmax_keepalive 600\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"mqtt://127.0.0.1:{port}"
    try:
        wait_port(port)
        idle = rss_mib(broker.pid)
        t = time.perf_counter()
        pairs, pairing = pair_all(url, root, args.channels)
        pairing_total = time.perf_counter() - t
        after_pairing = rss_mib(broker.pid)
        ours, ours_one, own_rss = exchange_mqttalk(pairs, args.rounds)
        held = rss_mib(broker.pid)  # sessions and retained presence stay after the connections close
        ref, ref_one, clients = exchange_paho("127.0.0.1", port, args.channels, args.rounds)
        n = args.channels
        version = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False).stdout
        lines = [
            f"# mqttalk scale bench — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"{n} sealed channels x 2 peers on one Mosquitto ({version.splitlines()[0]}).",
            "",
            "| what | mqttalk | reference | ratio |",
            "|---|---|---|---|",
            f"| pairing, per channel (create, wait, pair; both sides PAIRED) | median {ms(pairing, 0.5):.0f} ms, "
            f"p95 {ms(pairing, 0.95):.0f} ms, all {n} in {pairing_total:.0f} s | | |",
            f"| Mosquitto resident memory | idle {idle:.1f} MiB; {n} channels paired, sessions kept: "
            f"{after_pairing:.1f} MiB; after {2 * n} live connections: {held:.1f} MiB | "
            f"+{(after_pairing - idle) * 1024 / (2 * n):.1f} KiB per peer | |",
            f"| this process, opening {2 * n} live connections | +{own_rss:.1f} MiB "
            f"({own_rss * 1024 / (2 * n):.0f} KiB per connection: paho client, socket, channel state) | | |",
            f"| one message, send -> reader stored it, {2 * n} connections open ({PROBES} probes) | median "
            f"{ms(ours_one, 0.5):.2f} ms, p95 {ms(ours_one, 0.95):.2f} ms | raw paho: median "
            f"{ms(ref_one, 0.5):.2f} ms, p95 {ms(ref_one, 0.95):.2f} ms | "
            f"{statistics.median(ref_one) / statistics.median(ours_one):.2f}x |",
            f"| burst: all {n} channels send at once, one process drives all {2 * n} connections "
            f"(x{args.rounds}) | median {ms(ours, 0.5):.0f} ms, p95 {ms(ours, 0.95):.0f} ms | raw paho "
            f"({clients} clients): median {ms(ref, 0.5):.0f} ms, p95 {ms(ref, 0.95):.0f} ms | "
            f"{statistics.median(ref) / statistics.median(ours):.2f}x |",
        ]
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scale.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
