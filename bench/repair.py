"""Gap repair (issue #13): how long a reader takes to get back messages a broker lost, next to raw paho.

    .venv/bin/python bench/repair.py [--count 1000] [--rounds 3]

Each round, on a Mosquitto of its own without persistence (a public broker restarted, say):
1. impl and tests pair; tests runs nothing; impl sends COUNT messages (acknowledged by the broker).
2. The broker restarts: tests' session, its queue of COUNT messages and every retained presence are gone.
3. From the moment the broker listens again, both peers run live processes (as `listen` or an MCP
   server would): tests finds from impl's presence that COUNT messages never came, writes impl a
   repair note; impl sends them again from its store. Measured: broker up -> tests has all COUNT.
Reference, same broker, same round: a raw paho subscriber receiving COUNT fresh QoS 1 messages from
a raw paho publisher (first publish -> last received). Ratio = repair time / reference time.

Prints markdown; writes bench/out/repair.md.
"""

from __future__ import annotations

import argparse
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

BODY = "status: 14 failing in test/users.test.ts (POST /users 409 on duplicate email); working on it"


class Broker:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.conf = root / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser root\n"
            "persistence false\nmax_queued_messages 0\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def repair_round(root: Path, count: int) -> tuple[float, float]:
    import mqttalk

    broker = Broker(root)
    broker.start()
    try:
        made = []
        for name in ("impl", "tests"):
            (root / name).mkdir()
            made.append(mqttalk.Settings.load(broker=broker.url, state_dir=root / f"{name}-state", heartbeat=1.0))
        impl = mqttalk.create("impl", settings=made[0], cwd=root / "impl")
        mqttalk.pair(impl.url.render(), "tests", settings=made[1], cwd=root / "tests", wait=0)
        with impl.live(online=False) as live:
            for i in range(count):
                live.send(f"{BODY} #{i}", wait=False)
            live.drain(timeout=60)
        reference = paho_reference(broker.port, count)
        broker.stop()
        broker.start()
        t0 = time.perf_counter()
        stop = threading.Event()

        def sender() -> None:  # impl's live process: it reconnects, says how many it sent, answers notes
            ch = mqttalk.open_channel(made[0], cwd=root / "impl")
            with ch.live(online=True, reconnect=True) as live:
                live.announce("online")
                while not stop.is_set():
                    live.poll(0.05)

        thread = threading.Thread(target=sender)
        thread.start()
        try:
            reader = mqttalk.open_channel(made[1], cwd=root / "tests")
            with reader.live(online=True, reconnect=True) as live:
                live.announce("online")
                while reader.store.unread_count(reader.url.channel, "tests") < count:
                    if time.perf_counter() - t0 > 120:
                        raise SystemExit("bench: repair did not complete within 120 s")
                    live.poll(0.05)
                took = time.perf_counter() - t0
        finally:
            stop.set()
            thread.join(30)
        got = reader.unread()
        if len(got.messages) != count or got.gaps:
            raise SystemExit(f"bench: {len(got.messages)} messages and {len(got.gaps)} gaps after repair")
        return took, reference
    finally:
        broker.stop()


def paho_reference(port: int, count: int) -> float:
    """Seconds from a raw paho publisher's first QoS 1 publish to a raw paho subscriber having all."""
    got = threading.Event()
    seen = [0]

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        seen[0] += 1
        if seen[0] == count:
            got.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe("ref/#", qos=1)
    sub.loop_start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    time.sleep(0.3)
    t = time.perf_counter()
    for i in range(count):
        pub.publish("ref/x", f"{BODY} #{i}", qos=1)
    if not got.wait(60):
        raise SystemExit(f"bench: the paho reference got {seen[0]} of {count}")
    took = time.perf_counter() - t
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="mqttalk-repair-") as tmp:
            took, ref = repair_round(Path(tmp), args.count)
        rows.append((took, ref))
        print(f"round {r + 1}: repair {took:.2f} s, paho reference {ref:.3f} s, ratio {took / ref:.1f}x", flush=True)
    ratios = [t / r for t, r in rows]
    lines = [
        f"# Gap repair, {args.count} messages lost by a Mosquitto restarted without persistence",
        "",
        "| round | broker up -> reader has all (s) | raw paho, fresh messages (s) | ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {i + 1} | {t:.2f} | {r:.3f} | {t / r:.1f}x |" for i, (t, r) in enumerate(rows)]
    lines += [
        "",
        f"median repair {statistics.median(t for t, _ in rows):.2f} s; median ratio "
        f"{statistics.median(ratios):.1f}x (range {min(ratios):.1f}-{max(ratios):.1f}x)",
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "repair.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
